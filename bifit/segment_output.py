"""What ``bifit.segment`` writes for one expression, frame by frame (nothing is held but the open video file):

    <folder>/masks/<frame>.png    one per segmented frame: 0/255 greyscale ("L") at the frame's original size
    <folder>/overlay.mp4          the frames with the mask tinted and outlined and the sentence written on them,
                                  at the input's frame rate (divided by ``every``); .webm for the web demo
    <folder>/result.json          the sentence, the per-frame scores, the query chosen in each window

``result.json``: ``{"text", "source", "fps", "size": [H, W], "every", "window", "threshold", "frames": [{"name",
"index" (in the input), "score" (the chosen query's score in that frame), "query", "area" (mask pixels)}],
"windows": [{"start", "end" (frame positions among the segmented ones, end exclusive), "query", "score"
(its mean score over the window)}], "mean_score"}``.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bifit.video_io import VideoWriter
from bifit.visualize import PALETTE, overlay

MASKS_DIR = "masks"
OVERLAY_NAME = "overlay"
RESULT_NAME = "result.json"


def expression_folder_name(index: int, text: str) -> str:
    """``00_the-man-in-the-red-shirt``: the expression's position, then a file-safe slug of its first words."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].rstrip("-")
    return f"{index:02d}_{slug or 'expression'}"


def caption(image: np.ndarray, text: str, color=(255, 255, 255)) -> np.ndarray:
    """`text` on a dark band along the top of `image`, its height about 1/18 of the frame's (at least 10 px);
    a sentence wider than the frame is cut with an ellipsis."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, image.shape[0] // 18))
    width = image.shape[1] - 8
    shown = text
    if draw.textlength(text, font=font) > width:
        while shown and draw.textlength(shown + "…", font=font) > width:
            shown = shown[:-1]
        shown = shown.rstrip() + "…"
    box = draw.textbbox((4, 2), shown, font=font)
    draw.rectangle([0, 0, image.shape[1], box[3] + 3], fill=(0, 0, 0))
    draw.text((4, 2), shown, fill=color, font=font)
    return np.asarray(img)


def overlay_frame(rgb: np.ndarray, mask: np.ndarray, text: str, color=PALETTE[0]) -> np.ndarray:
    """The frame with `mask` tinted (alpha 0.5) and outlined in `color`, and the sentence written on it."""
    return caption(overlay(rgb, mask, color=color, alpha=0.5), text)


class ExpressionWriter:
    """Writes one expression's masks, overlay video and result.json into `folder` as frames arrive."""

    def __init__(self, folder: Path, text: str, fps: Fraction, size: tuple[int, int], video_format: str = "mp4",
                 color=PALETTE[0], settings: dict | None = None):
        self.folder, self.text, self.color = Path(folder), text, color
        (self.folder / MASKS_DIR).mkdir(parents=True, exist_ok=True)
        self.video = VideoWriter(self.folder / f"{OVERLAY_NAME}.{video_format}", fps, size)
        self.record = {"text": text, "fps": float(fps), "size": list(size), **(settings or {}), "frames": [],
                       "windows": []}

    def add_window(self, start: int, end: int, query: int, score: float) -> None:
        self.record["windows"].append({"start": start, "end": end, "query": int(query), "score": float(score)})

    def add_frame(self, name: str, index: int, rgb: np.ndarray, mask: np.ndarray, score: float, query: int) -> None:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(self.folder / MASKS_DIR / f"{name}.png")
        self.video.write(overlay_frame(rgb, mask, self.text, self.color))
        self.record["frames"].append({"name": name, "index": int(index), "score": float(score), "query": int(query),
                                      "area": int(mask.sum())})

    def close(self) -> dict:
        """Finish the video and write result.json; returns the record."""
        self.video.close()
        scores = [f["score"] for f in self.record["frames"]]
        self.record["mean_score"] = float(np.mean(scores)) if scores else None
        (self.folder / RESULT_NAME).write_text(json.dumps(self.record, indent=1) + "\n")
        return self.record

    def abort(self) -> None:
        """Close the video file after a failure (the caller removes the folder)."""
        self.video.close()


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    """The masks of an expression folder: {frame name: [H, W] bool}, in result.json's frame order."""
    folder = Path(folder)
    record = json.loads((folder / RESULT_NAME).read_text())
    out = {}
    for f in record["frames"]:
        with Image.open(folder / MASKS_DIR / f"{f['name']}.png") as img:
            out[f["name"]] = np.asarray(img) > 127
    return out
