"""Checks on the driver before Ray starts: what params.yaml asks for must exist on this machine, and the
training metadata must list usable samples. A broken meta_expressions.json is reported here, naming the file,
instead of in every Ray worker; image-level problems (truncated JPEGs, wrong PNGs) show when a clip is loaded."""

from __future__ import annotations

import logging
from pathlib import Path

from bifit.config import ConfigError
from pipeline.config import PipelineConfig

log = logging.getLogger("pipeline.preflight")


def check_local_resources(cfg: PipelineConfig, local_ray: bool) -> None:
    """GPU workers on a local Ray need that many GPUs here (Ray would otherwise wait for them forever)."""
    if not (local_ray and cfg.ray.use_gpu):
        return
    import torch

    found = torch.cuda.device_count()
    if found < cfg.ray.num_workers:
        raise ConfigError(f"ray.use_gpu: true asks for {cfg.ray.num_workers} GPU worker(s) (ray.num_workers) on a "
                          f"local Ray, but this machine has {found} CUDA device(s); set ray.use_gpu: false or join "
                          "a cluster with RAY_ADDRESS")


def check_training_data(cfg: PipelineConfig, skip_log: Path | None = None) -> int:
    """List the training samples as the workers will (raises SampleError/ValueError naming the file, or records
    the skips with data.skip_bad_samples) and check that they fill at least one step. Returns the sample count."""
    from bifit.data import YTVOSDataset
    from bifit.synthetic import SYNTHETIC_CATEGORIES

    d = cfg.data  # the train stage reads Ref-YouTube-VOS-format data at data.root
    categories = SYNTHETIC_CATEGORIES if d.categories == "synthetic" else None
    dataset = YTVOSDataset(d.root, "train", d.num_frames, categories=categories, skip_bad_samples=d.skip_bad_samples,
                           skip_log=skip_log)
    if dataset.skipped:
        log.warning("%d training entries skipped while listing (data.skip_bad_samples), recorded in %s",
                    len(dataset.skipped), skip_log)
    per_step = cfg.ray.num_workers * cfg.train.batch_size
    if len(dataset) < per_step:
        raise ConfigError(f"train.batch_size: {len(dataset)} training samples in {d.root} cannot fill one step of "
                          f"train.batch_size ({cfg.train.batch_size}) x ray.num_workers ({cfg.ray.num_workers})")
    return len(dataset)
