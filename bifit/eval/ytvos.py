"""Ref-YouTube-VOS evaluation, the one evaluator of the evaluate
stages (``evaluate@ytvos``, ``evaluate@ytvos_proxy``), the sweep's trials and the notebooks.

- **Inference**: every expression of a video runs on the whole video (:func:`bifit.inference.predict_video`;
  ``window`` frames at a time when set), the frames resized so that the shorter side is ``short_side``. Each
  expression reaches the tokenizer as written in the meta (not normalised), as the official inference feeds it.
  Inference runs on the model's device; ``amp``: bfloat16 autocast, masks thresholded in float32.
- **Masks**: ``<out_dir>/<video>/<exp_id>/<frame>.png``, 0/255 ``"L"`` PNGs at the original frame size: the
  layout of the official submission (the package stage zips the valid split's folder under ``Annotations/``).
- **Scores**: J (region similarity) and F (boundary measure, no void) averaged over the frames of an expression
  (:func:`score_expression`), then over expressions; J&F = (J + F) / 2. This is how the challenge server
  averages the valid split, applied to local ground truth.
- **Shuffled-expression control** (:func:`shuffled_captions`): the same videos with every expression replaced
  by one of another video; a model that ignores language scores the same there (``jf_gain_over_shuffled``).

Entry points: :func:`evaluate_valid` (the valid split with local ground truth: the synthetic benchmark),
:func:`predict_valid` (the real valid split, which has no public ground truth: the masks only) and
:func:`evaluate_expressions` (any listed expressions, e.g. the held-out training videos of
:mod:`bifit.eval.ytvos_proxy`). :func:`inference_options` reads the settings from a config.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bifit.data.ytvos import (
    Expression,
    SampleError,
    expressions_path,
    inference_expressions,
    inference_videos,
    load_gt_masks,
    load_video,
)
from bifit.eval.davis import boundary_measure, region_similarity

log = logging.getLogger(__name__)
SHUFFLED = "_shuffled"  # suffix of the shuffled-expression control's scores
VALID_METRICS = ("jf", "j", "f", "jf_shuffled", "j_shuffled", "f_shuffled")


def inference_options(cfg) -> dict:
    """The inference settings of a :class:`bifit.config.Config`, as keyword arguments of the functions below:
    ``data.eval_short_side``, ``eval.num_frames`` (0 or null: the whole video), ``eval.threshold``,
    ``eval.batch_expressions`` and ``eval.amp``."""
    return dict(short_side=cfg.data.eval_short_side, window=cfg.eval.num_frames or None,
                threshold=cfg.eval.threshold, batch=cfg.eval.batch_expressions, amp=cfg.eval.amp)


def score_expression(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Frame-averaged J and F of one expression (gt, pred [T, H, W] bool) and their mean."""
    j = float(np.mean(region_similarity(gt, pred)))
    f = float(np.mean(boundary_measure(gt, pred)))
    return {"j": j, "f": f, "jf": (j + f) / 2}


def save_masks(folder, frames: Sequence[str], masks) -> None:
    """One 0/255 "L" PNG per frame, ``<folder>/<frame>.png`` (masks [T, H, W] bool, NumPy or a CPU tensor)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(frames, np.asarray(masks)):
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(folder / f"{name}.png")


def shuffled_captions(expressions: Sequence[Expression], seed: int) -> list[str]:
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


@dataclass
class YTVOSEvaluation:
    rows: list[dict]  # per predicted expression: video, exp_id (scored: j, f, jf; with the control: *_shuffled)
    num_videos: int  # videos predicted
    skipped: list[dict] = field(default_factory=list)  # {"file", "id", "reason"} of videos left out

    def mean(self, keys: Sequence[str]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in self.rows])) for k in keys}

    def mean_by_group(self, groups: dict[tuple[str, str], str], keys: Sequence[str]) -> dict[str, float]:
        """``{key}_{group}`` means and ``num_{group}`` counts over the rows of each group (``groups``: (video,
        exp_id) -> name, e.g. the generated benchmark's expression kinds); rows without a group are left out."""
        members: dict[str, list[dict]] = {}
        for r in self.rows:
            group = groups.get((r["video"], r["exp_id"]))
            if group is not None:
                members.setdefault(group, []).append(r)
        out = {}
        for group, rows in sorted(members.items()):
            out.update({f"{k}_{group}": float(np.mean([r[k] for r in rows])) for k in keys})
            out[f"num_{group}"] = len(rows)
        return out

    def per_video(self) -> dict[str, float]:
        """J&F per video: the mean over its expressions (videos in evaluation order)."""
        scores: dict[str, list[float]] = {}
        for r in self.rows:
            scores.setdefault(r["video"], []).append(r["jf"])
        return {v: float(np.mean(s)) for v, s in scores.items()}


def evaluate_expressions(model, tokenizer, root, split: str, expressions: Sequence[Expression], *,
                         short_side: int = 360, window: int | None = None, threshold: float = 0.5, batch: int = 8,
                         amp: bool = False, score: bool = True, shuffle_seed: int | None = None, out_dir=None,
                         skip_bad_samples: bool = False, progress: bool = True,
                         desc: str = "ytvos") -> YTVOSEvaluation:
    """Segment ``expressions`` (grouped by video, as :func:`bifit.data.ytvos.inference_expressions` lists them)
    of ``split`` at ``root``; the module docstring says how.

    score: compare each with its ground truth (every expression needs its ``obj_id``). shuffle_seed: also run
    the shuffled-expression control with this seed (scores ``*_shuffled``). out_dir: write the masks (of the
    expressions as written). A missing or corrupt frame or annotation raises
    :class:`~bifit.data.ytvos.SampleError` (file and ids named); with ``skip_bad_samples`` that video is left
    out and recorded instead.
    """
    from bifit.inference import predict_video  # torch-heavy; imported on use

    missing = [f"{e.video}/{e.exp_id}" for e in expressions if e.obj_id is None]
    if score and missing:
        hint = "; use the submission zip with the challenge server instead" if split == "valid" else ""
        raise ValueError(f"{expressions_path(root, split)}: expressions without obj_id have no local ground truth "
                         f"(e.g. {missing[:5]}){hint}")
    captions = {"": [e.caption for e in expressions]}
    if shuffle_seed is not None:
        captions[SHUFFLED] = shuffled_captions(expressions, shuffle_seed)
    by_video: dict[str, list[int]] = {}
    for i, e in enumerate(expressions):
        by_video.setdefault(e.video, []).append(i)
    rows, skipped, num_videos = [], [], 0
    bar = tqdm(total=len(expressions), desc=desc, unit="expr", disable=not progress)
    for video, idx in by_video.items():
        exps = [expressions[i] for i in idx]
        try:
            frames, orig_size = load_video(root, video, exps[0].frames, split, short_side=short_side)
            gts = [load_gt_masks(root, e.video, e.frames, e.obj_id, split).numpy() for e in exps] if score else []
        except SampleError as err:
            if not skip_bad_samples:
                raise
            skipped.append(err.record())
            bar.update(len(exps))
            continue
        preds = {suffix: predict_video(model, tokenizer, frames, [caps[i] for i in idx], orig_size, window,
                                       threshold, batch, amp)
                 for suffix, caps in captions.items()}
        num_videos += 1
        for k, e in enumerate(exps):
            row = {"video": e.video, "exp_id": e.exp_id}
            for suffix, pred in preds.items() if score else ():
                scores = score_expression(gts[k], pred[k].masks.numpy())
                row.update({f"{m}{suffix}": v for m, v in scores.items()})
            if out_dir is not None:
                save_masks(Path(out_dir) / e.video / e.exp_id, e.frames, preds[""][k].masks)
            rows.append(row)
            bar.update(1)
    bar.close()
    return YTVOSEvaluation(rows, num_videos, skipped)


def evaluate_valid(model, tokenizer, root, *, seed: int, out_dir=None, max_expressions: int | None = None,
                   progress: bool = True, **options) -> tuple[dict, YTVOSEvaluation]:
    """The valid split with local ground truth (the synthetic benchmark; the real one has none, see
    :func:`predict_valid`): J&F, J, F and the shuffled-expression control (``seed``) over its first
    ``max_expressions`` expressions (None: all). ``options``: :func:`inference_options`.

    Returns (metrics {"jf", "j", "f", "jf_shuffled", "j_shuffled", "f_shuffled", "jf_gain_over_shuffled",
    "num_expressions"}, the evaluation)."""
    expressions = inference_expressions(root, "valid")[:max_expressions]
    result = evaluate_expressions(model, tokenizer, root, "valid", expressions, shuffle_seed=seed, out_dir=out_dir,
                                  progress=progress, desc="evaluate", **options)
    metrics = result.mean(VALID_METRICS)
    metrics["jf_gain_over_shuffled"] = metrics["jf"] - metrics["jf_shuffled"]
    metrics["num_expressions"] = len(result.rows)
    return metrics, result


def has_local_ground_truth(root) -> bool:
    """Whether every valid expression names its object (the synthetic benchmark; the real valid meta does not)."""
    return all(e.obj_id is not None for e in inference_expressions(root, "valid"))


def predict_valid(model, tokenizer, root, out_dir, *, expected_videos: int | None, progress: bool = True,
                  **options) -> dict:
    """The real valid split (no public ground truth): the masks of every expression under ``out_dir`` for the
    submission zip. ``expected_videos``: the number of videos the split must have after the test filter
    (:data:`bifit.data.ytvos.NUM_VALID_VIDEOS` for the competition; None: any). ``options``:
    :func:`inference_options`.

    Returns {"num_videos", "num_expressions", "scored_locally": 0}."""
    videos = inference_videos(root, "valid", expected_count=expected_videos)
    expressions = inference_expressions(root, "valid", videos)
    result = evaluate_expressions(model, tokenizer, root, "valid", expressions, score=False, out_dir=out_dir,
                                  progress=progress, desc="ytvos valid", **options)
    return {"num_videos": result.num_videos, "num_expressions": len(expressions), "scored_locally": 0}
