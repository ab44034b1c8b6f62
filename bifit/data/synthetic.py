"""Embedded default benchmark: a synthetic referring-video dataset written in the Ref-YouTube-VOS on-disk format.

Each video shows 3 to 5 moving shapes (circle, square, triangle, diamond; small or large; six colours) over a textured
background (smooth noise, stripes or gradients, slowly panning). Objects move in a dominant direction, cross each
other (occlusion, painted in depth order) and leave or enter the frame. Attributes are drawn so that distractors share
them with other objects (same colour other shape, same shape other size), so a model must read the expression.
Expressions combine colour, shape, size, motion direction, position ("the leftmost ...") and relations ("the small
blue square left of the circle"). Every expression is checked, by construction, to pick out exactly one object of its
video: all other objects fail the description clearly, in every frame where the spatial terms are evaluated.

Layout written under ``root`` (DATASETS_AND_EVAL.md sections 2.2 and 2.3)::

    meta_expressions/{train,valid,test}/meta_expressions.json
    train/JPEGImages/<vid>/<frame>.jpg    train/Annotations/<vid>/<frame>.png    train/meta.json
    valid/JPEGImages/<vid>/<frame>.jpg    (valid and test videos, like the competition's valid archive)
    valid/Annotations/<vid>/<frame>.png   valid/meta.json       <- synthetic only: local ground truth of valid videos
    synthetic_scenes.json                 object attributes, trajectories and parsed expressions (for tests/analysis)
    SYNTHETIC_BENCHMARK.json              manifest: generator version, config and counts (marks the folder as ours)

Differences from the real Ref-YouTube-VOS, all additive so the real loader reads the data unchanged: the real valid
split has no public ground truth, here ``valid/Annotations`` and ``valid/meta.json`` exist and the valid
``meta_expressions`` entries carry ``obj_id`` so predictions can be scored locally. The valid meta lists the valid
and the test videos, and the test meta lists the test videos (the valid-minus-test filter of section 2.4 applies).
Categories in ``meta.json`` are the shape names (``SYNTHETIC_CATEGORIES``), not the 65 YTVOS classes.

Everything is deterministic in ``SyntheticConfig.seed``: each video draws from its own generator seeded by
``(seed, split, index)``, and the written bytes are identical across runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bifit.config import check, int_in
from bifit.data.fsutil import replace_dir

GENERATOR_VERSION = 1
MANIFEST_NAME = "SYNTHETIC_BENCHMARK.json"
SCENES_NAME = "synthetic_scenes.json"

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 195),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
SYNTHETIC_CATEGORIES = tuple(sorted(SHAPES))
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OPPOSITE_SIZE = {"small": "large", "large": "small"}
EXTREME_TO_RELATION = {"left": "left", "right": "right", "top": "above", "bottom": "below"}
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
RELATION_MARGIN = 0.04  # fraction of the frame side a spatial relation must hold by, in every co-visible frame
ATTRIBUTES = ("size", "colour", "shape", "motion")


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_train_videos: int = 60
    num_valid_videos: int = 12
    num_test_videos: int = 3
    frames_per_video: int = 12
    frame_stride: int = 5  # frame names 00000, 00005, ... like the released every-5th-frame YTVOS frames
    height: int = 192
    width: int = 320
    min_objects: int = 3
    max_objects: int = 5
    expressions_per_object: int = 2
    small_radius: tuple[int, int] = (9, 12)
    large_radius: tuple[int, int] = (18, 24)
    min_visible_pixels: int = 20  # an object counts as present in a frame with at least this many visible pixels
    jpeg_quality: int = 90
    max_attempts: int = 200  # scene resamplings per video before giving up

    def __post_init__(self):
        object.__setattr__(self, "small_radius", tuple(self.small_radius))
        object.__setattr__(self, "large_radius", tuple(self.large_radius))
        self.validate()

    def validate(self, where: str = "SyntheticConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_train_videos", 1, 100_000),
                             ("num_valid_videos", 1, 100_000), ("num_test_videos", 0, 100_000),
                             ("frames_per_video", 4, 1000), ("frame_stride", 1, 100), ("height", 96, 2048),
                             ("width", 96, 2048), ("min_objects", 3, 8), ("max_objects", self.min_objects, 8),
                             ("expressions_per_object", 1, 6)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]",
                  getattr(self, name))
            if name in ("height", "width"):
                check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32 in [96, 2048]",
                      getattr(self, name))
        limit = min(self.height, self.width) // 4
        for name in ("small_radius", "large_radius"):  # large: at least 1.4x the largest small radius
            pair = getattr(self, name)
            lo = 3 if name == "small_radius" else int(np.ceil(1.4 * self.small_radius[1]))
            check(len(pair) == 2 and all(int_in(v, lo, limit) for v in pair) and pair[0] <= pair[1],
                  f"{where}.{name}", f"(min, max) ints with {lo} <= min <= max <= {limit}", pair)
        for name, lo, hi in (("min_visible_pixels", 1, int(np.pi * self.small_radius[0] ** 2 / 2)),
                             ("jpeg_quality", 50, 100), ("max_attempts", 1, 100_000)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]",
                  getattr(self, name))


# ----------------------------------------------------------------------------------------------------------------
# scene model


@dataclass
class SceneObject:
    obj_id: int
    colour: str
    shape: str
    size: str
    radius: float
    direction: str
    mode: str  # "inside" | "exit" | "enter" | "cross"
    depth: int = 0  # paint order, larger is in front
    centres: np.ndarray = field(default=None, repr=False)  # [T, 2] (x, y)
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Scene:
    height: int
    width: int
    objects: list[SceneObject]
    id_maps: np.ndarray = field(default=None, repr=False)  # [T, H, W] uint8, visible object id per pixel
    visible: np.ndarray = field(default=None, repr=False)  # [T, N] bool, >= min_visible_pixels visible
    pair_cache: dict = field(default_factory=dict, repr=False)

    def by_id(self, obj_id: int) -> SceneObject:
        return next(o for o in self.objects if o.obj_id == obj_id)

    def index(self, obj_id: int) -> int:
        return next(i for i, o in enumerate(self.objects) if o.obj_id == obj_id)


@dataclass(frozen=True)
class Description:
    """Structured referring expression. Attribute fields are equality tests; ``extreme`` ("left", "right", "top",
    "bottom") selects the extreme object among those matching the attributes; ``relation`` ("left", "right",
    "above", "below") relates the target to the object picked by ``ref`` (attributes only)."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    motion: str | None = None
    extreme: str | None = None
    relation: str | None = None
    ref: Description | None = None

    def attributes(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "ref"}
        if self.ref is not None:
            d["ref"] = self.ref.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Description:
        d = dict(d)
        ref = d.pop("ref", None)
        return cls(**d, ref=cls.from_dict(ref) if ref is not None else None)


HOLDS, FAILS, UNCLEAR = 1, -1, 0


def pair_state(scene: Scene, a: int, b: int, relation: str) -> int:
    """Whether object ``a`` is ``relation`` of object ``b`` in every frame where both are visible."""
    key = (a, b, relation)
    if key not in scene.pair_cache:
        scene.pair_cache[key] = _pair_state(scene, a, b, relation)
    return scene.pair_cache[key]


def _pair_state(scene: Scene, a: int, b: int, relation: str) -> int:
    ia, ib = scene.index(a), scene.index(b)
    frames = scene.visible[:, ia] & scene.visible[:, ib]
    if frames.sum() < 2:
        return UNCLEAR
    ca, cb = scene.objects[ia].centres[frames], scene.objects[ib].centres[frames]
    axis, sign = {"left": (0, 1), "right": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
    gap = sign * (cb[:, axis] - ca[:, axis])  # positive where the relation holds
    margin = RELATION_MARGIN * (scene.width if axis == 0 else scene.height)
    if np.all(gap >= margin):
        return HOLDS
    if np.all(gap <= -margin):
        return FAILS
    return UNCLEAR


def attribute_matches(scene: Scene, desc: Description) -> list[int]:
    want = desc.attributes()
    return [o.obj_id for o in scene.objects if all(getattr(o, "direction" if k == "motion" else k) == v
                                                   for k, v in want.items())]


def spatial_state(scene: Scene, desc: Description, obj_id: int, group: list[int]) -> int:
    """State of the spatial part of ``desc`` for ``obj_id`` (HOLDS when there is none)."""
    if desc.relation is not None:
        refs = resolve(scene, desc.ref)
        if len(refs) != 1 or refs[0] == obj_id:
            return UNCLEAR
        return pair_state(scene, obj_id, refs[0], desc.relation)
    if desc.extreme is not None:
        relation = EXTREME_TO_RELATION[desc.extreme]
        states = [pair_state(scene, obj_id, other, relation) for other in group if other != obj_id]
        if any(s == FAILS for s in states):
            return FAILS
        return HOLDS if all(s == HOLDS for s in states) else UNCLEAR
    return HOLDS


def resolve(scene: Scene, desc: Description) -> list[int]:
    """Ids of the objects ``desc`` may refer to: those not clearly ruled out. Unambiguous iff exactly one remains and
    its description clearly holds (see :func:`is_unambiguous`)."""
    group = attribute_matches(scene, desc)
    return [o for o in group if spatial_state(scene, desc, o, group) != FAILS]


def is_unambiguous(scene: Scene, desc: Description, obj_id: int) -> bool:
    group = attribute_matches(scene, desc)
    return resolve(scene, desc) == [obj_id] and spatial_state(scene, desc, obj_id, group) == HOLDS


# ----------------------------------------------------------------------------------------------------------------
# sampling


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


# ----------------------------------------------------------------------------------------------------------------
# rendering


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


# ----------------------------------------------------------------------------------------------------------------
# expressions


def candidate_descriptions(scene: Scene, obj_id: int) -> list[Description]:
    """Every unambiguous description of ``obj_id`` built from attribute subsets, extremes and relations."""
    target = scene.by_id(obj_id)
    values = {"size": target.size, "colour": target.colour, "shape": target.shape, "motion": target.direction}
    out = []
    refs = [d for o in scene.objects if o.obj_id != obj_id for d in _reference_descriptions(scene, o.obj_id)]
    for k in range(0, len(ATTRIBUTES) + 1):
        for subset in itertools.combinations(ATTRIBUTES, k):
            base = Description(**{a: values[a] for a in subset})
            group = attribute_matches(scene, base)
            if k and group == [obj_id]:
                out.append(base)
            if len(group) >= 2:  # "the leftmost ..." only makes sense among several
                out.extend(Description(**base.attributes(), extreme=e) for e in EXTREME_TO_RELATION)
            for ref in refs:  # relations may over-specify: "the small blue square left of the circle"
                if obj_id in attribute_matches(scene, ref) or len(ref.attributes()) > 2:
                    continue
                for relation in ("left", "right", "above", "below"):
                    out.append(Description(**base.attributes(), relation=relation, ref=ref))
    return [d for d in out if is_unambiguous(scene, d, obj_id)]


def _reference_descriptions(scene: Scene, obj_id: int) -> list[Description]:
    """Static one- or two-attribute descriptions that pick ``obj_id`` alone (used as relation anchors)."""
    o = scene.by_id(obj_id)
    values = {"size": o.size, "colour": o.colour, "shape": o.shape}
    out = []
    for k in (1, 2):
        for subset in itertools.combinations(values, k):
            d = Description(**{a: values[a] for a in subset})
            if attribute_matches(scene, d) == [obj_id]:
                out.append(d)
    return out


def description_kind(desc: Description) -> str:
    if desc.relation is not None:
        return "relation"
    if desc.extreme is not None:
        return "position"
    return "motion" if desc.motion is not None else "attribute"


def choose_descriptions(rng, candidates: list[Description], k: int) -> list[Description]:
    """Up to ``k`` distinct descriptions, cycling over kinds in random order and preferring short ones."""
    by_kind: dict[str, list[Description]] = {}
    for d in candidates:
        by_kind.setdefault(description_kind(d), []).append(d)
    kinds = [str(x) for x in rng.permutation(sorted(by_kind))]
    chosen: list[Description] = []
    while len(chosen) < k and any(by_kind.values()):
        for kind in kinds:
            pool = by_kind[kind]
            if not pool or len(chosen) == k:
                continue
            lengths = np.asarray([len(d.attributes()) + (d.ref is not None) for d in pool], dtype=np.float64)
            weights = np.exp(-0.8 * lengths)
            chosen.append(pool.pop(int(rng.choice(len(pool), p=weights / weights.sum()))))
    return chosen


MOTION_PHRASES = {
    "left": ("moving left", "moving to the left", "that moves left", "going left"),
    "right": ("moving right", "moving to the right", "that moves right", "going right"),
    "up": ("moving up", "moving upwards", "that moves up", "going up"),
    "down": ("moving down", "moving downwards", "that moves down", "going down"),
}
EXTREME_PREFIX = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "lowest"}
EXTREME_SUFFIX = {"left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
                  "bottom": ("at the bottom",)}
RELATION_PHRASES = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


def noun_phrase(rng, desc: Description) -> str:
    words = [w for w in (desc.size, desc.colour) if w]
    words.append(desc.shape or str(rng.choice(["object", "shape"])))
    return " ".join(words)


def phrase(rng, desc: Description) -> str:
    """English text for a description, e.g. "the small blue square to the left of the circle"."""
    np_ = noun_phrase(rng, desc)
    suffix = ""
    if desc.extreme is not None:
        if desc.motion is not None or rng.random() < 0.5:
            np_ = f"{EXTREME_PREFIX[desc.extreme]} {np_}"
        else:
            suffix = " " + str(rng.choice(EXTREME_SUFFIX[desc.extreme]))
    parts = [f"the {np_}"]
    relation = None
    if desc.relation is not None:
        relation = f"{rng.choice(RELATION_PHRASES[desc.relation])} the {noun_phrase(rng, desc.ref)}"
    if desc.motion is not None and relation is not None:
        parts.append(f"that moves {desc.motion} and is {relation}")
    elif desc.motion is not None:
        parts.append(str(rng.choice(MOTION_PHRASES[desc.motion])))
    elif relation is not None:
        parts.append(relation)
    return " ".join(parts) + suffix


# ----------------------------------------------------------------------------------------------------------------
# one video


@dataclass
class Video:
    video_id: str
    frames: list[str]
    scene: Scene
    rgb: np.ndarray  # [T, H, W, 3] uint8
    expressions: list[tuple[int, Description, str]]  # (obj_id, description, text)


def video_id(seed: int, split: str, index: int) -> str:
    return hashlib.sha1(f"bifit-synthetic/{seed}/{split}/{index}".encode()).hexdigest()[:10]


def _scene_ok(scene: Scene, full: np.ndarray, cfg: SyntheticConfig) -> bool:
    """At least one object fully out of frame somewhere, one occluded by >= 25 %, all visible in >= half the frames."""
    in_frame = full.sum(axis=(2, 3))  # [T, N]
    visible_px = np.stack([(scene.id_maps == o.obj_id).sum(axis=(1, 2)) for o in scene.objects], 1)  # [T, N]
    left_frame = bool((in_frame == 0).any())
    occluded = bool(((in_frame > 0) & (visible_px <= 0.75 * in_frame)).any())
    present = (visible_px >= cfg.min_visible_pixels).sum(0) >= int(np.ceil(cfg.frames_per_video / 2))
    return left_frame and occluded and bool(present.all())


def make_video(cfg: SyntheticConfig, split: str, index: int) -> Video:
    rng = np.random.default_rng([cfg.seed, SPLIT_CODES[split], index])
    for _ in range(cfg.max_attempts):
        objects = sample_objects(rng, cfg)
        ids, full = render_masks(objects, cfg)
        scene = Scene(cfg.height, cfg.width, objects, id_maps=ids)
        scene.visible = np.stack([(ids == o.obj_id).sum(axis=(1, 2)) >= cfg.min_visible_pixels for o in objects], 1)
        if not _scene_ok(scene, full, cfg):
            continue
        expressions = make_expressions(rng, scene, cfg.expressions_per_object)
        if expressions is None:
            continue
        frames = [f"{t * cfg.frame_stride:05d}" for t in range(cfg.frames_per_video)]
        rgb = render_frames(rng, objects, ids, cfg)
        return Video(video_id(cfg.seed, split, index), frames, scene, rgb, expressions)
    raise RuntimeError(f"synthetic {split} video {index}: no valid scene after max_attempts={cfg.max_attempts} "
                       "(objects too large for the frame? raise max_attempts or lower the radii)")


def make_expressions(rng, scene: Scene, per_object: int) -> list[tuple[int, Description, str]] | None:
    out = []
    for o in scene.objects:
        chosen = choose_descriptions(rng, candidate_descriptions(scene, o.obj_id), per_object)
        if not chosen:
            return None
        texts: set[str] = set()
        for i in range(per_object):
            desc = chosen[i % len(chosen)]
            text = phrase(rng, desc)
            for _ in range(8):  # re-phrase a reused description until the text differs
                if text not in texts:
                    break
                text = phrase(rng, desc)
            if text in texts:
                continue
            texts.add(text)
            out.append((o.obj_id, desc, text))
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing


def ytvos_palette() -> list[int]:
    """The 256-colour VOC/DAVIS palette used by YTVOS annotation PNGs (index 1 = dark red, 2 = green, ...)."""
    palette = []
    for i in range(256):
        rgb, c = [0, 0, 0], i
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette.extend(rgb)
    return palette


PALETTE = ytvos_palette()


def write_video(video: Video, image_dir: Path, ann_dir: Path | None, cfg: SyntheticConfig) -> None:
    (image_dir / video.video_id).mkdir(parents=True)
    if ann_dir is not None:
        (ann_dir / video.video_id).mkdir(parents=True)
    for t, name in enumerate(video.frames):
        Image.fromarray(video.rgb[t]).save(image_dir / video.video_id / f"{name}.jpg", quality=cfg.jpeg_quality)
        if ann_dir is not None:
            png = Image.fromarray(video.scene.id_maps[t], mode="P")
            png.putpalette(PALETTE)
            png.save(ann_dir / video.video_id / f"{name}.png")


def video_meta(video: Video) -> dict:
    """meta.json entry: objects -> {category, frames where visible}."""
    objects = {}
    for i, o in enumerate(video.scene.objects):
        frames = [f for f, v in zip(video.frames, video.scene.visible[:, i]) if v]
        objects[str(o.obj_id)] = {"category": o.shape, "frames": frames}
    return {"objects": objects}


def expressions_meta(video: Video, with_obj_id: bool) -> dict:
    exps = {}
    for exp_id, (obj_id, _, text) in enumerate(video.expressions):
        exps[str(exp_id)] = {"exp": text, "obj_id": str(obj_id)} if with_obj_id else {"exp": text}
    return {"expressions": exps, "frames": list(video.frames)}


def scene_record(video: Video) -> dict:
    return {
        "objects": [
            {"obj_id": o.obj_id, "colour": o.colour, "shape": o.shape, "size": o.size, "radius": o.radius,
             "direction": o.direction, "mode": o.mode, "depth": o.depth,
             "centres": o.centres.tolist()}  # full precision: re-rasterising gives the written masks
            for o in video.scene.objects
        ],
        "expressions": {str(i): {"obj_id": str(obj), "exp": text, "description": d.to_dict()}
                        for i, (obj, d, text) in enumerate(video.expressions)},
    }


def _dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_split(cfg, root: Path, split: str, count: int, bar, metas: dict, scenes: dict) -> None:
    """Generate ``count`` videos of ``split`` ("train", "valid" or "test") and collect their JSON entries."""
    image_split = "train" if split == "train" else "valid"  # test videos live in the valid archive
    ann_dir = None if split == "test" else root / image_split / "Annotations"
    for index in range(count):
        video = make_video(cfg, split, index)
        write_video(video, root / image_split / "JPEGImages", ann_dir, cfg)
        if split != "test":
            metas[image_split][video.video_id] = video_meta(video)
        metas[f"exp_{split}"][video.video_id] = expressions_meta(video, with_obj_id=split != "test")
        scenes[split][video.video_id] = scene_record(video)
        bar.update(1)


def _write_benchmark(cfg: SyntheticConfig, root: Path, progress: bool) -> dict:
    metas = {"train": {}, "valid": {}, "exp_train": {}, "exp_valid": {}, "exp_test": {}}
    scenes = {"train": {}, "valid": {}, "test": {}}
    total = cfg.num_train_videos + cfg.num_valid_videos + cfg.num_test_videos
    with tqdm(total=total, desc="synthetic videos", unit="video", disable=not progress) as bar:
        _write_split(cfg, root, "train", cfg.num_train_videos, bar, metas, scenes)
        _write_split(cfg, root, "valid", cfg.num_valid_videos, bar, metas, scenes)
        _write_split(cfg, root, "test", cfg.num_test_videos, bar, metas, scenes)
    _dump_json({"videos": metas["train"]}, root / "train" / "meta.json")
    _dump_json({"videos": metas["valid"]}, root / "valid" / "meta.json")
    # the competition's valid meta lists valid + test videos; the test meta lists the test videos only
    _dump_json({"videos": metas["exp_train"]}, root / "meta_expressions" / "train" / "meta_expressions.json")
    _dump_json({"videos": {**metas["exp_valid"], **metas["exp_test"]}},
               root / "meta_expressions" / "valid" / "meta_expressions.json")
    _dump_json({"videos": metas["exp_test"]}, root / "meta_expressions" / "test" / "meta_expressions.json")
    _dump_json(scenes, root / SCENES_NAME)
    summary = _summary(cfg, metas)
    _dump_json({"generator": "bifit.data.synthetic", "version": GENERATOR_VERSION, "config": asdict(cfg),
                "summary": summary}, root / MANIFEST_NAME)
    return summary


def _summary(cfg: SyntheticConfig, metas: dict) -> dict:
    def count(split, key):
        return sum(len(v[key]) for v in metas[split].values())

    return {
        "train_videos": len(metas["exp_train"]),
        "valid_videos": len(metas["exp_valid"]),
        "test_videos": len(metas["exp_test"]),
        "train_expressions": count("exp_train", "expressions"),
        "valid_expressions": count("exp_valid", "expressions"),
        "test_expressions": count("exp_test", "expressions"),
        "train_objects": count("train", "objects"),
        "valid_objects": count("valid", "objects"),
        "frames": (cfg.num_train_videos + cfg.num_valid_videos + cfg.num_test_videos) * cfg.frames_per_video,
    }


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("generator") == "bifit.data.synthetic" else None


def generate_benchmark(cfg: SyntheticConfig, root: Path, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the synthetic benchmark to ``root`` and return its counts.

    Idempotent: if ``root`` already holds a benchmark written by this generator (same version and config) nothing
    is written and ``generated`` is False. The data is first written to a temporary sibling folder and renamed into
    place. A non-empty ``root`` that this generator did not write is refused unless ``overwrite=True``; a benchmark of
    ours with another config is replaced.
    """
    root = Path(root)
    manifest = read_manifest(root)
    config = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as stored in the manifest
    if manifest is not None and manifest["version"] == GENERATOR_VERSION and manifest["config"] == config:
        return {**manifest["summary"], "root": str(root), "generated": False, "seconds": 0.0}
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and manifest is None and not overwrite:
        raise FileExistsError(f"{root}: exists, is not empty and was not written by bifit.data.synthetic "
                              f"(no {MANIFEST_NAME}); pass overwrite=True to replace it")
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        summary = _write_benchmark(cfg, tmp, progress)
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "root": str(root), "generated": True, "seconds": round(time.perf_counter() - start, 3)}


def load_scenes(root: Path) -> dict:
    """The ``synthetic_scenes.json`` sidecar: split -> video -> {objects, expressions}."""
    return json.loads((Path(root) / SCENES_NAME).read_text())


def scene_from_record(record: dict, id_maps: np.ndarray, min_visible_pixels: int) -> Scene:
    """Rebuild a :class:`Scene` from a sidecar record and the annotation id maps [T, H, W] read from disk."""
    objects = [SceneObject(o["obj_id"], o["colour"], o["shape"], o["size"], o["radius"], o["direction"], o["mode"],
                           o["depth"], np.asarray(o["centres"], dtype=np.float64)) for o in record["objects"]]
    scene = Scene(id_maps.shape[1], id_maps.shape[2], objects, id_maps=id_maps)
    scene.visible = np.stack([(id_maps == o.obj_id).sum(axis=(1, 2)) >= min_visible_pixels for o in objects], 1)
    return scene
