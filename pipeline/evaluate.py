"""DVC stage `evaluate`: whole-video inference on the valid split, J / F / J&F, and the same checkpoint
with the expressions shuffled between videos (a model that ignores language scores the same there).

    python -m pipeline.evaluate [--params params.yaml]

Writes metrics/ytvos.json (jf, j, f, jf_shuffled, ..., and how they were computed: `device`, `amp`),
plots/ytvos_per_video.csv, the predicted masks (`paths.predictions/<video>/<exp_id>/<frame>.png`, 0/255 "L" PNGs
at the original size) and logs the metrics (and the params `ytvos_eval_device`, `ytvos_eval_amp`) to the
training run in MLflow. Inference runs on `eval.device` (auto: the GPU when torch sees one) with `eval.amp`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bifit.checkpoint import load_checkpoint, load_state_dict_strict
from bifit.data import inference_expressions, load_gt_masks, load_video
from bifit.eval.davis import boundary_measure, region_similarity
from bifit.inference import inference_settings, predict_video, resolve_device
from pipeline.config import PipelineConfig, load_pipeline_config

log = logging.getLogger("pipeline.evaluate")


def shuffled_captions(expressions, seed: int) -> list[str]:
    """Each expression gets the caption of an expression of another video.

    Expressions are grouped by video (videos in a seeded order) and the captions rotated by the largest
    group size, which moves every caption to another video whenever no video holds over half of them.
    """
    videos = sorted({e.video for e in expressions})
    random.Random(seed).shuffle(videos)
    rank = {v: i for i, v in enumerate(videos)}
    order = sorted(range(len(expressions)), key=lambda i: (rank[expressions[i].video], i))
    largest = max(sum(e.video == v for e in expressions) for v in videos)
    shift = min(largest, len(order) - 1) if len(order) > 1 else 0
    shuffled, stayed = [""] * len(expressions), 0
    for k, i in enumerate(order):
        j = order[(k + shift) % len(order)]
        shuffled[i] = expressions[j].caption
        stayed += expressions[j].video == expressions[i].video
    if stayed:
        log.warning("shuffled control: %d of %d expressions kept a caption of their own video (one video holds "
                    "%d of them)", stayed, len(expressions), largest)
    return shuffled


def build_from_checkpoint(cfg: PipelineConfig, path: Path, device: torch.device | None = None):
    """(model in eval mode on `device`, tokenizer, checkpoint dict); device None: `eval.device` resolved (a
    missing GPU stops here, before the checkpoint is read)."""
    from transformers import AutoTokenizer

    from bifit.models import build_model

    device = device or resolve_device(cfg.eval.device)
    ckpt = load_checkpoint(path)
    model = build_model(cfg.model)
    load_state_dict_strict(model, ckpt["model"], f"checkpoint {path}")
    # moved once: every inference function runs where the model's parameters are
    return model.to(device).eval(), AutoTokenizer.from_pretrained(cfg.model.text_encoder), ckpt


def log_eval_settings(client, run_id: str, name: str, settings: dict) -> None:
    """`<name>_eval_device` / `<name>_eval_amp` as params of an MLflow run. MLflow params cannot change: a rerun
    computed another way records its values as tags of the same names instead, with a warning."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    values = {f"{name}_eval_{k}": str(v) for k, v in settings.items()}
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    except MlflowException as err:
        log.warning("run %s already records other evaluation settings (%s); this evaluation's are tags: %s",
                    run_id, err, values)
        for k, v in values.items():
            client.set_tag(run_id, k, v)


def save_masks(folder: Path, frames, masks: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(frames, masks.numpy()):
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(folder / f"{name}.png")


def evaluate(cfg: PipelineConfig, model, tokenizer, out_dir: Path | None, max_expressions: int | None = None):
    root = Path(cfg.data.root)
    expressions = inference_expressions(root, "valid")[:max_expressions]
    if any(e.obj_id is None for e in expressions):
        raise ValueError(f"{root}/meta_expressions/valid: expressions without obj_id have no local ground truth; "
                         "use the submission zip with the challenge server instead")
    # the expressions as written in the meta (not normalised), as the official inference tokenises them
    captions = {"": [e.caption for e in expressions], "_shuffled": shuffled_captions(expressions, cfg.train.seed)}
    rows, per_video = [], defaultdict(list)
    by_video = defaultdict(list)
    for i, e in enumerate(expressions):
        by_video[e.video].append(i)
    bar = tqdm(total=len(expressions), desc="evaluate", unit="expr")
    for video, idx in by_video.items():
        first = expressions[idx[0]]
        frames, orig_size = load_video(root, video, first.frames, "valid", short_side=cfg.data.eval_short_side)
        preds = {suffix: predict_video(model, tokenizer, frames, [caps[i] for i in idx], orig_size,
                                       cfg.eval.num_frames or None, cfg.eval.threshold, cfg.eval.batch_expressions,
                                       cfg.eval.amp)
                 for suffix, caps in captions.items()}
        for k, i in enumerate(idx):
            e = expressions[i]
            gt = load_gt_masks(root, e.video, e.frames, e.obj_id, "valid").bool().numpy()
            row = {"video": e.video, "exp_id": e.exp_id}
            for suffix, pred in preds.items():
                masks = pred[k].masks.numpy()
                j = float(np.mean(region_similarity(gt, masks)))
                f = float(np.mean(boundary_measure(gt, masks)))
                row.update({f"j{suffix}": j, f"f{suffix}": f, f"jf{suffix}": (j + f) / 2})
            if out_dir is not None:
                save_masks(out_dir / e.video / e.exp_id, e.frames, preds[""][k].masks)
            rows.append(row)
            per_video[e.video].append(row["jf"])
            bar.update(1)
    bar.close()
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("jf", "j", "f", "jf_shuffled", "j_shuffled",
                                                              "f_shuffled")}
    metrics["jf_gain_over_shuffled"] = metrics["jf"] - metrics["jf_shuffled"]
    metrics["num_expressions"] = len(rows)
    metrics.update(inference_settings(model, cfg.eval.amp))
    return metrics, rows, {v: float(np.mean(s)) for v, s in per_video.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline_config(args.params)
    device = resolve_device(cfg.eval.device, f"{args.params}: eval.device")  # before any work
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer, ckpt = build_from_checkpoint(cfg, cfg.path("model"), device)
    metrics, rows, per_video = evaluate(cfg, model, tokenizer, cfg.path("predictions"))
    cfg.path("metrics").mkdir(parents=True, exist_ok=True)
    cfg.path("plots").mkdir(parents=True, exist_ok=True)
    (cfg.path("metrics") / "ytvos.json").write_text(json.dumps(metrics, indent=1) + "\n")
    with (cfg.path("plots") / "ytvos_per_video.csv").open("w") as fh:
        fh.write("video,jf\n")
        fh.writelines(f"{v},{s:.6f}\n" for v, s in sorted(per_video.items()))
    run_id = ckpt.get("mlflow_run_id")
    if run_id:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"ytvos_{k}": v for k, v in metrics.items()
                                if isinstance(v, int | float) and not isinstance(v, bool)})
            log_eval_settings(MlflowClient(), run_id, "ytvos", inference_settings(model, cfg.eval.amp))
            mlflow.log_artifact(str(cfg.path("plots") / "ytvos_per_video.csv"), artifact_path="plots")
    log.info("J&F %.4f (J %.4f, F %.4f); with shuffled expressions J&F %.4f (on %s, amp %s)", metrics["jf"],
             metrics["j"], metrics["f"], metrics["jf_shuffled"], metrics["device"], metrics["amp"])
    return metrics


if __name__ == "__main__":
    main()
