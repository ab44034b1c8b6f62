"""DVC stages `train` and `pretrain`: BIFIT on Ray Train (DDP: gloo on CPU, nccl on GPU), logged to MLflow, resumable.

    python -m pipeline.train [--params params.yaml] [--stage {train,pretrain}]

What is trained (`train.recipe`): `scratch` trains on the Ref-YouTube-VOS-format set at `data.root` from random
weights (or from `train.start_from`); `pretrain_finetune` first runs the pretrain stage (RefCOCO/+/g pseudo-videos,
`datasets.refcoco.datasets`, with `pretrain.overrides`; output `paths.pretrained`/bifit.pth), whose model the train
stage then fine-tunes; `joint` trains on the videos and the image datasets concatenated. A run that starts from a
checkpoint drops its class heads and loads the rest strictly (bifit.loading.load_start_weights), listing both in the
run's events. With another recipe the pretrain stage trains nothing and says so (`NOT_USED.txt`, `used: 0`).

Checkpoints: every epoch, rank 0 writes `runs/<stage>/<config hash>/epoch_NNNN.pth` atomically and
reports it to Ray Train. A rerun with the same settings resumes from the newest readable checkpoint
(Ray's own restored checkpoint first, then that folder); a corrupt file is skipped with a warning.
The final model is written to `paths.model` (pretrain: `paths.pretrained`/bifit.pth), a DVC output: the last
weights, or with `train.ema_decay` > 0 their moving average (bifit/ema.py; every checkpoint holds both).

MLflow (pipeline/tracking.py): the run is RUNNING while the stage trains, FINISHED once the final model is logged
(the checkpoint as `model/bifit.pth` and as the pyfunc model `bifit`), FAILED when the stage raises; the workers
log to it by run id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bifit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bifit.config import flatten, to_dict
from pipeline import tracking
from pipeline.config import PipelineConfig, load_pipeline_config, resolve
from pipeline.faults import (
    SKIP_LOG_FILE,
    append_event,
    clear_fatal,
    fatal_error,
    is_deterministic,
    raised_in,
    read_fatal,
    unwrap_worker_error,
    write_fatal,
)

log = logging.getLogger("pipeline.train")
CKPT_GLOB = "epoch_*.pth"
LOSS_HEADER = "step,epoch,loss,loss_mask,loss_dice\n"


def truncate_loss_csv(path: Path, last_step: int) -> None:
    """Keep the rows up to the step we resume from (later ones will be trained again), as written: the header, then
    every whole row (all its fields and the newline; not the last line of a process killed mid-write) of a step
    <= `last_step`. Replaced atomically, so a kill here loses no row."""
    lines = path.read_text().splitlines(keepends=True)[1:] if path.exists() else []
    width = LOSS_HEADER.count(",") + 1
    kept = [line for line in lines if line.endswith("\n") and len(fields := line.split(",")) == width
            and fields[0].isdigit() and int(fields[0]) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(LOSS_HEADER + "".join(kept))
    os.replace(tmp, path)


def run_dir(cfg: PipelineConfig) -> Path:
    """runs/<stage>/<training hash>: the resumable run folder of these settings."""
    return resolve(cfg.paths.runs) / cfg.stage / cfg.training_hash()


def latest_checkpoint(folder: Path) -> dict | None:
    """Newest readable checkpoint in `folder`; unreadable ones are reported and skipped."""
    for path in sorted(folder.glob(CKPT_GLOB), reverse=True):
        try:
            ckpt = load_checkpoint(path)
            ckpt["path"] = str(path)
            return ckpt
        except (CheckpointError, OSError, RuntimeError) as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


# ---------------------------------------------------------------------------------------------------------------
# worker side


def _build(cfg: PipelineConfig):
    from transformers import AutoTokenizer

    from bifit.models import build_model
    from bifit.models.criterion import build_criterion

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.text_encoder)
    return tokenizer, build_model(cfg.model), build_criterion(cfg)


def _dataset(cfg: PipelineConfig, skip_log: Path | None = None):
    """The stage's training set: the Ref-YouTube-VOS clips (train stage), the RefCOCO/+/g pseudo-videos (pretrain
    stage), or both concatenated (train.recipe: joint)."""
    from bifit.data import ResizeConfig, make_train_transforms

    d = cfg.data
    transforms = make_train_transforms(ResizeConfig.from_data_config(d), photometric=d.photometric)
    images = [_image_dataset(cfg, name, transforms) for name in cfg.image_datasets()]
    if not cfg.trains_on_videos():
        if len(images) == 1:
            return images[0]
        from bifit.data.refcoco import JointDataset

        return JointDataset(images)
    videos = _video_dataset(cfg, transforms, skip_log)
    if not images:
        return videos
    from bifit.data.refcoco import build_joint

    return build_joint(videos, images)


def _video_dataset(cfg: PipelineConfig, transforms, skip_log: Path | None):
    """Ref-YouTube-VOS clips at data.root, or (data.dataset: a2d) the A2D-Sentences train split of the preprocess
    output, one annotated frame per clip."""
    from bifit.config import category_names
    from bifit.data import YTVOSDataset

    d = cfg.data
    if d.dataset == "a2d":
        from bifit.data.a2d import A2DDataset

        return A2DDataset(a2d_train_root(cfg), "train", d.num_frames, transforms=transforms, train=True,
                          skip_bad_samples=d.skip_bad_samples)
    categories = category_names(d.categories)
    held_out = []
    proxy = cfg.datasets.ytvos_proxy  # the local-proxy videos (bifit/eval/ytvos_proxy.py) stay unseen
    if proxy.exclude_from_training:
        from bifit.eval.ytvos_proxy import proxy_videos

        held_out = proxy_videos(d.root, proxy.fraction)
    return YTVOSDataset(d.root, "train", d.num_frames, transforms=transforms, categories=categories,
                        skip_bad_samples=d.skip_bad_samples, skip_log=skip_log,
                        expressions_per_clip=d.expressions_per_clip, exclude_videos=held_out)


def a2d_train_root(cfg: PipelineConfig) -> Path:
    """The preprocess@a2d output (index_train.json and the masks) that A2D-Sentences training reads."""
    return resolve(cfg.datasets.prepared) / "a2d"


def image_data_roots(cfg: PipelineConfig) -> tuple[Path, Path]:
    """(COCO images folder, converted annotations root) of RefCOCO/+/g: the raw root's train2014 and the
    preprocess@refcoco output."""
    return resolve(cfg.datasets.refcoco.root) / "train2014", resolve(cfg.datasets.prepared) / "refcoco"


def _image_dataset(cfg: PipelineConfig, name: str, transforms):
    from bifit.data.refcoco import RefCOCODataset

    image_root, ann_root = image_data_roots(cfg)
    return RefCOCODataset(resolve(cfg.datasets.refcoco.root), name, "train", cfg.data.num_frames,
                          transforms=transforms, train=True, image_root=image_root, ann_root=ann_root,
                          skip_bad_samples=cfg.data.skip_bad_samples)


def _loader(cfg: PipelineConfig, dataset, world: int, rank: int):
    """(sampler with set_epoch, DataLoader): independent clips (DistributedSampler, official) or, with
    data.batch_grouping: video, batches of one video's expressions about different objects.

    Every item is drawn from (train.seed, rank, epoch, dataset index) (bifit.data.samplers.PerSampleSeeded): the
    same clips and augmentations with any data.num_workers, and in an epoch restarted from a checkpoint although
    persistent workers carry their random state across epochs; the loader's own generator keeps it from drawing
    from the training loop's torch stream."""
    from torch.utils.data import DataLoader, DistributedSampler

    from bifit.data import collate_fn
    from bifit.data.samplers import EpochIndices, PerSampleSeeded, VideoGroupedBatchSampler

    # pinned batches let batch_inputs copy to the GPU without blocking the host
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   pin_memory=cfg.ray.use_gpu and torch.cuda.is_available(),
                   generator=torch.Generator().manual_seed(cfg.train.seed))
    seeded = PerSampleSeeded(dataset, cfg.train.seed, rank)
    if cfg.data.batch_grouping == "video":
        sampler = VideoGroupedBatchSampler(dataset.samples, cfg.train.batch_size, world, rank, cfg.train.seed)
        return sampler, DataLoader(seeded, batch_sampler=EpochIndices(sampler), collate_fn=collate_fn, **workers)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    return sampler, DataLoader(seeded, batch_size=cfg.train.batch_size, sampler=EpochIndices(sampler),
                               collate_fn=collate_fn, drop_last=True, **workers)


@dataclass
class _Worker:
    """One Ray Train worker's training, from set-up to the last epoch."""

    cfg: PipelineConfig
    rank: int
    world: int
    folder: Path  # the run folder: checkpoints, events, skip log
    loss_csv: Path
    run_id: str | None  # the MLflow run; rank 0 logs to it
    log_metrics: Callable | None  # rank 0 with an MLflow run: tracking.metric_logger
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_epoch: int = 0
    global_step: int = 0
    skipped_nonfinite: int = 0  # run totals, carried over by the checkpoints
    redrawn: int = 0  # clips redrawn for lack of a valid frame (summed over ranks and DataLoader workers)
    sampler: Any = None  # with the loader, set by _distribute
    loader: Any = None
    steps_per_epoch: int = 0
    ema: Any = None  # rank 0 with train.ema_decay > 0: bifit.ema.ModelEMA (every rank holds the same weights)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: set up, resume, distribute, then per epoch: train, checkpoint (rank 0),
    report. An error a retry would raise again (faults.is_deterministic: bad data, settings or checkpoint, a
    non-finite loss, a model file that cannot be loaded) is recorded by the rank that hit it (faults.write_fatal,
    first one wins) before it propagates: the worker group Ray Train restarts then ends at once, and the driver
    raises the recorded error. Other errors (a lost worker or node) are retried from the last checkpoint."""
    if read_fatal(config["run_dir"]) is not None:  # stopped for good earlier in this run: a retry would repeat it
        return
    try:
        worker = _set_up(config)
        _resume(worker)
        _distribute(worker)
        for epoch in range(worker.start_epoch, worker.cfg.train.epochs):
            metrics = _train_epoch(worker, epoch)
            checkpoint = _save_checkpoint(worker, epoch, metrics) if worker.rank == 0 else None
            _report(worker, epoch, metrics, checkpoint)
    except Exception as err:
        if is_deterministic(err, building_model=raised_in(err, _build)):
            import ray.train

            try:
                write_fatal(config["run_dir"], err, ray.train.get_context().get_world_rank())
            except OSError as failed:  # the run folder unwritable: Ray retries, and the error itself still shows
                err.add_note(f"(could not record it in {config['run_dir']}: {failed})")
        raise


def _set_up(config: dict) -> _Worker:
    """Seeds, threads, the model on this worker's device, criterion, optimizer and (rank 0) the MLflow logger."""
    import ray.train
    import ray.train.torch

    from bifit.engine import build_optimizer, set_deterministic

    cfg: PipelineConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.deterministic:
        set_deterministic()
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    random.seed(cfg.train.seed + rank)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    tokenizer, model, criterion = _build(cfg)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    run_id = config.get("mlflow_run_id")
    log_metrics = tracking.metric_logger(config.get("mlflow_uri") or cfg.mlflow.resolved_uri(), run_id,
                                         cfg.mlflow.log_every_steps) if rank == 0 else None
    return _Worker(cfg=cfg, rank=rank, world=world, folder=Path(config["run_dir"]), loss_csv=Path(config["loss_csv"]),
                   run_id=run_id, log_metrics=log_metrics, device=device, tokenizer=tokenizer, model=model,
                   criterion=criterion, optimizer=optimizer, scheduler=scheduler)


def _resume(w: _Worker) -> None:
    """Continue from the newest readable checkpoint, if any (the run folder's or Ray's copy): weights, optimizer,
    scheduler, step, run totals. Rank 0 keeps the loss-CSV rows up to the step resumed from, wherever the
    checkpoint came from (none without one: training starts again at step 1), and records a `start` or `resume`
    event."""
    ckpt = _newest_checkpoint(w)
    start = w.cfg.start_checkpoint() if ckpt is None else None
    if start is not None:  # a new run of a fine-tuning recipe: the pretrained weights minus the class heads
        from bifit.loading import load_start_weights

        report = load_start_weights(w.model, start, text_encoder_fallback=w.cfg.model.text_encoder)
        if w.rank == 0:
            print(f"[bifit] {report.summary()}", flush=True)
            append_event(w.folder, "start_weights", path=str(start), dropped=report.dropped,
                         kept_initialisation=report.kept_initialisation, loaded=report.loaded)
    if ckpt is not None:
        w.model.load_state_dict(ckpt["model"])
        w.optimizer.load_state_dict(ckpt["optimizer"])
        w.scheduler.load_state_dict(ckpt["lr_scheduler"])
        w.start_epoch, w.global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        w.skipped_nonfinite = ckpt.get("skipped_nonfinite_batches", 0)
        w.redrawn = ckpt.get("redrawn_samples", 0)
        if w.rank == 0:
            print(f"[bifit] resuming from {ckpt['path']} (epoch {ckpt['epoch'] + 1} done)", flush=True)
    if w.rank == 0 and w.cfg.train.ema_decay > 0:
        from bifit.ema import ModelEMA

        w.ema = ModelEMA(w.model, w.cfg.train.ema_decay)  # from the weights training starts or resumes from
        if ckpt is not None and "ema" in ckpt:
            w.ema.load_state_dict(ckpt["ema"])
        elif ckpt is not None:
            print(f"[bifit] {ckpt['path']} holds no weight average: it restarts from the resumed weights", flush=True)
    if w.rank == 0:
        truncate_loss_csv(w.loss_csv, w.global_step)
        append_event(w.folder, "resume" if ckpt else "start", epoch=w.start_epoch, global_step=w.global_step,
                     checkpoint=ckpt and ckpt["path"], world_size=w.world)


def _newest_checkpoint(w: _Worker) -> dict | None:
    """The run folder's newest readable checkpoint, or Ray's restored one when that is newer (rank 0 then copies
    it into the run folder)."""
    import ray.train

    ckpt = latest_checkpoint(w.folder)
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is None:
        return ckpt
    with ray_ckpt.as_directory() as d:
        restored = latest_checkpoint(Path(d))
        if restored is None or (ckpt is not None and restored["epoch"] <= ckpt["epoch"]):
            return ckpt
        if w.rank == 0:
            copy = w.folder / Path(restored["path"]).name
            entries = {k: v for k, v in restored.items() if k not in ("format", "model", "config", "path")}
            save_checkpoint(copy, restored["model"], restored["config"], **entries)
            restored["path"] = str(copy)
        return restored


def _distribute(w: _Worker) -> None:
    """DDP from the resumed weights, and this rank's share of the training data."""
    import ray.train.torch

    w.model = ray.train.torch.prepare_model(w.model)
    dataset = _dataset(w.cfg, skip_log=w.folder / SKIP_LOG_FILE)
    w.sampler, w.loader = _loader(w.cfg, dataset, w.world, w.rank)
    limit = w.cfg.train.max_steps_per_epoch
    w.steps_per_epoch = len(w.loader) if limit is None else min(len(w.loader), limit)


def _train_epoch(w: _Worker, epoch: int) -> dict:
    """One epoch on this rank; returns its metrics with the run totals. A non-finite loss (not skipped) stops the
    run for good: every rank raises the same gathered NonFiniteLossError, recorded by train_loop_per_worker."""
    from bifit.engine import seed_epoch, train_one_epoch

    cfg = w.cfg
    w.sampler.set_epoch(epoch)
    seed_epoch(cfg.train.seed, w.rank, epoch)  # a restarted epoch replays the uninterrupted run's draws
    on_step, close = _step_logger(w, epoch)
    stats = train_one_epoch(w.model, w.criterion, w.loader, w.optimizer, w.tokenizer, w.device, epoch,
                            cfg.train.clip_max_norm, max_steps=cfg.train.max_steps_per_epoch,
                            skip_nonfinite=cfg.train.skip_nonfinite_batches, amp=cfg.train.amp,
                            on_step=on_step, global_step=w.global_step, ema=w.ema)
    close()
    w.global_step = stats["global_step"]
    w.scheduler.step()
    return _epoch_metrics(w, stats)


def _step_logger(w: _Worker, epoch: int):
    """(on_step, close) for one epoch: on rank 0 a progress bar, each step's values to MLflow and its losses to the
    loss CSV; nothing on the other ranks."""
    if w.rank != 0:
        return (lambda step, values: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=w.steps_per_epoch, desc=f"epoch {epoch + 1}/{w.cfg.train.epochs}", file=sys.stdout,
               mininterval=5, dynamic_ncols=False, ncols=100)

    def on_step(step, values):
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
        if w.log_metrics:
            w.log_metrics(step, values)
        with w.loss_csv.open("a") as fh:
            fh.write(f"{step},{epoch},{values['loss']:.6f},{values['loss_mask']:.6f},{values['loss_dice']:.6f}\n")

    return on_step, bar.close


def _epoch_metrics(w: _Worker, stats: dict) -> dict:
    """The epoch's numbers as `train_*`, the throughput of all ranks, and the run totals of skipped non-finite
    batches, skipped samples (the skip log) and redrawn clips (also logged to MLflow)."""
    from bifit.data.ytvos import read_skip_log

    metrics = {f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
    metrics["clips_per_s_total"] = stats["clips_per_s"] * w.world
    w.skipped_nonfinite += stats["skipped_steps"]
    metrics["skipped_nonfinite_batches"] = w.skipped_nonfinite
    metrics["skipped_samples"] = len(read_skip_log(w.folder / SKIP_LOG_FILE))
    w.redrawn += stats["redrawn_samples"]  # already summed over ranks and DataLoader workers
    metrics["redrawn_samples"] = w.redrawn
    return metrics


def _save_checkpoint(w: _Worker, epoch: int, metrics: dict) -> Path:
    """Rank 0: `epoch_NNNN.pth` in the run folder (bifit.checkpoint.save_checkpoint: written atomically); the model
    and config, and everything else a resume needs."""
    path = w.folder / f"epoch_{epoch:04d}.pth"
    extra = {"ema": w.ema.state_dict()} if w.ema is not None else {}
    save_checkpoint(path, w.model, to_dict(w.cfg), **extra, optimizer=w.optimizer.state_dict(),
                    lr_scheduler=w.scheduler.state_dict(), epoch=epoch, global_step=w.global_step, metrics=metrics,
                    mlflow_run_id=w.run_id, skipped_nonfinite_batches=w.skipped_nonfinite, redrawn_samples=w.redrawn)
    return path


def _report(w: _Worker, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
    """The epoch's metrics to Ray Train; rank 0 also logs them (and the run totals) to MLflow, prints a line and
    hands Ray Train the checkpoint (hard-linked into its upload folder on the same file system, else copied)."""
    import ray.train

    if checkpoint is None:
        ray.train.report(metrics)
        return
    if w.log_metrics:
        w.log_metrics(w.global_step, {"skipped_nonfinite_batches": w.skipped_nonfinite,
                                      "skipped_samples": metrics["skipped_samples"], "redrawn_samples": w.redrawn})
        w.log_metrics(w.global_step, {f"epoch_{k}": v for k, v in metrics.items()}, flush=True)
    print(f"[bifit] epoch {epoch + 1}: loss {metrics.get('train_loss', float('nan')):.4f}, "
          f"{metrics['clips_per_s_total']:.2f} clips/s; checkpoint {checkpoint}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.link(checkpoint, Path(tmp) / checkpoint.name) if _same_fs(checkpoint, tmp) else shutil.copy(checkpoint, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _same_fs(a: Path, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# driver side


def start_mlflow_run(cfg: PipelineConfig, folder: Path) -> tuple[str, bool]:
    """(run id, whether this stage ends the run) of this training's MLflow run, RUNNING from here on.

    A rerun of the stage resumes its run (marked RUNNING again). A run folder whose id file another stage wrote (a
    sweep's trial, pipeline.tune, which ends that run itself) logs into that run and leaves its status alone. A run
    id the tracking store does not know (a new store) is replaced by a new run, with a warning."""
    uri = cfg.mlflow.resolved_uri()
    id_file = folder / "mlflow_run_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
        try:
            owned = tracking.run_tags(uri, run_id).get("stage") == cfg.stage
        except tracking.RunNotFound as err:
            log.warning("%s (from %s): starting a new MLflow run", err, id_file)
        else:
            if owned:
                tracking.set_status(uri, run_id, "RUNNING")
            return run_id, owned
    run_id = tracking.create_run(uri, cfg.mlflow.experiment, resolve(cfg.mlflow.artifact_location),
                                 run_name=f"{cfg.stage}-{cfg.training_hash()}", params=flatten(cfg.training_dict()),
                                 tags={"stage": cfg.stage, "recipe": cfg.train.recipe, "config_hash": cfg.training_hash(),
                                       "inter_frame_layers": cfg.model.inter_frame_layers,
                                       "bidirectional_vl": cfg.model.bidirectional_vl})
    id_file.write_text(run_id)
    return run_id, True


def run_training(cfg: PipelineConfig, ray_init_kwargs: dict | None = None, end_run: bool = True) -> dict:
    """Train on Ray Train from the newest readable checkpoint of the run folder to `train.epochs`; returns
    {final (checkpoint), run_id, seconds, folder, loss_csv}.

    The MLflow run is RUNNING while this trains and FAILED when anything here raises (a worker's error, a Ray
    failure, an interrupt); it is FINISHED on return unless `end_run` is false (`main` ends it once the model is
    logged) or it is a sweep trial's run (ended by pipeline.tune)."""
    import ray
    from ray.train import TrainingFailedError

    from pipeline.preflight import check_local_resources, check_start_checkpoint, check_training_data

    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    # before Ray starts and before an MLflow run is made: settings this machine cannot run, broken metadata
    check_local_resources(cfg, local_ray=not ray.is_initialized() and not cfg.ray.resolved_address())
    check_training_data(cfg, skip_log=folder / SKIP_LOG_FILE)
    check_start_checkpoint(cfg)
    clear_fatal(folder)
    append_event(folder, "driver_start", pid=os.getpid())
    uri = cfg.mlflow.resolved_uri()
    run_id, owned = start_mlflow_run(cfg, folder)
    with tracking.run_status(uri, run_id, finish=end_run, enabled=owned):
        loss_csv = folder / "loss.csv"
        if not loss_csv.exists() or loss_csv.stat().st_size == 0:  # rows kept: the workers' _resume truncates them
            loss_csv.write_text(LOSS_HEADER)  # to the checkpoint they resume from (the run folder's or Ray's copy)
        log.info("run folder %s; MLflow run %s at %s (browse: mlflow ui --backend-store-uri %s)", folder, run_id,
                 uri, uri)
        started_here = _start_ray(cfg, ray_init_kwargs)
        t0 = time.time()
        try:
            result = _trainer(cfg, folder, run_id, loss_csv).fit()
        except TrainingFailedError as err:  # the recorded or the worker's own error (file, step, key), not Ray's
            fatal = read_fatal(folder)
            raise (fatal_error(fatal, folder) if fatal else unwrap_worker_error(err, folder) or err) from None
        finally:
            if started_here:
                ray.shutdown()
        final = _final_checkpoint(cfg, folder, result)
        seconds = time.time() - t0
    return {"final": final, "run_id": run_id, "seconds": seconds, "folder": folder, "loss_csv": loss_csv}


def _start_ray(cfg: PipelineConfig, ray_init_kwargs: dict | None) -> bool:
    """Start a local Ray, or join `ray.address` / RAY_ADDRESS, unless Ray is running in this process already;
    returns whether it was started here."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(ray_init_kwargs or {})
    address = cfg.ray.resolved_address()
    if address:
        kwargs["address"] = address
    else:
        # one logical CPU more than the workers take, for Ray Train's controller actors
        kwargs.setdefault("num_cpus", cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", True)
    ray.init(**kwargs)
    return True


def _trainer(cfg: PipelineConfig, folder: Path, run_id: str, loss_csv: Path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "run_dir": str(folder), "mlflow_run_id": run_id,
                           "loss_csv": str(loss_csv), "mlflow_uri": cfg.mlflow.resolved_uri()},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(name=f"bifit-{cfg.stage}-{cfg.training_hash()}",
                             storage_path=str(resolve(cfg.ray.storage_path)),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )


def _final_checkpoint(cfg: PipelineConfig, folder: Path, result) -> dict:
    """The last epoch's checkpoint; raises the workers' fatal record (a restarted worker group found it and stopped
    without training), or a RuntimeError when training stopped early."""
    fatal = read_fatal(folder)
    if fatal is not None:
        raise fatal_error(fatal, folder)
    final = latest_checkpoint(folder)
    if final is None or final["epoch"] != cfg.train.epochs - 1:
        raise RuntimeError(f"training did not finish: newest checkpoint in {folder} is "
                           f"{final and final['path']}; Ray result error: {getattr(result, 'error', None)}")
    return final


def stage_outputs(cfg: PipelineConfig) -> dict[str, Path]:
    """The DVC outputs of a training stage: model, metrics JSON, loss-curve CSV."""
    metrics, plots = resolve(cfg.paths.metrics), resolve(cfg.paths.plots)
    if cfg.stage == "pretrain":
        return {"model": resolve(cfg.paths.pretrained) / "bifit.pth", "metrics": metrics / "pretrain.json",
                "loss": plots / "pretrain_loss.csv"}
    return {"model": resolve(cfg.paths.model), "metrics": metrics / "train.json", "loss": plots / "train_loss.csv"}


def export(cfg: PipelineConfig, out: dict) -> None:
    """Write the DVC outputs (the final model, the stage's metrics, the loss curve) and log to the MLflow run the
    checkpoint (`model/bifit.pth`), the loss curve (`plots/`) and the pyfunc model `bifit` (pipeline/tracking.py).
    The run ends here: FINISHED, or FAILED when any of this raises."""
    final = out["final"]
    paths = stage_outputs(cfg)
    with tracking.active_run(cfg.mlflow.resolved_uri(), out["run_id"]):
        model_path = paths["model"]
        # with train.ema_decay > 0 the exported weights are the average (the checkpoints keep both)
        weights, kind = (final["ema"]["model"], "ema") if "ema" in final else (final["model"], "last")
        save_checkpoint(model_path, weights, final["config"], epoch=final["epoch"], mlflow_run_id=out["run_id"],
                        metrics=final["metrics"], weights=kind)
        for p in (paths["metrics"], paths["loss"]):
            p.parent.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in final["metrics"].items()}
        metrics["wall_seconds_this_run"] = out["seconds"]
        if cfg.stage == "pretrain":
            metrics["used"] = 1
            (model_path.parent / "NOT_USED.txt").unlink(missing_ok=True)  # left by a run with another recipe
        paths["metrics"].write_text(json.dumps(metrics, indent=1) + "\n")
        shutil.copy(out["loss_csv"], paths["loss"])
        tracking.log_artifact(model_path, "model")
        tracking.log_artifact(paths["loss"], "plots")
        model = tracking.log_bifit_model(model_path, cfg.model.text_encoder)
    log.info("final model %s (epoch %d); MLflow run %s, MLflow model %s", model_path, final["epoch"] + 1,
             out["run_id"], model.model_uri)


NOT_USED_NOTE = """The pretrain stage trains only with train.recipe: pretrain_finetune (params.yaml); this run's recipe is
{recipe}, so the train stage does not start from a pretrained model and nothing was trained here.
"""


def skip_pretraining(cfg: PipelineConfig, recipe: str) -> None:
    """The pretrain stage's outputs when the recipe does not pretrain: a note in the model folder, `used: 0` in its
    metrics and a loss CSV with only the header (DVC needs every declared output)."""
    paths = stage_outputs(cfg)
    folder = paths["model"].parent
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "NOT_USED.txt").write_text(NOT_USED_NOTE.format(recipe=recipe))
    for p in (paths["metrics"], paths["loss"]):
        p.parent.mkdir(parents=True, exist_ok=True)
    paths["metrics"].write_text(json.dumps({"used": 0}, indent=1) + "\n")
    paths["loss"].write_text(LOSS_HEADER)
    log.info("train.recipe is %s: no pretraining (%s)", recipe, folder / "NOT_USED.txt")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(resolve("params.yaml")))
    parser.add_argument("--stage", default="train", choices=("train", "pretrain"),
                        help="pretrain: the image-dataset stage of train.recipe pretrain_finetune")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_pipeline_config(args.params)  # every bad value is reported before Ray starts
    if args.stage == "pretrain" and loaded.train.recipe != "pretrain_finetune":
        skip_pretraining(loaded.for_stage("pretrain"), loaded.train.recipe)
        return
    cfg = loaded.for_stage(args.stage)
    out = run_training(cfg, end_run=False)  # the MLflow run stays RUNNING until export has logged the model
    export(cfg, out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:  # our errors name the file
        sys.exit(f"pipeline.train: {type(err).__name__}: {err}" + "".join(f"\n{n}" for n in getattr(err, "__notes__", [])))
