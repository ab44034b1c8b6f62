"""Checks on the driver before Ray starts: what params.yaml asks for must exist on this machine, and the
training metadata must list usable samples. A broken meta_expressions.json is reported here, naming the file,
instead of in every Ray worker; image-level problems (truncated JPEGs, wrong PNGs) show when a clip is loaded."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from bifit.config import ConfigError
from pipeline.config import PipelineConfig, resolve

log = logging.getLogger("pipeline.preflight")


def check_local_resources(cfg: PipelineConfig, local_ray: bool) -> None:
    """The model's weight sources exist, and GPU workers on a local Ray have that many GPUs here (Ray would
    otherwise wait for them forever)."""
    check_model_sources(cfg)
    if not (local_ray and cfg.ray.use_gpu):
        return
    import torch

    found = torch.cuda.device_count()
    if found < cfg.ray.num_workers:
        raise ConfigError(f"ray.use_gpu: true asks for {cfg.ray.num_workers} GPU worker(s) (ray.num_workers) on a "
                          f"local Ray, but this machine has {found} CUDA device(s); set ray.use_gpu: false or join "
                          "a cluster with RAY_ADDRESS")


def check_model_sources(cfg: PipelineConfig) -> None:
    """`model.backbone_weights` is a file; `model.text_encoder` is a local folder written with save_pretrained or a
    hub id that transformers resolves (from its cache or the hub), checked here rather than in every worker."""
    m = cfg.model
    if m.backbone_weights is not None and not Path(m.backbone_weights).is_file():
        raise ConfigError(f"model.backbone_weights: expected a weights file (torchvision ResNet or official "
                          f"Swin/Video-Swin release), but {m.backbone_weights} does not exist (set it to null to "
                          "start from random weights)")
    local = resolve(m.text_encoder)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.text_encoder: {local} has no config.json; expected a folder written by "
                              "save_pretrained (or a hub id such as roberta-base)")
        return
    if not _looks_like_hub_id(m.text_encoder):
        raise ConfigError(f"model.text_encoder: {local} does not exist; expected a local folder written by "
                          "save_pretrained or a hub id such as roberta-base")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(m.text_encoder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.text_encoder: {m.text_encoder!r} is neither a local folder nor a hub model "
                          f"transformers can load here ({str(err).splitlines()[0]})") from None


def _looks_like_hub_id(name: str) -> bool:
    """"name" or "org/name" (letters, digits, "-", "_", "."), not a path such as ./x, /x or a/b/c."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and ".." not in name


def check_start_checkpoint(cfg: PipelineConfig) -> None:
    """The checkpoint a fine-tuning run starts from exists (read by the workers once training starts)."""
    start = cfg.start_checkpoint()
    if start is None or start.is_file():
        return
    if cfg.train.recipe == "pretrain_finetune":
        raise ConfigError(f"train.recipe: pretrain_finetune starts from the pretrain stage's model, but {start} does "
                          "not exist; run `dvc repro pretrain` (or python -m pipeline.train --stage pretrain) first")
    raise ConfigError(f"train.start_from: expected a checkpoint file (ours or an official BIFIT/ReferFormer .pth), "
                      f"but {start} does not exist")


def check_training_data(cfg: PipelineConfig, skip_log: Path | None = None) -> int:
    """List the training samples as the workers will (raises SampleError/ValueError naming the file, or records
    the skips with data.skip_bad_samples) and check that they fill at least one step. Returns the sample count."""
    from bifit.config import category_names
    from bifit.data import YTVOSDataset

    d = cfg.data  # the video part: Ref-YouTube-VOS-format data at data.root
    count, where = 0, []
    if cfg.trains_on_videos() and d.dataset == "a2d":
        from bifit.data.a2d import read_index
        from pipeline.train import a2d_train_root

        index = a2d_train_root(cfg) / "index_train.json"
        if not index.is_file():
            raise ConfigError(f"data.dataset: a2d trains on the A2D-Sentences train split, but {index} does not "
                              "exist; run `dvc repro preprocess@a2d` first")
        count, where = len(read_index(index)["samples"]), [str(index)]
    elif cfg.trains_on_videos():
        dataset = YTVOSDataset(d.root, "train", d.num_frames, categories=category_names(d.categories),
                               skip_bad_samples=d.skip_bad_samples, skip_log=skip_log)
        if dataset.skipped:
            log.warning("%d training entries skipped while listing (data.skip_bad_samples), recorded in %s",
                        len(dataset.skipped), skip_log)
        count, where = len(dataset), [str(d.root)]
    if cfg.image_datasets():
        from bifit.data.refcoco import annotation_path, read_entries
        from pipeline.train import image_data_roots

        _, ann_root = image_data_roots(cfg)
        for name in cfg.image_datasets():
            path = annotation_path(ann_root, name, "train")
            if not path.is_file():
                raise ConfigError(f"datasets.refcoco.datasets: {name} is trained on, but {path} does not exist; run "
                                  "`dvc repro preprocess@refcoco` (it converts the refer release there)")
            count += len(read_entries(path))
            where.append(str(path))
    per_step = cfg.ray.num_workers * cfg.train.batch_size
    if count < per_step:
        raise ConfigError(f"train.batch_size: {count} training samples in {', '.join(where)} cannot fill one step of "
                          f"train.batch_size ({cfg.train.batch_size}) x ray.num_workers ({cfg.ray.num_workers})")
    return count
