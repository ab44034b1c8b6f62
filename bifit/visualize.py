"""Drawing for qualitative analysis: mask overlays, reference points, side-by-side panels, GIFs, metric bars.

Images are uint8 numpy arrays [H, W, 3] (RGB); masks are bool arrays [H, W]. Nothing here runs a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


def read_frames(paths: Sequence[Path]) -> np.ndarray:
    """JPEG/PNG files -> uint8 [t, H, W, 3] at their original size."""
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(np.asarray(img.convert("RGB")))
    return np.stack(out)


def overlay(image: np.ndarray, mask: np.ndarray, color=(230, 25, 75), alpha: float = 0.5,
            outline: bool = True) -> np.ndarray:
    """Blend `color` into `image` where `mask` is set, with a one-pixel outline of the mask."""
    out = image.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, dtype=np.float32)
    if outline and m.any():
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = color
    return out.round().astype(np.uint8)


def draw_points(image: np.ndarray, points_xy: np.ndarray, colors=None, radius: int = 3,
                highlight: int | None = None) -> np.ndarray:
    """Normalised (x, y) points [n, 2] in [0, 1] drawn as discs; `highlight` (an index) gets a white ring."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    h, w = image.shape[:2]
    colors = colors or PALETTE
    for i, (x, y) in enumerate(np.asarray(points_xy, dtype=np.float32)):
        cx, cy = float(x) * w, float(y) * h
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=tuple(colors[i % len(colors)]))
        if i == highlight:
            r = radius + 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), width=2)
    return np.asarray(img)


def hstack(images: Sequence[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Images of one height side by side with `gap` pixels between them."""
    h = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        if im.shape[0] != h:
            raise ValueError(f"hstack: image {i} has height {im.shape[0]}, expected {h}")
        parts.append(im)
        if i < len(images) - 1:
            parts.append(np.full((h, gap, 3), fill, dtype=np.uint8))
    return np.concatenate(parts, axis=1)


def label(image: np.ndarray, text: str, color=(255, 255, 255)) -> np.ndarray:
    """`text` on a dark band at the top-left corner."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((2, 1), text)
    draw.rectangle([0, 0, box[2] + 3, box[3] + 2], fill=(0, 0, 0))
    draw.text((2, 1), text, fill=color)
    return np.asarray(img)


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: float = 4.0) -> Path:
    """An animated GIF that loops forever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def frame_disagreement(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Per frame, 1 - the mean pairwise IoU of the masks of several models ({name: [t, H, W] bool}) -> [t]."""
    names = list(masks)
    if len(names) < 2:
        raise ValueError(f"frame_disagreement: needs masks of at least two models, got {names}")
    t = len(masks[names[0]])
    out = np.zeros(t)
    pairs = list(itertools.combinations(names, 2))
    for i in range(t):
        out[i] = 1.0 - np.mean([mask_iou(masks[a][i], masks[b][i]) for a, b in pairs])
    return out


def metric_bars(ax, groups: Sequence[str], metrics: Sequence[str], means, stds=None, title: str = ""):
    """Grouped bars: one group per entry of `groups`, one bar per metric, error bars from `stds`
    (means/stds: [len(groups), len(metrics)]; NaN std draws no error bar)."""
    means = np.asarray(means, dtype=float)
    stds = None if stds is None else np.nan_to_num(np.asarray(stds, dtype=float))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(groups))
    for j, m in enumerate(metrics):
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, means[:, j], width, yerr=None if stds is None else stds[:, j], capsize=3,
               label=m, color=np.asarray(PALETTE[j % len(PALETTE)]) / 255)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return ax
