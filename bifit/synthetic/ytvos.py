"""Embedded default benchmark: a synthetic referring-video dataset written in the Ref-YouTube-VOS on-disk format.

Each video shows 3 to 5 moving shapes (circle, square, triangle, diamond; small or large; six colours) over a textured
background (smooth noise, stripes or gradients, slowly panning). Objects move in a dominant direction, cross each
other (occlusion, painted in depth order) and leave or enter the frame. Attributes are drawn so that distractors share
them with other objects (same colour other shape, same shape other size), so a model must read the expression.
Expressions combine colour, shape, size, motion direction, position ("the leftmost ...") and relations ("the small
blue square left of the circle"). Every expression is checked, by construction, to pick out exactly one object of its
video: all other objects fail the description clearly, in every frame where the spatial terms are evaluated.

Layout written under ``root`` (the competition's layout and files)::

    meta_expressions/{train,valid,test}/meta_expressions.json
    train/JPEGImages/<vid>/<frame>.jpg    train/Annotations/<vid>/<frame>.png    train/meta.json
    valid/JPEGImages/<vid>/<frame>.jpg    (valid and test videos, like the competition's valid archive)
    valid/Annotations/<vid>/<frame>.png   valid/meta.json       <- synthetic only: local ground truth of valid videos
    synthetic_scenes.json                 object attributes, trajectories and parsed expressions (for tests/analysis)
    SYNTHETIC_BENCHMARK.json              manifest: generator version, config and counts (marks the folder as ours)

Differences from the real Ref-YouTube-VOS, all additive so the real loader reads the data unchanged: the real valid
split has no public ground truth, here ``valid/Annotations`` and ``valid/meta.json`` exist and the valid
``meta_expressions`` entries carry ``obj_id`` so predictions can be scored locally. The valid meta lists the valid
and the test videos, and the test meta lists the test videos (so the valid split is the valid meta minus the test
meta, as for the real data). Categories in ``meta.json`` are the shape names (``SYNTHETIC_CATEGORIES``), not
the 65 YTVOS classes.

Everything is deterministic in ``SyntheticConfig.seed``: each video draws from its own generator seeded by
``(seed, split, index)``, and the written bytes are identical across runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bifit.fsutil import staged_folder
from bifit.synthetic.config import GENERATOR_VERSION, MANIFEST_NAME, SCENES_NAME, SyntheticConfig
from bifit.synthetic.expressions import description_kind
from bifit.synthetic.scene import Description, Scene, SceneObject
from bifit.synthetic.video import Video, make_video


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
    _dump_json({"generator": "bifit.synthetic", "version": GENERATOR_VERSION, "config": asdict(cfg),
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
    return manifest if manifest.get("generator") == "bifit.synthetic" else None


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
        raise FileExistsError(f"{root}: exists, is not empty and was not written by bifit.synthetic "
                              f"(no {MANIFEST_NAME}); pass overwrite=True to replace it")
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(root) as tmp:
        summary = _write_benchmark(cfg, tmp, progress)
    return {**summary, "root": str(root), "generated": True, "seconds": round(time.perf_counter() - start, 3)}


def load_scenes(root: Path) -> dict:
    """The ``synthetic_scenes.json`` sidecar: split -> video -> {objects, expressions}."""
    return json.loads((Path(root) / SCENES_NAME).read_text())


def expression_kinds(root: Path, split: str) -> dict[tuple[str, str], str] | None:
    """(video, exp_id) -> the expression's kind (attribute, motion, position, relation) from the sidecar of a
    generated benchmark; None where ``root`` has no sidecar (real data)."""
    if not (Path(root) / SCENES_NAME).is_file():
        return None
    return {(video, exp_id): description_kind(Description.from_dict(exp["description"]))
            for video, record in load_scenes(root)[split].items() for exp_id, exp in record["expressions"].items()}


def scene_from_record(record: dict, id_maps: np.ndarray, min_visible_pixels: int) -> Scene:
    """Rebuild a :class:`Scene` from a sidecar record and the annotation id maps [T, H, W] read from disk."""
    objects = [SceneObject(o["obj_id"], o["colour"], o["shape"], o["size"], o["radius"], o["direction"], o["mode"],
                           o["depth"], np.asarray(o["centres"], dtype=np.float64)) for o in record["objects"]]
    scene = Scene(id_maps.shape[1], id_maps.shape[2], objects, id_maps=id_maps)
    scene.visible = np.stack([(id_maps == o.obj_id).sum(axis=(1, 2)) >= min_visible_pixels for o in objects], 1)
    return scene
