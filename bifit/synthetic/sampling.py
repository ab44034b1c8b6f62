"""Drawing a scene's objects: attributes that share features with distractors, and trajectories that cross."""

from __future__ import annotations

import numpy as np

from bifit.synthetic.config import (
    COLOURS,
    DIRECTIONS,
    OPPOSITE,
    OPPOSITE_SIZE,
    SHAPES,
    SIZES,
    SyntheticConfig,
)
from bifit.synthetic.scene import SceneObject


def sample_attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """(size, colour, shape) per object. Object 1 shares the colour of object 0 with another shape; object 2 shares
    the shape of object 0 with the other size; the rest copy one attribute set and change one or two fields."""
    colours, sizes = list(COLOURS), list(SIZES)
    first = (rng.choice(sizes), rng.choice(colours), rng.choice(SHAPES))
    out = [first, (rng.choice(sizes), first[1], rng.choice([s for s in SHAPES if s != first[2]]))]
    out.append((OPPOSITE_SIZE[first[0]], rng.choice(colours), first[2]))
    while len(out) < n:
        base = list(out[rng.integers(len(out))])
        for k in rng.choice(3, size=rng.integers(1, 3), replace=False):
            base[k] = rng.choice([sizes, colours, SHAPES][k])
        out.append(tuple(str(v) for v in base))
    order = rng.permutation(len(out))
    return [tuple(str(v) for v in out[i]) for i in order]



def _axis_extents(cfg: SyntheticConfig, direction: str) -> tuple[int, int]:
    """(extent along the motion, extent across it)."""
    return (cfg.width, cfg.height) if direction in ("left", "right") else (cfg.height, cfg.width)


def _to_xy(along: np.ndarray, across: np.ndarray, direction: str, cfg: SyntheticConfig) -> np.ndarray:
    """Map coordinates in a frame where motion goes towards +along into image (x, y)."""
    extent, _ = _axis_extents(cfg, direction)
    if direction in ("left", "up"):
        along = extent - along
    xy = np.stack([along, across], -1) if direction in ("left", "right") else np.stack([across, along], -1)
    return xy.astype(np.float64)


def _drift(rng, t: np.ndarray, across_extent: int, r: float, travel: float) -> np.ndarray:
    """Across-motion coordinate: a random start plus a drift of at most 30 % of the travel (motion stays dominant)."""
    start = rng.uniform(r, across_extent - r)
    total = rng.uniform(-0.3, 0.3) * travel
    return np.clip(start + total * t / max(t[-1], 1), r, across_extent - r)


def trajectory(rng: np.random.Generator, cfg: SyntheticConfig, direction: str, r: float, mode: str) -> np.ndarray:
    """Centres [T, 2] for one object moving towards ``direction``.

    inside: stays in frame. exit: fully out from a frame in [T/2, T-2] on. enter: fully out until a frame in
    [1, T/2 - 1] (an exit trajectory of the opposite direction, played backwards).
    """
    n = cfg.frames_per_video
    t = np.arange(n, dtype=np.float64)
    if mode == "enter":
        return trajectory(rng, cfg, OPPOSITE[direction], r, "exit")[::-1].copy()
    extent, across_extent = _axis_extents(cfg, direction)
    if mode == "exit":
        k = int(rng.integers(int(np.ceil(n / 2)), n - 1))  # first fully-out frame
        start = rng.uniform(r, 0.55 * extent)
        speed = (extent + 1.5 * r + 1 - start) / k
    else:
        travel = rng.uniform(0.25, 0.6) * (extent - 2 * r)
        start = rng.uniform(r, extent - r - travel)
        speed = travel / (n - 1)
    across = _drift(rng, t, across_extent, r, speed * (n - 1))
    return _to_xy(start + speed * t, across, direction, cfg)


def crossing_trajectory(rng, cfg: SyntheticConfig, other: np.ndarray, direction: str, r: float) -> np.ndarray:
    """A trajectory that passes over ``other``'s centre at a random middle frame (forces an occlusion)."""
    n = cfg.frames_per_video
    m = int(rng.integers(1, n - 1))
    meet = other[m] + rng.uniform(-0.4, 0.4, size=2) * r
    extent, _ = _axis_extents(cfg, direction)
    speed = rng.uniform(0.3, 0.6) * extent / (n - 1)
    step = np.asarray(DIRECTIONS[direction]) * speed
    return meet + (np.arange(n)[:, None] - m) * step


def sample_objects(rng: np.random.Generator, cfg: SyntheticConfig) -> list[SceneObject]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    modes = ["inside", "cross", str(rng.choice(["exit", "enter"]))]
    modes += [str(rng.choice(["inside", "inside", "exit", "enter"])) for _ in range(n - 3)]
    objects = []
    for i, ((size, colour, shape), mode) in enumerate(zip(sample_attributes(rng, n), modes)):
        lo, hi = cfg.small_radius if size == "small" else cfg.large_radius
        radius = float(rng.uniform(lo, hi))
        direction = str(rng.choice(list(DIRECTIONS)))
        if mode == "cross":
            prev = objects[0]
            direction = str(rng.choice([d for d in DIRECTIONS if d != prev.direction]))
            centres = crossing_trajectory(rng, cfg, prev.centres, direction, radius)
        else:
            centres = trajectory(rng, cfg, direction, radius, mode)
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 8, 3), 0, 255))
        objects.append(SceneObject(i + 1, colour, shape, size, radius, direction, mode, centres=centres, rgb=rgb))
    for depth, i in enumerate(rng.permutation(n)):
        objects[i].depth = int(depth)
    return objects


