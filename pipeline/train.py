"""DVC stage `train`: BIFIT on Ray Train (DDP: gloo on CPU, nccl on GPU), logged to MLflow, resumable.

    python -m pipeline.train [--params params.yaml]

Checkpoints: every epoch, rank 0 writes `runs/train/<config hash>/epoch_NNNN.pth` atomically and
reports it to Ray Train. A rerun with the same settings resumes from the newest readable checkpoint
(Ray's own restored checkpoint first, then that folder); a corrupt file is skipped with a warning.
The final model is written to `paths.model` (a DVC output).
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
from pathlib import Path

import torch

from bifit.checkpoint import CheckpointError, atomic_save, load_checkpoint
from bifit.config import flatten, to_dict
from pipeline.config import REPO, PipelineConfig, load_pipeline_config
from pipeline.faults import (
    SKIP_LOG_FILE,
    append_event,
    clear_fatal,
    fatal_error,
    read_fatal,
    unwrap_worker_error,
    write_fatal,
)

log = logging.getLogger("pipeline.train")
CKPT_GLOB = "epoch_*.pth"
LOSS_HEADER = "step,epoch,loss,loss_mask,loss_dice\n"


def truncate_loss_csv(path: Path, last_step: int) -> None:
    """Keep the rows up to the step we resume from (later ones will be trained again)."""
    rows = path.read_text().splitlines()[1:] if path.exists() else []
    kept = [r for r in rows if r and int(r.split(",")[0]) <= last_step]
    path.write_text(LOSS_HEADER + "".join(r + "\n" for r in kept))


def run_dir(cfg: PipelineConfig) -> Path:
    return cfg.path("runs") / "train" / cfg.training_hash()


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
    from bifit.data import SYNTHETIC_CATEGORIES, ResizeConfig, YTVOSDataset, make_train_transforms

    d = cfg.data
    resize = ResizeConfig(scales=tuple(d.train_scales), max_size=d.max_size,
                          crop_resize_scales=tuple(d.crop_resize_scales), crop_min=d.crop_min, crop_max=d.crop_max)
    categories = SYNTHETIC_CATEGORIES if d.categories == "synthetic" else None
    dataset = YTVOSDataset(d.root, "train", d.num_frames,
                           transforms=make_train_transforms(resize, photometric=d.photometric), categories=categories,
                           skip_bad_samples=d.skip_bad_samples, skip_log=skip_log,
                           expressions_per_clip=d.expressions_per_clip)
    proxy = cfg.datasets.ytvos_proxy  # the local-proxy videos (bifit/eval/ytvos_proxy.py) stay unseen
    if proxy.exclude_from_training:
        from bifit.eval.ytvos_proxy import hold_out, proxy_videos

        hold_out(dataset, proxy_videos(d.root, proxy.fraction))
    return dataset


def _loader(cfg: PipelineConfig, dataset, world: int, rank: int):
    """(sampler with set_epoch, DataLoader): independent clips (DistributedSampler, official) or, with
    data.batch_grouping: video, batches of one video's expressions about different objects."""
    from torch.utils.data import DataLoader, DistributedSampler

    from bifit.data import collate_fn
    from bifit.data.samplers import VideoGroupedBatchSampler

    # pinned batches let batch_inputs copy to the GPU without blocking the host
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   pin_memory=cfg.ray.use_gpu and torch.cuda.is_available())
    if cfg.data.batch_grouping == "video":
        sampler = VideoGroupedBatchSampler(dataset.samples, cfg.train.batch_size, world, rank, cfg.train.seed)
        return sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **workers)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    return sampler, DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_fn,
                               drop_last=True, **workers)


def _mlflow_logger(cfg: PipelineConfig, run_id: str | None, tracking_uri: str | None = None):
    if run_id is None:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or cfg.mlflow.resolved_uri())
    buffer: list = []

    def log_metrics(step: int, values: dict, flush: bool = False):
        ts = int(time.time() * 1000)
        buffer.extend(Metric(k.replace("/", "_"), float(v), ts, step) for k, v in values.items())
        if flush or len(buffer) >= 200 or step % cfg.mlflow.log_every_steps == 0:
            client.log_batch(run_id, metrics=buffer[:])
            buffer.clear()

    return log_metrics


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from bifit.data.ytvos import read_skip_log
    from bifit.engine import (
        NonFiniteLossError,
        build_optimizer,
        seed_epoch,
        set_deterministic,
        train_one_epoch,
    )

    cfg: PipelineConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if read_fatal(config["run_dir"]) is not None:  # stopped for good earlier in this run: a retry would repeat it
        return
    if cfg.train.deterministic:
        set_deterministic()
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    seed = cfg.train.seed + rank
    random.seed(seed)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()

    tokenizer, model, criterion = _build(cfg)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    start_epoch, global_step = 0, 0
    folder = Path(config["run_dir"])
    ckpt = latest_checkpoint(folder)
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:  # Ray's restored checkpoint wins when it is newer than the run folder's
        with ray_ckpt.as_directory() as d:
            restored = latest_checkpoint(Path(d))
            if restored is not None and (ckpt is None or restored["epoch"] > ckpt["epoch"]):
                ckpt = restored
                if rank == 0:
                    copy = folder / Path(restored["path"]).name
                    atomic_save({k: v for k, v in restored.items() if k != "path"}, copy)
                    ckpt["path"] = str(copy)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        start_epoch, global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        if rank == 0:
            print(f"[bifit] resuming from {ckpt['path']} (epoch {ckpt['epoch'] + 1} done)", flush=True)
            truncate_loss_csv(Path(config["loss_csv"]), global_step)
    if rank == 0:
        append_event(folder, "resume" if ckpt else "start", epoch=start_epoch, global_step=global_step,
                     checkpoint=ckpt and ckpt["path"], world_size=world)
    skipped_nonfinite = ckpt.get("skipped_nonfinite_batches", 0) if ckpt else 0
    redrawn = ckpt.get("redrawn_samples", 0) if ckpt else 0  # clips redrawn for lack of a valid frame (run total)
    model = ray.train.torch.prepare_model(model)

    dataset = _dataset(cfg, skip_log=folder / SKIP_LOG_FILE)
    sampler, loader = _loader(cfg, dataset, world, rank)
    steps_per_epoch = len(loader) if cfg.train.max_steps_per_epoch is None else min(
        len(loader), cfg.train.max_steps_per_epoch)
    log_metrics = _mlflow_logger(cfg, config.get("mlflow_run_id"), config.get("mlflow_uri")) if rank == 0 else None
    loss_csv = Path(config["loss_csv"])

    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        seed_epoch(cfg.train.seed, rank, epoch)  # a restarted epoch replays the uninterrupted run's draws
        bar = None
        if rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", file=sys.stdout,
                       mininterval=5, dynamic_ncols=False, ncols=100)

        def on_step(step, values, bar=bar, epoch=epoch):
            if rank != 0:
                return
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            if log_metrics:
                log_metrics(step, values)
            with loss_csv.open("a") as fh:
                fh.write(f"{step},{epoch},{values['loss']:.6f},{values['loss_mask']:.6f},{values['loss_dice']:.6f}\n")

        try:
            stats = train_one_epoch(model, criterion, loader, optimizer, tokenizer, device, epoch,
                                    cfg.train.clip_max_norm, max_steps=cfg.train.max_steps_per_epoch,
                                    skip_nonfinite=cfg.train.skip_nonfinite_batches, amp=cfg.train.amp,
                                    on_step=on_step, global_step=global_step)
        except NonFiniteLossError as err:  # every rank raises the same gathered message
            if rank == 0:
                write_fatal(folder, err, rank)
            raise
        global_step = stats["global_step"]
        scheduler.step()
        metrics = {f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        metrics["clips_per_s_total"] = stats["clips_per_s"] * world
        skipped_nonfinite += stats["skipped_steps"]
        metrics["skipped_nonfinite_batches"] = skipped_nonfinite  # run totals, also logged to MLflow
        metrics["skipped_samples"] = len(read_skip_log(folder / SKIP_LOG_FILE))
        redrawn += stats["redrawn_samples"]  # already summed over ranks and DataLoader workers
        metrics["redrawn_samples"] = redrawn
        if rank == 0:
            bar.close()
            state = {"format": "bifit-checkpoint-v1", "model": getattr(model, "module", model).state_dict(),
                     "config": to_dict(cfg), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "global_step": global_step,
                     "metrics": metrics, "mlflow_run_id": config.get("mlflow_run_id"),
                     "skipped_nonfinite_batches": skipped_nonfinite, "redrawn_samples": redrawn}
            path = folder / f"epoch_{epoch:04d}.pth"
            atomic_save(state, path)
            if log_metrics:
                log_metrics(global_step, {"skipped_nonfinite_batches": skipped_nonfinite,
                                          "skipped_samples": metrics["skipped_samples"], "redrawn_samples": redrawn})
                log_metrics(global_step, {f"epoch_{k}": v for k, v in metrics.items()}, flush=True)
            print(f"[bifit] epoch {epoch + 1}: loss {stats.get('loss', float('nan')):.4f}, "
                  f"{metrics['clips_per_s_total']:.2f} clips/s; checkpoint {path}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                os.link(path, Path(tmp) / path.name) if _same_fs(path, tmp) else shutil.copy(path, tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _same_fs(a: Path, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# driver side


def start_mlflow_run(cfg: PipelineConfig, folder: Path) -> str:
    """The MLflow run of this training (reused when the stage resumes)."""
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    id_file = folder / "mlflow_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        cfg.mlflow.experiment, artifact_location=(REPO / cfg.mlflow.artifact_location).as_uri())
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{cfg.training_hash()}") as run:
        params = flatten(cfg.training_dict())
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.set_tags({"stage": "train", "config_hash": cfg.training_hash(),
                         "inter_frame_layers": cfg.model.inter_frame_layers,
                         "bidirectional_vl": cfg.model.bidirectional_vl})
    id_file.write_text(run.info.run_id)
    return run.info.run_id


def run_training(cfg: PipelineConfig, ray_init_kwargs: dict | None = None) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.preflight import check_local_resources, check_training_data

    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    # before Ray starts and before an MLflow run is made: settings this machine cannot run, broken metadata
    check_local_resources(cfg, local_ray=not ray.is_initialized() and not cfg.ray.resolved_address())
    check_training_data(cfg, skip_log=folder / SKIP_LOG_FILE)
    clear_fatal(folder)
    append_event(folder, "driver_start", pid=os.getpid())
    run_id = start_mlflow_run(cfg, folder)
    loss_csv = folder / "loss.csv"
    if not loss_csv.exists() or latest_checkpoint(folder) is None:
        loss_csv.write_text(LOSS_HEADER)
    log.info("run folder %s; MLflow run %s at %s (browse: mlflow ui --backend-store-uri %s)", folder, run_id,
             cfg.mlflow.resolved_uri(), cfg.mlflow.resolved_uri())

    address = cfg.ray.resolved_address()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = dict(ray_init_kwargs or {})
        if address:
            kwargs["address"] = address
        else:
            # one logical CPU more than the workers take, for Ray Train's controller actors
            kwargs.setdefault("num_cpus", cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1)
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("log_to_driver", True)
        ray.init(**kwargs)
    t0 = time.time()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg, "run_dir": str(folder), "mlflow_run_id": run_id,
                               "loss_csv": str(loss_csv), "mlflow_uri": cfg.mlflow.resolved_uri()},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            run_config=RunConfig(name=f"bifit-train-{cfg.training_hash()}",
                                 storage_path=str(REPO / cfg.ray.storage_path),
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
        )
        result = trainer.fit()
    except TrainingFailedError as err:  # the worker's own error (file, step, key), not Ray's wrapper
        raise (unwrap_worker_error(err, folder) or err) from None
    finally:
        if started_here:
            ray.shutdown()
    fatal = read_fatal(folder)
    if fatal is not None:  # a restarted worker group found the marker and stopped without training
        raise fatal_error(fatal, folder)
    final = latest_checkpoint(folder)
    if final is None or final["epoch"] != cfg.train.epochs - 1:
        raise RuntimeError(f"training did not finish: newest checkpoint in {folder} is "
                           f"{final and final['path']}; Ray result error: {getattr(result, 'error', None)}")
    return {"final": final, "run_id": run_id, "seconds": time.time() - t0, "folder": folder, "loss_csv": loss_csv}


def export(cfg: PipelineConfig, out: dict) -> None:
    """Write the DVC outputs: the final model, train metrics and the loss curve; log them to MLflow."""
    import mlflow

    final = out["final"]
    model_path = cfg.path("model")
    atomic_save({"format": final["format"], "model": final["model"], "config": final["config"],
                 "epoch": final["epoch"], "mlflow_run_id": out["run_id"], "metrics": final["metrics"]}, model_path)
    metrics_dir, plots_dir = cfg.path("metrics"), cfg.path("plots")
    metrics_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in final["metrics"].items()}
    metrics["wall_seconds_this_run"] = out["seconds"]
    (metrics_dir / "train.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.copy(out["loss_csv"], plots_dir / "train_loss.csv")
    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    with mlflow.start_run(run_id=out["run_id"]):
        mlflow.log_artifact(str(model_path), artifact_path="model")
        mlflow.log_artifact(str(plots_dir / "train_loss.csv"), artifact_path="plots")
    log.info("final model %s (epoch %d); MLflow run %s", model_path, final["epoch"] + 1, out["run_id"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)  # every bad value is reported before Ray starts
    out = run_training(cfg)
    export(cfg, out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as err:  # our errors name the file
        sys.exit(f"pipeline.train: {type(err).__name__}: {err}" + "".join(f"\n{n}" for n in getattr(err, "__notes__", [])))
