"""Local proxy evaluation for Ref-YouTube-VOS: a fixed held-out part of the training videos, scored with J&F.

The official valid split has no public ground truth and the challenge server has stopped accepting submissions
(DATASETS_AND_EVAL.md 2.7, pitfall 30). Runs can still be compared locally on training videos that the model
did not see:

- **The list.** Of the N training videos (of ``meta_expressions/train``), the n = round(fraction x N) (at least
  1, at most N - 1) with the smallest ``sha1("bifit/ref-youtube-vos/proxy/v1/" + video_id)`` are held out,
  written sorted, one id per line, by the preprocess stage (``<prepared>/ytvos/proxy_videos.txt``). The rule
  depends only on the ids, so the list is the same on every machine and for every run, and it changes only if
  the training set does. ``fraction`` is ``datasets.ytvos_proxy.fraction`` (default 0.05: 3 of the 60 generated
  videos, 174 of the real 3,471).
- **Held out.** With ``datasets.ytvos_proxy.exclude_from_training`` (default true) the train stage drops every
  sample of these videos. A checkpoint trained elsewhere on all training videos (the released ``ytvos_r50.pth``
  included) has seen them: its proxy score is optimistic and is not comparable with the server's valid numbers.
- **The score.** Every expression of every held-out video is segmented over all its listed frames with the
  Ref-YouTube-VOS inference protocol (section 2.6: the whole video, one query for all frames, sigmoid > 0.5,
  original size), and J and F (section 6.1, no void) are averaged over the frames of the expression, then over
  expressions; J&F = (J + F) / 2. This is how the server averages the valid split, applied to local GT.
  The videos come from the training split but the protocol is inference: each expression reaches the tokenizer
  as written in the meta, like valid inference, not lower-cased as the training loader gives it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bifit.data.ytvos import (
    Expression,
    SampleError,
    expressions_path,
    inference_expressions,
    load_gt_masks,
    load_video,
    read_videos,
)
from bifit.eval.davis import boundary_measure, region_similarity

PROXY_SALT = "bifit/ref-youtube-vos/proxy/v1/"
PROXY_LIST_NAME = "proxy_videos.txt"


def proxy_rank(video_id: str) -> str:
    return hashlib.sha1((PROXY_SALT + video_id).encode()).hexdigest()


def proxy_count(num_train_videos: int, fraction: float) -> int:
    """n = round(fraction x N), at least 1 and at most N - 1."""
    if not 0 < fraction < 1:
        raise ValueError(f"proxy fraction: expected a number in (0, 1), got {fraction}")
    if num_train_videos < 2:
        raise ValueError(f"the proxy needs at least 2 training videos (one to hold out), got {num_train_videos}")
    return min(num_train_videos - 1, max(1, round(fraction * num_train_videos)))


def select_proxy_videos(train_videos: Iterable[str], fraction: float) -> list[str]:
    """The :func:`proxy_count` ids with the smallest :func:`proxy_rank`, sorted (module docstring)."""
    videos = sorted(set(train_videos))
    return sorted(sorted(videos, key=proxy_rank)[: proxy_count(len(videos), fraction)])


def proxy_videos(root, fraction: float) -> list[str]:
    """The held-out list of the Ref-YouTube-VOS training set at ``root``."""
    return select_proxy_videos(read_videos(expressions_path(root, "train")), fraction)


def write_video_list(path, videos: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{v}\n" for v in videos))


def read_video_list(path) -> list[str]:
    path = Path(path)
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing proxy video list; run the preprocess stage for ytvos") from err


def hold_out(dataset, videos: Iterable[str]) -> int:
    """Remove every sample of ``videos`` from a training dataset (its ``samples`` list); returns how many."""
    held = set(videos)
    before = len(dataset.samples)
    dataset.samples = [s for s in dataset.samples if s.video not in held]
    if not dataset.samples:
        raise ValueError("holding out the proxy videos left no training samples")
    return before - len(dataset.samples)


def proxy_expressions(root, videos: Sequence[str]) -> list[Expression]:
    """The expressions (with obj_id) of the held-out training videos, grouped by video.

    Captions are the raw meta text (inference listing), not the training loader's normalised text: the proxy
    stands in for valid inference, which tokenises the expression as written."""
    expressions = inference_expressions(root, "train", videos=sorted(videos))
    missing = [f"{e.video}/{e.exp_id}" for e in expressions if e.obj_id is None]
    if missing:
        raise ValueError(f"{expressions_path(root, 'train')}: expressions without obj_id: {missing[:5]}")
    return expressions


def score_expression(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Frame-averaged J and F of one expression (gt, pred [T, H, W] bool) and their mean."""
    j = float(np.mean(region_similarity(gt, pred)))
    f = float(np.mean(boundary_measure(gt, pred)))
    return {"j": j, "f": f, "jf": (j + f) / 2}


def evaluate_proxy(model, tokenizer, root, videos: Sequence[str], *, short_side: int = 360,
                   window: int | None = None, threshold: float = 0.5, batch: int = 8, out_dir=None,
                   skip_bad_samples: bool = False, progress: bool = True,
                   amp: bool = False) -> tuple[dict, list[dict]]:
    """Segment and score every expression of ``videos`` (training split at ``root``), on the model's device
    (``amp``: bfloat16 autocast, see :func:`bifit.inference.predict_video`).

    Returns (metrics {"jf", "j", "f", "num_videos", "num_expressions", "num_skipped_videos"}, one row per
    expression). With ``out_dir`` the masks are written as ``<out_dir>/<video>/<exp_id>/<frame>.png`` (0/255,
    original size) and the skipped videos listed in ``<out_dir>/skipped_samples.json``. A missing or corrupt
    frame or annotation raises SampleError (file and ids named); with ``skip_bad_samples`` that video is left
    out and recorded instead.
    """
    from bifit.inference import predict_video  # torch-heavy; imported on use

    expressions = proxy_expressions(root, videos)
    by_video: dict[str, list[Expression]] = {}
    for e in expressions:
        by_video.setdefault(e.video, []).append(e)
    rows, skipped = [], []
    bar = tqdm(total=len(expressions), desc="ytvos proxy", unit="expr", disable=not progress)
    for video, exps in by_video.items():
        try:
            frames, orig_size = load_video(root, video, exps[0].frames, "train", short_side=short_side)
            gts = [load_gt_masks(root, e.video, e.frames, e.obj_id, "train").numpy() for e in exps]
        except SampleError as err:
            if not skip_bad_samples:
                raise
            skipped.append(err.record())
            bar.update(len(exps))
            continue
        preds = predict_video(model, tokenizer, frames, [e.caption for e in exps], orig_size, window, threshold,
                              batch, amp)
        for e, gt, pred in zip(exps, gts, preds):
            masks = pred.masks.numpy()
            rows.append({"video": e.video, "exp_id": e.exp_id, **score_expression(gt, masks)})
            if out_dir is not None:
                _save_masks(Path(out_dir) / e.video / e.exp_id, e.frames, masks)
            bar.update(1)
    bar.close()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "skipped_samples.json").write_text(json.dumps(skipped, indent=1) + "\n")
    if not rows:
        raise ValueError(f"{root}: no proxy expression could be scored (skipped: {skipped})")
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("jf", "j", "f")}
    metrics.update(num_videos=len({r["video"] for r in rows}), num_expressions=len(rows),
                   num_skipped_videos=len(skipped))
    return metrics, rows


def _save_masks(folder: Path, frames: Sequence[str], masks: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, m in zip(frames, masks):
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(folder / f"{name}.png")
