"""Local proxy evaluation for Ref-YouTube-VOS: a fixed held-out part of the training videos, scored with J&F.

The official valid split has no public ground truth and the challenge server has stopped accepting submissions
(reported after its CodaLab migration, skynbe/Refer-Youtube-VOS issues 7-9). Runs can still be compared locally
on training videos that the model did not see:

- **The list.** Of the N training videos (of ``meta_expressions/train``), the n = round(fraction x N) (at least
  1, at most N - 1) with the smallest ``sha1("bifit/ref-youtube-vos/proxy/v1/" + video_id)`` are held out,
  written sorted, one id per line, by the preprocess stage (``<prepared>/ytvos/proxy_videos.txt``). The rule
  depends only on the ids, so the list is the same on every machine and for every run, and it changes only if
  the training set does. ``fraction`` is ``datasets.ytvos_proxy.fraction`` (default 0.05: 3 of the 60 generated
  videos, 174 of the real 3,471).
- **Held out.** With ``datasets.ytvos_proxy.exclude_from_training`` (default true) the train stage lists its
  training samples without these videos (``YTVOSDataset(..., exclude_videos=...)``). A checkpoint trained
  elsewhere on all training videos (the released ``ytvos_r50.pth`` included) has seen them: its proxy score is
  optimistic and is not comparable with the server's valid numbers.
- **The score.** Every expression of every held-out video is segmented and scored by the Ref-YouTube-VOS
  evaluator (:mod:`bifit.eval.ytvos`): the official inference protocol (the whole video, one query for all
  frames, sigmoid > 0.5, original size), DAVIS J and F (no void) averaged over the frames of the
  expression, then over expressions; J&F = (J + F) / 2. This is how the server averages the valid split, applied
  to local GT. The videos come from the training split but the protocol is inference: each expression reaches the
  tokenizer as written in the meta, like valid inference, not lower-cased as the training loader gives it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from bifit.data.ytvos import Expression, expressions_path, inference_expressions, read_videos
from bifit.eval.ytvos import YTVOSEvaluation, evaluate_expressions

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


def proxy_expressions(root, videos: Sequence[str]) -> list[Expression]:
    """The expressions of the held-out training videos, grouped by video.

    Captions are the raw meta text (inference listing), not the training loader's normalised text: the proxy
    stands in for valid inference, which tokenises the expression as written."""
    return inference_expressions(root, "train", videos=sorted(videos))


def evaluate_proxy(model, tokenizer, root, videos: Sequence[str], *, out_dir=None, skip_bad_samples: bool = False,
                   progress: bool = True, **options) -> tuple[dict, YTVOSEvaluation]:
    """Segment and score every expression of ``videos`` (training split at ``root``) with
    :func:`bifit.eval.ytvos.evaluate_expressions`, on the model's device; ``options``: its inference settings
    (``short_side``, ``window``, ``threshold``, ``batch``, ``amp``; :func:`bifit.eval.ytvos.inference_options`).

    Returns (metrics {"jf", "j", "f", "num_videos", "num_expressions", "num_skipped_videos"}, the evaluation: one
    row per expression, J&F per video). With ``out_dir`` the masks are written as ``<out_dir>/<video>/<exp_id>/<frame>.png`` (0/255,
    original size) and the skipped videos listed in ``<out_dir>/skipped_samples.json``. A missing or corrupt
    frame or annotation raises SampleError (file and ids named); with ``skip_bad_samples`` that video is left
    out and recorded instead.
    """
    result = evaluate_expressions(model, tokenizer, root, "train", proxy_expressions(root, videos), out_dir=out_dir,
                                  skip_bad_samples=skip_bad_samples, progress=progress, desc="ytvos proxy",
                                  **options)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "skipped_samples.json").write_text(json.dumps(result.skipped, indent=1) + "\n")
    if not result.rows:
        raise ValueError(f"{root}: no proxy expression could be scored (skipped: {result.skipped})")
    metrics = result.mean(("jf", "j", "f"))
    metrics.update(num_videos=result.num_videos, num_expressions=len(result.rows),
                   num_skipped_videos=len(result.skipped))
    return metrics, result
