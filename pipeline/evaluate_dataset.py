"""DVC stage `evaluate@<name>`: one benchmark's inference, metrics file, plot and MLflow metrics.

    python -m pipeline.evaluate_dataset --dataset {ytvos,ytvos_proxy,davis,a2d,jhmdb,refcoco}
        [--params params.yaml] [--predictions DIR] [--plot CSV]

The model is `datasets.<name>.checkpoint`, built with the architecture it was trained with (`bifit.load_model`:
our checkpoints' saved config, official files' `args`; the `model` section only for an official file that records
no args), run on `eval.device` (auto: the GPU when torch sees one; cuda without one stops before the checkpoint is
read) with `eval.amp` (bfloat16 autocast).
Each writes `<paths.metrics>/<name>.json` (fractions in [0, 1]; `eval_seconds` is the wall time of this
evaluation; `device` and `amp` say how it was computed):

- ytvos: Ref-YouTube-VOS valid, whole-video inference (bifit/eval/ytvos.py). With local GT (the synthetic
  set) J, F, J&F and the shuffled-expression control (keys `jf`, `j`, `f`, `jf_shuffled`, ...); with the real
  data only the predicted masks for the submission zip (the package stage validates and zips them). Masks:
  `<predictions>/<video>/<exp_id>/<frame>.png`, 0/255 "L" PNGs at the original size.
- ytvos_proxy: the held-out training videos of bifit/eval/ytvos_proxy.py (the preprocess stage's list), J&F, by
  the same evaluator.
- davis: Ref-DAVIS17 val, 24-frame clips, the toolkit's unsupervised protocol (Hungarian matching) per annotator
  run, the four runs averaged (bifit/eval/ref_davis.py); `anno_<a>/<seq>/<frame>.png` and the toolkit CSVs in the
  predictions folder. No per-expression score: the unsupervised GT ids are not the expressions' objects.
- a2d / jhmdb: centred-clip inference and the A2D metrics with both mAP protocols (bifit/eval/a2d_engine.py;
  `mAP 0.5:0.95` is the paper's all-queries protocol). `size_mismatches`: samples whose mask size differs from
  their frames (the loader resizes the mask to the frames, as the official transforms do).
- refcoco: the val split of each dataset of `datasets.refcoco.datasets` (RefCOCO, RefCOCO+, RefCOCOg), every
  sentence an image scored alone (bifit/eval/refcoco.py): one object per dataset in the metrics file
  (`overall_iou`, `mean_iou`, `P@0.5` ... `P@0.9`, `num_samples`, `num_skipped`), and at the top level
  `overall_iou` / `mean_iou` = the unweighted mean of those datasets' values (`averaged_over` names them) and
  `num_samples` = their total. Predictions and per-sample CSVs in `<predictions>/<dataset>/`; the plot has one
  row per dataset and IoU threshold (`iou_threshold,precision,dataset`).

MLflow: the metrics, prefixed `<name>_`, go to the training run recorded in the checkpoint when the tracking
store has it, otherwise to a new run `evaluate-<name>` of the `mlflow.experiment`; the params `<name>_eval_device`
and `<name>_eval_amp` go with them. Nested metrics are flattened (`refcoco_refcocog_overall_iou`), with `+`
spelled `plus` (`refcoco_refcocoplus_mean_iou`), a character MLflow metric names cannot hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import torch

from bifit.inference import inference_settings, resolve_device
from pipeline import tracking
from pipeline.config import EVALUATIONS, IMAGE_DATASETS, PipelineConfig, load_pipeline_config, resolve
from pipeline.preprocess import prepared_root

log = logging.getLogger("pipeline.evaluate_dataset")

DEFAULT_OUTPUTS = {  # name -> (predictions folder next to paths.predictions, plot CSV in paths.plots)
    "ytvos": (None, "ytvos_per_video.csv"),  # None: paths.predictions itself (the package stage zips it)
    "ytvos_proxy": ("ytvos_proxy", "ytvos_proxy_per_video.csv"),
    "davis": ("davis_valid", "davis_per_video.csv"),
    "a2d": ("a2d_test", "a2d_precision.csv"),
    "jhmdb": ("jhmdb_test", "jhmdb_precision.csv"),
    "refcoco": ("refcoco_val", "refcoco_precision.csv"),
}


def default_outputs(cfg: PipelineConfig, name: str) -> tuple[Path, Path]:
    """(predictions folder, plot CSV) of an evaluation; dvc.yaml passes the same paths explicitly."""
    folder, plot = DEFAULT_OUTPUTS[name]
    pred = resolve(cfg.paths.predictions) if folder is None else resolve(cfg.paths.predictions).parent / folder
    return pred, resolve(cfg.paths.plots) / plot


def checkpoint_path(cfg: PipelineConfig, name: str) -> Path:
    return resolve(getattr(cfg.datasets, name).checkpoint)


def load_eval_model(cfg: PipelineConfig, path: Path, device: torch.device | None = None):
    """`bifit.load_model` for an evaluation (a `bifit.loading.LoadedModel`: model on `device`, its config,
    tokenizer, the checkpoint's other entries). The architecture is the checkpoint's; the settings take from
    params.yaml only `model.msda_backend`, `model.text_encoder` where the file names no text encoder available
    here (official files; ours trained on another machine) and, for an official file without `args` (e.g.
    ytvos_r50.pth), the `model` section (e.g. the paper overlay). device None: `eval.device` resolved."""
    from bifit import load_model

    try:
        return load_model(path, overrides={"msda_backend": cfg.model.msda_backend},
                          device=device or resolve_device(cfg.eval.device), architecture=cfg.model,
                          text_encoder_fallback=cfg.model.text_encoder)
    except FileNotFoundError as err:
        err.add_note("the checkpoint of an evaluation is datasets.<name>.checkpoint in params.yaml")
        raise


def write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------------------------
# one function per evaluation: (cfg, model, tokenizer, predictions folder, plot CSV) -> metrics


def eval_ytvos(cfg, model, tokenizer, pred_dir: Path, plot: Path) -> dict:
    from bifit.data.ytvos import NUM_VALID_VIDEOS
    from bifit.eval import ytvos
    from bifit.synthetic.ytvos import expression_kinds

    root, options = Path(cfg.data.root), ytvos.inference_options(cfg)
    if ytvos.has_local_ground_truth(root):
        metrics, result = ytvos.evaluate_valid(model, tokenizer, root, seed=cfg.train.seed, out_dir=pred_dir,
                                               **options)
        kinds = expression_kinds(root, "valid")  # the generated benchmark: scores per expression kind too
        if kinds is not None:
            metrics.update(result.mean_by_group(kinds, ("jf", "jf_shuffled")))
        write_rows(plot, ["video", "jf"], [[v, f"{s:.6f}"] for v, s in sorted(result.per_video().items())])
        return metrics
    # real Ref-YouTube-VOS: no local GT, only the masks of the 202 valid videos for the submission zip
    metrics = ytvos.predict_valid(model, tokenizer, root, pred_dir, expected_videos=NUM_VALID_VIDEOS, **options)
    write_rows(plot, ["video", "jf"], [])
    log.warning("Ref-YouTube-VOS valid has no public ground truth: masks written to %s for the submission zip "
                "(package stage); compare runs locally with the ytvos_proxy evaluation", pred_dir)
    return metrics


def eval_ytvos_proxy(cfg, model, tokenizer, pred_dir: Path, plot: Path) -> dict:
    from bifit.eval.ytvos import inference_options
    from bifit.eval.ytvos_proxy import PROXY_LIST_NAME, evaluate_proxy, read_video_list

    videos = read_video_list(prepared_root(cfg, "ytvos") / PROXY_LIST_NAME)
    metrics, result = evaluate_proxy(model, tokenizer, Path(cfg.data.root), videos, out_dir=pred_dir,
                                     skip_bad_samples=cfg.data.skip_bad_samples, **inference_options(cfg))
    write_rows(plot, ["video", "jf"], [[v, f"{s:.6f}"] for v, s in sorted(result.per_video().items())])
    metrics["held_out_of_training"] = int(cfg.datasets.ytvos_proxy.exclude_from_training)
    return metrics


def eval_davis(cfg, model, tokenizer, pred_dir: Path, plot: Path) -> dict:
    from bifit.eval.ref_davis import evaluate_ref_davis_model

    result = evaluate_ref_davis_model(model, tokenizer, prepared_root(cfg, "davis"), pred_dir,
                                      short_side=cfg.data.eval_short_side, clip_length=cfg.datasets.davis.clip_length,
                                      batch=cfg.eval.batch_expressions, skip_bad_samples=cfg.data.skip_bad_samples,
                                      amp=cfg.eval.amp)
    write_rows(plot, ["video", "jf"], [[s, f"{v:.6f}"] for s, v in result.per_sequence().items()])
    # left by older versions; it scored expressions against unsupervised ids, which name other objects
    (pred_dir / "per_expression.csv").unlink(missing_ok=True)
    return result.metrics()


A2D_LIKE_INDEX = {"a2d": "index_test.json", "jhmdb": "index.json"}  # the evaluated split's preprocess index


def count_size_mismatches(root: Path, name: str) -> int:
    """Evaluated samples whose mask size differs from their frames (sizes recorded by the preprocess stage)."""
    from bifit.data.a2d import read_index
    from bifit.prepare.a2d import size_mismatches

    ids = size_mismatches(read_index(root / A2D_LIKE_INDEX[name])["samples"])
    if ids:
        log.warning("%s: %d samples have a mask whose size differs from their frames (resized to the frames, as "
                    "the official transforms do), e.g. %s", name, len(ids), ids[:3])
    return len(ids)


def eval_a2d_like(name: str):
    def run(cfg, model, tokenizer, pred_dir: Path, plot: Path) -> dict:
        from bifit.eval import a2d_engine

        fn = a2d_engine.evaluate_a2d if name == "a2d" else a2d_engine.evaluate_jhmdb
        metrics = fn(model, tokenizer, prepared_root(cfg, name), cfg, pred_dir)
        metrics["size_mismatches"] = count_size_mismatches(prepared_root(cfg, name), name)
        write_rows(plot, ["iou_threshold", "precision"],
                   [[k, f"{metrics[f'P@{k}']:.6f}"] for k in (0.5, 0.6, 0.7, 0.8, 0.9)])
        return metrics

    return run


def eval_refcoco(cfg, model, tokenizer, pred_dir: Path, plot: Path) -> dict:
    """The val split of each dataset of `datasets.refcoco.datasets`: `{<dataset>: metrics, ...}` plus the
    unweighted mean over those datasets of `overall_iou` and `mean_iou` at the top level."""
    from bifit.data.refcoco import IMAGE_DIR
    from bifit.eval.a2d import PRECISION_THRESHOLDS
    from bifit.eval.refcoco import evaluate_refcoco
    from pipeline.download import dataset_root

    datasets = list(cfg.datasets.refcoco.datasets)
    raw, prepared = dataset_root(cfg, "refcoco"), prepared_root(cfg, "refcoco")
    metrics = {}
    for dataset in datasets:
        m = evaluate_refcoco(model, tokenizer, raw, dataset, "val", ann_root=prepared, image_root=raw / IMAGE_DIR,
                             short_side=cfg.data.eval_short_side, max_size=cfg.data.max_size,
                             batch_size=cfg.eval.batch_expressions, num_workers=cfg.data.num_workers,
                             skip_bad_samples=cfg.data.skip_bad_samples, amp=cfg.eval.amp,
                             out_dir=pred_dir / dataset)
        metrics[dataset] = m
    # one precision column per dataset (the plot's lines); a dataset not evaluated stays empty
    write_rows(plot, ["iou_threshold", *IMAGE_DATASETS],
               [[k, *(f"{metrics[d][f'P@{k}']:.6f}" if d in metrics else "" for d in IMAGE_DATASETS)]
                for k in PRECISION_THRESHOLDS])
    for key in ("overall_iou", "mean_iou"):  # over datasets, unweighted (each benchmark counts once)
        metrics[key] = sum(metrics[d][key] for d in datasets) / len(datasets)
    metrics["num_samples"] = sum(metrics[d]["num_samples"] for d in datasets)
    metrics["averaged_over"] = datasets
    return metrics


EVALUATORS = {"ytvos": eval_ytvos, "ytvos_proxy": eval_ytvos_proxy, "davis": eval_davis,
              "a2d": eval_a2d_like("a2d"), "jhmdb": eval_a2d_like("jhmdb"), "refcoco": eval_refcoco}


# ----------------------------------------------------------------------------------------------------------------


def mlflow_metrics(name: str, metrics: dict) -> dict:
    """`metrics` as MLflow metric names `<name>_<key>`: nested dicts flattened (`<name>_<key>_<subkey>`), `+`
    spelled `plus` (MLflow refuses it; `refcoco+` -> `refcocoplus`), only numbers kept."""
    out = {}
    for key, value in metrics.items():
        flat = f"{name}_{key}".replace("+", "plus")
        if isinstance(value, dict):
            out.update(mlflow_metrics(flat, value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[flat] = value
    return out


def log_to_mlflow(cfg: PipelineConfig, name: str, metrics: dict, run_id: str | None, checkpoint: Path,
                  artifacts: list[Path]) -> str:
    """The metrics (as `<name>_<key>`), `device` and `amp` (params `<name>_eval_device`, `<name>_eval_amp`) and the
    `artifacts` files of evaluation `name` into the training run `run_id`, else a new run (module docstring)."""
    source = getattr(cfg.datasets, "ytvos" if name == "ytvos_proxy" else name, None)
    return tracking.log_evaluation(
        cfg.mlflow.resolved_uri(), cfg.mlflow.experiment, resolve(cfg.mlflow.artifact_location), run_id, name,
        metrics=mlflow_metrics(name, metrics),
        settings={k: metrics[k] for k in ("device", "amp")},
        params={"checkpoint": str(checkpoint), "dataset": name, "source": getattr(source, "source", "unknown")},
        artifacts=artifacts)


def evaluate_dataset(cfg: PipelineConfig, name: str, predictions: Path | None = None, plot: Path | None = None,
                     use_mlflow: bool = True, source: str = "params.yaml") -> dict:
    """Run evaluation `name` on `eval.device` (`source`: the params file, named in errors)."""
    if name not in EVALUATIONS:
        raise KeyError(f"--dataset: expected one of {', '.join(EVALUATIONS)}, got {name!r}")
    device = resolve_device(cfg.eval.device, f"{source}: eval.device")  # a missing GPU stops before any work
    default_pred, default_plot = default_outputs(cfg, name)
    pred_dir, plot = Path(predictions or default_pred), Path(plot or default_plot)
    ckpt_path = checkpoint_path(cfg, name)
    start = time.perf_counter()
    loaded = load_eval_model(cfg, ckpt_path, device)
    metrics = EVALUATORS[name](cfg, loaded.model, loaded.tokenizer, pred_dir, plot)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    metrics.update(inference_settings(loaded.model, cfg.eval.amp))
    out = resolve(cfg.paths.metrics) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1) + "\n")
    if use_mlflow:
        log_to_mlflow(cfg, name, metrics, loaded.checkpoint.get("mlflow_run_id"), ckpt_path, [out, plot])
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", required=True, choices=EVALUATIONS)
    parser.add_argument("--predictions", type=Path, default=None, help="predictions folder (default per dataset)")
    parser.add_argument("--plot", type=Path, default=None, help="plot CSV (default per dataset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics = evaluate_dataset(cfg, args.dataset, args.predictions, args.plot, source=args.params)
    shown = {k: v for k, v in metrics.items() if k in ("jf", "j", "f", "mAP 0.5:0.95", "overall_iou", "mean_iou",
                                                       "eval_seconds", "num_expressions", "num_samples", "device",
                                                       "amp")}
    log.info("%s: %s", args.dataset, json.dumps(shown))
    return metrics


if __name__ == "__main__":
    main()
