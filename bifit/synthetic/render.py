"""Rendering: object masks in depth order, textured panning backgrounds, and the RGB frames."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bifit.synthetic.config import SHAPES, SyntheticConfig
from bifit.synthetic.scene import SceneObject


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Binary mask [H, W] of a shape of half-extent ``r`` centred at (cx, cy), sampled at pixel centres."""
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5 - cx
    if shape == "circle":
        return xs**2 + ys**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(xs), np.abs(ys)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(xs) + np.abs(ys) <= 1.15 * r
    if shape == "triangle":  # upward equilateral, circumradius 1.35 r: apex at y = -1.35 r, base at y = +0.675 r
        big = 1.35 * r
        return (ys <= 0.5 * big) & (np.sqrt(3.0) * np.abs(xs) <= ys + big)
    raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def render_masks(objects: list[SceneObject], cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(id maps [T, H, W] uint8 after occlusion, full in-frame masks [T, N, H, W] bool before occlusion)."""
    n, h, w = cfg.frames_per_video, cfg.height, cfg.width
    full = np.zeros((n, len(objects), h, w), dtype=bool)
    ids = np.zeros((n, h, w), dtype=np.uint8)
    order = sorted(range(len(objects)), key=lambda i: objects[i].depth)
    for t in range(n):
        for i in order:
            o = objects[i]
            full[t, i] = shape_mask(o.shape, o.centres[t, 0], o.centres[t, 1], o.radius, h, w)
            ids[t][full[t, i]] = o.obj_id
    return ids, full


def _smooth_noise(rng, h: int, w: int, cell: int) -> np.ndarray:
    small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BICUBIC)
    return np.asarray(img)[:h, :w]


def background(rng: np.random.Generator, cfg: SyntheticConfig, pad: int) -> np.ndarray:
    """A textured, low-saturation canvas [H + pad, W + pad, 3] in 0..255 (noise, stripes or gradient mixes)."""
    h, w = cfg.height + pad, cfg.width + pad
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / (h + w)
    kind = rng.choice(["noise", "stripes", "gradient"])
    if kind == "noise":
        tex = 0.65 * _smooth_noise(rng, h, w, int(rng.integers(8, 24))) + 0.35 * _smooth_noise(rng, h, w, 4)
    elif kind == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(8, 28)
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    else:
        tex = ramp - ramp.min()
        tex = tex / max(tex.max(), 1e-6)
    tex = 0.7 * tex + 0.3 * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6) + 0.1 * _smooth_noise(rng, h, w, 2)
    tex = (tex - tex.min()) / max(np.ptp(tex), 1e-6)
    grey_a, grey_b = rng.uniform(40, 110), rng.uniform(140, 210)
    tint_a, tint_b = rng.normal(0, 10, 3), rng.normal(0, 10, 3)
    col_a, col_b = grey_a + tint_a, grey_b + tint_b
    return (col_a + tex[..., None] * (col_b - col_a)).astype(np.float32)


def render_frames(rng, objects: list[SceneObject], ids: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """RGB frames [T, H, W, 3] uint8: panning background, shaded objects painted per the id map."""
    n, h, w = cfg.frames_per_video, cfg.height, cfg.width
    pan = rng.uniform(-1.5, 1.5, size=2)
    pad = int(np.ceil(np.abs(pan).max() * n)) + 1
    canvas = background(rng, cfg, pad)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        oy = int(round(pad / 2 + pan[1] * (t - n / 2))) if pad > 1 else 0
        ox = int(round(pad / 2 + pan[0] * (t - n / 2))) if pad > 1 else 0
        oy, ox = int(np.clip(oy, 0, pad)), int(np.clip(ox, 0, pad))
        img = canvas[oy : oy + h, ox : ox + w].copy()
        for o in objects:
            sel = ids[t] == o.obj_id
            if not sel.any():
                continue
            cx, cy = o.centres[t]
            shade = 1.08 - 0.16 * np.clip(((xx - cx) + (yy - cy)) / (4 * o.radius) + 0.5, 0, 1)
            img[sel] = np.asarray(o.rgb, dtype=np.float32) * shade[sel][:, None]
        img += rng.normal(0, 2.0, size=img.shape).astype(np.float32)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


