"""A tiny synthetic JHMDB-Sentences in the official on-disk format.

Each video is a moving-shapes scene of :mod:`bifit.synthetic`; one of its objects plays the JHMDB actor: its
visible mask is the puppet mask and one referring expression of it is the video's sentence. Written files::

    <root>/Rename_Images/<action>/<video_id>/00001.png ...      1-based, 5-digit PNG frames
    <root>/puppet_mask/<action>/<video_id>/puppet_mask.mat      key part_mask, (H, W, T_mask) uint8
    <root>/jhmdb_annotation.txt                                 video_id,query (with header), one row per video
    <root>/jhmdb_sentences_samples_metadata.json                [video_id, chosen_frame_path, masks_path,
                                                                 video_total_frames, query], 3 per video, paths
                                                                 starting with ./jhmdb_sentences/
    <root>/jhmdb_sentences_gt_annotations_in_coco_format.json   COCO GT, image_id v_<video_id>_f_<frame>, no bbox

As in the real data the puppet mask of some videos is one frame shorter than the video, so
video_total_frames = min(#frames, T_mask). The released files are built from the in-memory scenes, so the
preparation, which rebuilds the GT from the ``.mat`` files, is checked against an independent path.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from bifit.config import check, int_in
from bifit.prepare.a2d import coco_gt_dataset
from bifit.prepare.jhmdb import ANNOTATION_TXT, COCO_GT_JSON, FRAME_DIR, MASK_DIR, METADATA_JSON, PATH_PREFIX
from bifit.synthetic.a2d import dump_json, instance_masks, write_dataset, youtube_like_id
from bifit.synthetic.config import SyntheticConfig
from bifit.synthetic.video import make_video

GENERATOR_VERSION = 2  # 2: expression kinds drawn as in the Ref-YouTube-VOS generator's version 2
MANIFEST_NAME = "SYNTHETIC_JHMDB.json"
ACTIONS = ("catch", "climb_stairs", "jump", "pullup", "run", "walk", "wave")
SAMPLES_PER_VIDEO = 3


@dataclass(frozen=True)
class SyntheticJHMDBConfig:
    seed: int = 2
    num_videos: int = 4
    frames_per_video: int = 12
    height: int = 96  # multiples of 32 (the scene generator's grid); the real frames are 240x320
    width: int = 128

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "SyntheticJHMDBConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_videos", 1, 10_000), ("frames_per_video", 6, 1000),
                             ("height", 96, 2048), ("width", 96, 2048)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]", getattr(self, name))
        for name in ("height", "width"):
            check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32", getattr(self, name))

    def scene_config(self) -> SyntheticConfig:
        return SyntheticConfig(seed=self.seed, num_train_videos=1, num_valid_videos=self.num_videos,
                               num_test_videos=0, frames_per_video=self.frames_per_video, height=self.height,
                               width=self.width, max_objects=4)


def _write_jhmdb(cfg: SyntheticJHMDBConfig, root: Path, progress: bool) -> dict:
    scene_cfg = cfg.scene_config()
    metadata, annotation_rows, gt_records = [], [], []
    for index in tqdm(range(cfg.num_videos), desc="synthetic JHMDB videos", unit="video", disable=not progress):
        video = make_video(scene_cfg, "valid", index)
        rng = np.random.default_rng([cfg.seed, index])
        action = ACTIONS[index % len(ACTIONS)]
        video_id = f"synthetic_{action}_{youtube_like_id('jhmdb', cfg.seed, index)}_{index}"
        visible_frames = video.scene.visible.sum(0)  # [N]
        obj_id, _, query = max(video.expressions, key=lambda e: visible_frames[video.scene.index(e[0])])
        actor = instance_masks(video)[:, video.scene.index(obj_id)]  # [T, H, W]
        num_masks = cfg.frames_per_video - (index % 2)  # odd videos: the puppet mask lacks the last frame
        total = min(cfg.frames_per_video, num_masks)
        frame_dir = root / FRAME_DIR / action / video_id
        frame_dir.mkdir(parents=True)
        for t in range(cfg.frames_per_video):
            Image.fromarray(video.rgb[t]).save(frame_dir / f"{t + 1:05d}.png")
        mat_path = root / MASK_DIR / action / video_id / "puppet_mask.mat"
        mat_path.parent.mkdir(parents=True)
        scipy.io.savemat(mat_path, {"part_mask": actor[:num_masks].transpose(1, 2, 0).astype(np.uint8)},
                         do_compression=True)
        candidates = [t + 1 for t in range(total) if video.scene.visible[t, video.scene.index(obj_id)]]
        chosen = sorted(int(c) for c in rng.choice(candidates, SAMPLES_PER_VIDEO, replace=False))
        annotation_rows.append([video_id, query])
        for c in chosen:
            metadata.append([video_id, f"{PATH_PREFIX}{FRAME_DIR}/{action}/{video_id}/{c:05d}.png",
                             f"{PATH_PREFIX}{MASK_DIR}/{action}/{video_id}/puppet_mask.mat", total, query])
            gt_records.append({"image_id": f"v_{video_id}_f_{c}", "mask": actor[c - 1], "bbox": None})
    with (root / ANNOTATION_TXT).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "query"])
        writer.writerows(annotation_rows)
    dump_json(metadata, root / METADATA_JSON)
    dump_json(coco_gt_dataset(gt_records), root / COCO_GT_JSON)
    return {"videos": cfg.num_videos, "samples": len(metadata)}


def generate_jhmdb(cfg: SyntheticJHMDBConfig, root, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the synthetic JHMDB-Sentences to ``root`` (idempotent, atomic)."""
    config = json.loads(json.dumps(asdict(cfg)))
    return write_dataset(Path(root), MANIFEST_NAME, "bifit.synthetic.jhmdb", GENERATOR_VERSION, config,
                         lambda tmp: _write_jhmdb(cfg, tmp, progress), overwrite)
