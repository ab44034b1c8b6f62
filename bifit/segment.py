"""Segment your own video: a video (file, frame folder or image) + one or more sentences -> a mask per frame.

    python -m bifit.segment walk.mp4 --text "a dog running on the grass" --checkpoint ytvos_r50.pth --out walk_masks

    import bifit
    model = bifit.load_model("ytvos_r50.pth")          # or one of our checkpoints, or an MLflow run id
    result = model.segment("walk.mp4", ["a dog running on the grass"])
    result[0].masks                                     # [T, H, W] bool at the original size
    result[0].save("out/")                              # masks/*.png, overlay.mp4, result.json

How it runs (the official inference, :func:`bifit.inference.predict_video`):

- the frames are read in windows of ``window`` frames (default 24, BIFIT's Ref-DAVIS17 clip length; 0 or None: the
  whole video in one pass, the official Ref-YouTube-VOS protocol). Each window is decoded, resized to the
  checkpoint's inference short side (ours: ``data.eval_short_side``; official files: 360) and run through the
  visual encoder **once**; every sentence is decoded on those shared features. Each window chooses its own query
  (the best mean score over its frames, the official Ref-DAVIS behaviour), whose mask logits are upsampled
  bilinearly to the original size and thresholded (``sigmoid > threshold``; the checkpoint's ``eval.threshold``,
  else 0.5). Memory depends on the window, not on the video's length: the command line writes each window's
  masks and overlay frames before it reads the next;
- ``every``: only frames 0, N, 2N, ... are segmented (the overlay video then runs at fps / N);
- the GPU when torch sees one (``device``), bfloat16 autocast with ``amp`` (masks decided in float32).

The command line writes ``<out>/<NN>_<sentence>/`` per sentence (:mod:`bifit.segment_output`) and
``<out>/segmentation.json`` (the input, the checkpoint, the settings and the folders), all into a temporary folder
that replaces ``<out>`` only when everything is written; an existing ``<out>`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from bifit.config import ConfigError, check, int_in
from bifit.fsutil import staged_folder
from bifit.video_io import VideoInputError, VideoSource, open_video

DEFAULT_WINDOW = 24  # BIFIT's Ref-DAVIS17 clip length (bifit.eval.ref_davis.CLIP_LENGTH)
OFFICIAL_SHORT_SIDE = 360  # the official Ref-YouTube-VOS / Ref-DAVIS17 inference resize
OFFICIAL_THRESHOLD = 0.5
SUMMARY_NAME = "segmentation.json"


class SegmentError(ValueError):
    """Input that cannot be segmented (an empty sentence, an output folder that exists, ...)."""


@dataclass
class SegmentConfig:
    """How a video is segmented (module docstring). None: the checkpoint's own setting."""

    window: int | None = DEFAULT_WINDOW  # frames per forward pass; None or 0: the whole video at once
    every: int = 1  # segment frames 0, every, 2 * every, ...
    short_side: int | None = None  # inference resize; None: the checkpoint's (ours: data.eval_short_side; 360)
    threshold: float | None = None  # None: the checkpoint's eval.threshold (official: 0.5)
    amp: bool = False  # bfloat16 autocast
    batch: int = 8  # sentences decoded per forward pass
    fps: float | None = None  # frame rate of a frame folder, an image or an array (default 24)

    def validate(self, where: str = "segment") -> SegmentConfig:
        check(self.window is None or int_in(self.window, 0, 1_000_000), f"{where}.window",
              "None, 0 (the whole video) or a number of frames >= 1", self.window)
        check(int_in(self.every, 1, 1_000_000), f"{where}.every", "an integer >= 1", self.every)
        check(self.short_side is None or int_in(self.short_side, 32, 4096), f"{where}.short_side",
              "None or an integer in [32, 4096]", self.short_side)
        check(self.threshold is None or 0 < self.threshold < 1, f"{where}.threshold", "None or a float in (0, 1)",
              self.threshold)
        check(int_in(self.batch, 1, 1024), f"{where}.batch", "an integer >= 1", self.batch)
        check(self.fps is None or (isinstance(self.fps, (int, float, Fraction)) and self.fps > 0), f"{where}.fps",
              "None or a positive frame rate", self.fps)
        return self


def checked_texts(texts: str | Sequence[str]) -> list[str]:
    """The sentences as a list; an empty one (or none at all) is refused, naming which."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise SegmentError("texts: expected one or more sentences, got none")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise SegmentError(f"text #{i + 1}: expected a sentence, got {text!r} (empty)")
    return texts


def checkpoint_settings(loaded, config: SegmentConfig) -> dict:
    """{"short_side", "threshold"}: the config's, else what the checkpoint was evaluated with."""
    saved = {} if loaded.official else loaded.checkpoint.get("config") or {}
    short_side = config.short_side or saved.get("data", {}).get("eval_short_side") or OFFICIAL_SHORT_SIDE
    threshold = config.threshold or saved.get("eval", {}).get("threshold") or OFFICIAL_THRESHOLD
    return {"short_side": int(short_side), "threshold": float(threshold)}


def sampled_frames(source: VideoSource, every: int) -> Iterator[tuple[int, np.ndarray]]:
    """(input index, RGB frame) of frames 0, every, 2 * every, ..."""
    for i, rgb in enumerate(source.frames()):
        if i % every == 0:
            yield i, rgb


def num_sampled(source: VideoSource, every: int) -> int | None:
    return None if source.num_frames is None else math.ceil(source.num_frames / every)


@dataclass
class SegmentedWindow:
    start: int  # position of its first frame among the segmented frames
    indices: list[int]  # the input index of each frame
    frames: list[np.ndarray]  # RGB [H, W, 3]
    predictions: list  # one bifit.inference.VideoPrediction per sentence (masks [t', H, W] bool, one window)


def segment_windows(loaded, source: VideoSource, texts: list[str], config: SegmentConfig,
                    progress: bool = False) -> Iterator[SegmentedWindow]:
    """The streaming core: read a window, segment every sentence on its shared visual features, yield it."""
    from PIL import Image
    from tqdm import tqdm

    from bifit.data.transforms import make_video_eval_transform
    from bifit.inference import predict_video

    settings = checkpoint_settings(loaded, config)
    transform = make_video_eval_transform(settings["short_side"])
    window = config.window or None
    bar = tqdm(total=num_sampled(source, config.every), unit="frame", desc=f"segmenting {source.name}",
               disable=not progress, file=sys.stderr)
    chunk: list[tuple[int, np.ndarray]] = []
    start = 0

    def run(chunk, start):
        clip, _ = transform([Image.fromarray(rgb) for _, rgb in chunk], {})  # [t', 3, h, w], normalised
        preds = predict_video(loaded.model, loaded.tokenizer, clip, texts, source.size, window=None,
                              threshold=settings["threshold"], batch=config.batch, amp=config.amp)
        bar.update(len(chunk))
        return SegmentedWindow(start, [i for i, _ in chunk], [rgb for _, rgb in chunk], preds)

    with bar:
        for item in sampled_frames(source, config.every):
            chunk.append(item)
            if window is not None and len(chunk) == window:
                yield run(chunk, start)
                start, chunk = start + len(chunk), []
        if chunk:
            yield run(chunk, start)


@dataclass
class ExpressionResult:
    """One sentence's segmentation of a video (masks held in memory; ``save`` writes the files)."""

    text: str
    masks: np.ndarray  # [T, H, W] bool at the original size (T: the segmented frames)
    frame_scores: np.ndarray  # [T] float32, the chosen query's score in each frame
    frame_indices: list[int]  # the input index of each segmented frame
    windows: list[dict] = field(default_factory=list)  # {"start", "end", "query", "score"}
    source: VideoSource | None = None
    settings: dict = field(default_factory=dict)  # every, window, threshold, short_side

    @property
    def queries(self) -> np.ndarray:
        """[T] the query chosen for each frame (its window's)."""
        out = np.zeros(len(self.masks), dtype=np.int64)
        for w in self.windows:
            out[w["start"] : w["end"]] = w["query"]
        return out

    @property
    def fps(self) -> Fraction:
        return self.source.fps / self.settings.get("every", 1)

    def save(self, folder, video_format: str = "mp4", overwrite: bool = False) -> Path:
        """masks/<frame>.png (0/255), overlay.<video_format> and result.json in `folder`, written to a temporary
        folder first; an existing `folder` is refused unless `overwrite`."""
        from bifit.segment_output import ExpressionWriter

        folder = checked_output(folder, overwrite)
        every = self.settings.get("every", 1)
        with staged_folder(folder) as tmp:
            writer = ExpressionWriter(tmp, self.text, self.fps, self.source.size, video_format,
                                      settings=self._record_settings())
            try:
                for w in self.windows:
                    writer.add_window(w["start"], w["end"], w["query"], w["score"])
                queries = self.queries
                for j, (index, rgb) in enumerate(sampled_frames(self.source, every)):
                    writer.add_frame(self.source.frame_name(index), index, rgb, self.masks[j],
                                     float(self.frame_scores[j]), int(queries[j]))
            except BaseException:
                writer.abort()
                raise
            writer.close()
        return folder

    def _record_settings(self) -> dict:
        return {"source": str(self.source.path or "array"), **self.settings}


def segment(loaded, video, texts: str | Sequence[str], config: SegmentConfig | None = None, *,
            progress: bool = False, **options) -> list[ExpressionResult]:
    """Segment `video` (a path: video file, frame folder, image; or uint8 [T, H, W, 3]) with each sentence of
    `texts` using ``loaded`` (:func:`bifit.load_model`); one :class:`ExpressionResult` per sentence, in order.
    ``options`` override fields of `config` (``window=``, ``every=``, ``amp=``, ...)."""
    texts = checked_texts(texts)
    config = replace(config or SegmentConfig(), **_known_options(options)).validate()
    source = video if isinstance(video, VideoSource) else open_video(video, config.fps)
    settings = {**checkpoint_settings(loaded, config), "every": config.every, "window": config.window or None}
    masks = [[] for _ in texts]
    scores = [[] for _ in texts]
    windows = [[] for _ in texts]
    indices: list[int] = []
    for win in segment_windows(loaded, source, texts, config, progress):
        indices += win.indices
        end = win.start + len(win.indices)
        for k, pred in enumerate(win.predictions):
            masks[k].append(pred.masks.numpy())
            scores[k].append(pred.frame_scores.numpy())
            windows[k].append({"start": win.start, "end": end, "query": pred.queries[0], "score": pred.scores[0]})
    return [ExpressionResult(text, np.concatenate(masks[k]), np.concatenate(scores[k]).astype(np.float32),
                             list(indices), windows[k], source, dict(settings)) for k, text in enumerate(texts)]


def _known_options(options: dict) -> dict:
    known = {f.name for f in fields(SegmentConfig)}
    wrong = sorted(set(options) - known)
    if wrong:
        raise TypeError(f"segment: unknown option(s) {wrong}; known: {sorted(known)}")
    return options


def checked_output(out, overwrite: bool) -> Path:
    """An output folder that may be written: refused when it exists (unless `overwrite`) or is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SegmentError(f"{out}: exists and is not a folder; expected a new output folder")
    if out.exists() and not overwrite:
        raise SegmentError(f"{out}: the output folder exists; choose another, or pass --overwrite (API: "
                           "overwrite=True) to replace it")
    return out


def write_segmentation(loaded, source: VideoSource, texts: list[str], out: Path, config: SegmentConfig,
                       video_format: str = "mp4", progress: bool = False, overwrite: bool = False,
                       on_window=None, checkpoint: str = "") -> dict:
    """Segment and write as the windows arrive (the command line and the web demo): ``<out>/<NN>_<sentence>/``
    per sentence and ``<out>/segmentation.json``, which is returned. ``on_window(frames done)`` after each window.
    Nothing is left behind on failure; `out` is replaced only when complete."""
    from bifit.segment_output import ExpressionWriter, expression_folder_name
    from bifit.visualize import PALETTE

    texts = checked_texts(texts)
    config.validate()
    out = checked_output(out, overwrite)
    settings = {**checkpoint_settings(loaded, config), "every": config.every, "window": config.window or None}
    names = [expression_folder_name(k, t) for k, t in enumerate(texts)]
    fps = source.fps / config.every
    done = 0
    with staged_folder(out) as tmp:
        writers = [ExpressionWriter(tmp / name, text, fps, source.size, video_format, PALETTE[k % len(PALETTE)],
                                    settings={"source": str(source.path or "array"), **settings})
                   for k, (name, text) in enumerate(zip(names, texts))]
        try:
            for win in segment_windows(loaded, source, texts, config, progress):
                for writer, pred in zip(writers, win.predictions):
                    writer.add_window(win.start, win.start + len(win.indices), pred.queries[0], pred.scores[0])
                    for j, (index, rgb) in enumerate(zip(win.indices, win.frames)):
                        writer.add_frame(source.frame_name(index), index, rgb, pred.masks[j].numpy(),
                                         float(pred.frame_scores[j]), pred.queries[0])
                done += len(win.indices)
                if on_window is not None:
                    on_window(done)
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        records = [writer.close() for writer in writers]
        summary = {"source": str(source.path or "array"), "kind": source.kind, "checkpoint": checkpoint,
                   "size": list(source.size), "fps": float(fps), "frames": done, **settings,
                   "amp": config.amp, "device": str(next(loaded.model.parameters()).device),
                   "expressions": [{"text": t, "folder": n, "mean_score": r["mean_score"]}
                                   for t, n, r in zip(texts, names, records)]}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bifit.segment", description="Segment the object a sentence refers to in every frame of a "
        "video: PNG masks, an overlay video and per-frame scores per sentence.")
    p.add_argument("video", help="a video file (.mp4 .avi .mov .webm ...), a folder of frames or an image")
    p.add_argument("--text", action="append", required=True, help="a referring sentence (repeat for several)")
    p.add_argument("--checkpoint", required=True, help="our checkpoint, an official BIFIT/ReferFormer file "
                   "(ytvos_r50.pth, a2d_r50.pth) or an MLflow run id")
    p.add_argument("--out", help="output folder (default: <video name>_segmentation in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"frames per forward pass (default {DEFAULT_WINDOW}); 0: the whole video at once")
    p.add_argument("--every", type=int, default=1, help="segment every N-th frame (default 1: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (masks still decided in float32)")
    p.add_argument("--short-side", type=int, help="inference resize (default: the checkpoint's; official 360)")
    p.add_argument("--threshold", type=float, help="mask threshold (default: the checkpoint's; official 0.5)")
    p.add_argument("--batch", type=int, default=8, help="sentences decoded per forward pass")
    p.add_argument("--fps", type=float, help="frame rate of a frame folder or an image (default 24)")
    p.add_argument("--video-format", default="mp4", choices=("mp4", "webm"), help="the overlay video's format")
    p.add_argument("--text-encoder", help="a local copy of the text encoder (official files load roberta-base)")
    p.add_argument("--architecture", choices=("paper",), help="the architecture of released weights that do not "
                   "record one (no 'args'): the paper's model")
    p.add_argument("--tracking-uri", help="MLflow store of a run id (default: MLFLOW_TRACKING_URI, else "
                   "params.yaml's mlflow.tracking_uri)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bifit.checkpoint import CheckpointError
    from bifit.config import ModelConfig
    from bifit.loading import load_model

    args = build_parser().parse_args(argv)
    try:
        texts = checked_texts(args.text)
        config = SegmentConfig(window=args.window, every=args.every, short_side=args.short_side,
                               threshold=args.threshold, amp=args.amp, batch=args.batch, fps=args.fps).validate()
        out = checked_output(args.out or f"{Path(args.video).stem or 'video'}_segmentation", args.overwrite)
        source = open_video(args.video, args.fps)  # bad input fails before the model is loaded
        try:
            loaded = load_model(args.checkpoint, {"text_encoder": args.text_encoder} if args.text_encoder else None,
                                args.device, architecture=ModelConfig() if args.architecture == "paper" else None,
                                tracking_uri=args.tracking_uri)
        except CheckpointError as err:
            if "does not record its architecture" not in str(err):
                raise
            raise CheckpointError(f"{err} (here: --architecture paper, the paper's ResNet-50 model)") from None
        summary = write_segmentation(loaded, source, texts, out, config, args.video_format,
                                     progress=not args.no_progress, overwrite=args.overwrite,
                                     checkpoint=str(args.checkpoint))
    except (SegmentError, VideoInputError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"bifit.segment: error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['frames']} frames of {source.name} segmented; written to {out}/")
    for e in summary["expressions"]:
        print(f"  {out / e['folder']}/  mean score {e['mean_score']:.3f}  {e['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
