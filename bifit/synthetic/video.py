"""One synthetic video: a scene resampled until every object has unambiguous expressions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from bifit.synthetic.config import SPLIT_CODES, SyntheticConfig
from bifit.synthetic.expressions import candidate_descriptions, choose_descriptions, phrase
from bifit.synthetic.render import render_frames, render_masks
from bifit.synthetic.sampling import sample_objects
from bifit.synthetic.scene import Description, Scene


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
        expressions = make_expressions(rng, scene, cfg.expressions_per_object, cfg.kind_weights)
        if expressions is None:
            continue
        frames = [f"{t * cfg.frame_stride:05d}" for t in range(cfg.frames_per_video)]
        rgb = render_frames(rng, objects, ids, cfg)
        return Video(video_id(cfg.seed, split, index), frames, scene, rgb, expressions)
    raise RuntimeError(f"synthetic {split} video {index}: no valid scene after max_attempts={cfg.max_attempts} "
                       "(objects too large for the frame? raise max_attempts or lower the radii)")


def make_expressions(rng, scene: Scene, per_object: int,
                     kind_weights: dict[str, float] | None = None) -> list[tuple[int, Description, str]] | None:
    out = []
    for o in scene.objects:
        chosen = choose_descriptions(rng, candidate_descriptions(scene, o.obj_id), per_object, kind_weights)
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


