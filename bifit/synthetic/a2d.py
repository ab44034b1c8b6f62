"""A tiny synthetic A2D-Sentences in the official on-disk format.

The scenes are the moving shapes of :mod:`bifit.synthetic` (same expression grammar, so the embedded text
encoder covers them). Each synthetic object is an A2D "instance" (instance id = obj_id - 1, 0-based like A2D).
Written files, as the real release and MTTR's JSON files lay them out::

    <root>/Release/clips320H/<video_id>.mp4                 H.264 (PyAV), decoded frame k (1-based) = frame k
    <root>/Release/videoset.csv                            no header, 9 columns, subset 0 = train, 1 = test
    <root>/text_annotations/a2d_annotation_with_instances/<video_id>/<frame:05d>.h5
                                                           instance (N,), reMask (N, W, H) or (W, H) for N = 1,
                                                           reBBox (4, N), id (N,)
    <root>/text_annotations/a2d_annotation.txt             video_id,instance_id,query (with header)
    <root>/text_annotations/a2d_missed_videos.txt          one id: listed in videoset.csv, never released
    <root>/a2d_sentences_single_frame_{train,test}_annotations.json   [query, video_id, frame_idx, instance_id]
    <root>/a2d_sentences_test_annotations_in_coco_format.json          COCO GT, image_id v_<vid>_f_<k>_i_<inst>

Like the real data the annotation file also holds the one malformed row (instance_id ``1 (copy)``) that every
consumer drops, and a "missed" video that must be excluded. The released JSON files are built here from the
in-memory scenes (not from the written ``.h5`` files), so that :mod:`bifit.prepare.a2d`, which rebuilds
them from the ``.h5`` files, is checked against an independent path.

Deterministic in ``SyntheticA2DConfig.seed`` (H.264 encoding is bit-exact with one encoder thread).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from bifit.config import check, int_in
from bifit.fsutil import staged_folder
from bifit.prepare.a2d import (
    ANNOTATION_TXT,
    COCO_GT_JSON,
    H5_DIR,
    MISSED_TXT,
    TEST_JSON,
    TRAIN_JSON,
    VIDEO_DIR,
    VIDEOSET_CSV,
    box_xyxy,
    coco_rle,
)
from bifit.synthetic.config import SyntheticConfig
from bifit.synthetic.video import Video, make_video

GENERATOR_VERSION = 2  # 2: expression kinds drawn as in the Ref-YouTube-VOS generator's version 2
MANIFEST_NAME = "SYNTHETIC_A2D.json"
BAD_INSTANCE_ROW = "1 (copy)"  # the malformed instance_id of the real a2d_annotation.txt


@dataclass(frozen=True)
class SyntheticA2DConfig:
    seed: int = 1
    num_train_videos: int = 4
    num_test_videos: int = 4
    frames_per_video: int = 12
    annotated_frames: int = 3  # frames per video with an .h5 file (A2D annotates 3 to 5)
    height: int = 96  # multiples of 32 (the scene generator's grid); the real clips are 320 high
    width: int = 128
    fps: int = 24

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "SyntheticA2DConfig"):
        for name, lo, hi in (("seed", 0, 2**32 - 1), ("num_train_videos", 1, 10_000), ("num_test_videos", 1, 10_000),
                             ("frames_per_video", 6, 1000), ("fps", 1, 120), ("height", 96, 2048),
                             ("width", 96, 2048)):
            check(int_in(getattr(self, name), lo, hi), f"{where}.{name}", f"an int in [{lo}, {hi}]", getattr(self, name))
        hi = self.frames_per_video - 2  # the first and last frames are never annotated
        check(int_in(self.annotated_frames, 1, hi), f"{where}.annotated_frames", f"an int in [1, {hi}]",
              self.annotated_frames)
        for name in ("height", "width"):
            check(getattr(self, name) % 32 == 0, f"{where}.{name}", "a multiple of 32", getattr(self, name))

    def scene_config(self) -> SyntheticConfig:
        return SyntheticConfig(seed=self.seed, num_train_videos=self.num_train_videos,
                               num_valid_videos=self.num_test_videos, num_test_videos=0,
                               frames_per_video=self.frames_per_video, height=self.height, width=self.width,
                               max_objects=4)


# ----------------------------------------------------------------------------------------------------------------
# shared by the synthetic A2D and JHMDB writers


def youtube_like_id(*parts) -> str:
    """An 11-character id in the YouTube alphabet (letters, digits, '-', '_'), like the A2D video ids."""
    digest = hashlib.sha1("/".join(map(str, parts)).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11]


def dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n")


def instance_masks(video: Video) -> np.ndarray:
    """Visible mask of every object, [T, N, H, W] bool (object n has obj_id video.scene.objects[n].obj_id)."""
    ids = video.scene.id_maps[:, None]
    return ids == np.asarray([o.obj_id for o in video.scene.objects])[None, :, None, None]


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Frames [T, H, W, 3] uint8 RGB to an H.264 mp4 (near-lossless, one thread so the bytes are reproducible)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "medium", "threads": "1"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_manifest(root: Path, name: str, generator: str) -> dict | None:
    path = Path(root) / name
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("generator") == generator else None


def write_dataset(root: Path, manifest_name: str, generator: str, version: int, config: dict,
                  writer: Callable[[Path], dict], overwrite: bool = False) -> dict:
    """Run ``writer(tmp_dir) -> summary`` into a sibling temp folder and move it to ``root``.

    Idempotent: a ``root`` written by the same generator, version and config is left alone (``generated`` False).
    A non-empty ``root`` without our manifest is refused unless ``overwrite``.
    """
    root = Path(root)
    manifest = read_manifest(root, manifest_name, generator)
    if manifest is not None and manifest.get("version") == version and manifest.get("config") == config:
        return {**manifest["summary"], "root": str(root), "generated": False, "seconds": 0.0}
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and manifest is None and not overwrite:
        raise FileExistsError(f"{root}: exists, is not empty and was not written by {generator} (no {manifest_name}); "
                              "pass overwrite=True to replace it")
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(root) as tmp:
        summary = writer(tmp)
        dump_json({"generator": generator, "version": version, "config": config, "summary": summary},
                  tmp / manifest_name)
    return {**summary, "root": str(root), "generated": True, "seconds": round(time.perf_counter() - start, 3)}


# ----------------------------------------------------------------------------------------------------------------
# A2D files


def annotated_frames(num_frames: int, count: int) -> list[int]:
    """1-based annotated frame numbers, evenly spread inside the video (first and last frame excluded)."""
    return sorted({int(round(x)) for x in np.linspace(1, num_frames, count + 2)[1:-1]})


def write_h5(path: Path, masks: np.ndarray, instance_ids: list[int], class_ids: list[int]) -> None:
    """One A2D annotation file: masks [N, H, W] bool stored transposed, (W, H) alone when N = 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = masks.transpose(0, 2, 1).astype(np.uint8)  # MATLAB v7.3 is column-major: (N, W, H)
    boxes = np.asarray([box_xyxy(m) for m in masks], dtype=np.float64).T  # (4, N)
    with h5py.File(path, "w") as f:
        f.create_dataset("instance", data=np.asarray(instance_ids, dtype=np.float64))
        f.create_dataset("reMask", data=stored[0] if len(instance_ids) == 1 else stored, compression="gzip")
        f.create_dataset("reBBox", data=boxes)
        f.create_dataset("id", data=np.asarray(class_ids, dtype=np.float64))


@dataclass
class _A2DVideo:
    video: Video
    video_id: str
    subset: int  # 0 train, 1 test
    frames: list[int]  # annotated, 1-based
    masks: np.ndarray  # [T, N, H, W]
    rows: list[tuple[int, str]]  # (instance_id, query) rows of a2d_annotation.txt

    def present(self, frame: int) -> list[int]:
        """Instance ids annotated in a frame (visible objects), ascending."""
        visible = self.video.scene.visible[frame - 1]
        return [o.obj_id - 1 for o, v in zip(self.video.scene.objects, visible) if v]


def _make_videos(cfg: SyntheticA2DConfig) -> list[_A2DVideo]:
    scene_cfg = cfg.scene_config()
    out = []
    for subset, split, count in ((0, "train", cfg.num_train_videos), (1, "valid", cfg.num_test_videos)):
        for index in range(count):
            video = make_video(scene_cfg, split, index)
            rows, seen = [], set()
            for obj_id, _, text in video.expressions:
                if subset == 1 and obj_id in seen:  # test: one sentence per instance (unique COCO image ids)
                    continue
                seen.add(obj_id)
                rows.append((obj_id - 1, text))
            out.append(_A2DVideo(video, youtube_like_id("a2d", cfg.seed, split, index), subset,
                                 annotated_frames(cfg.frames_per_video, cfg.annotated_frames),
                                 instance_masks(video), rows))
    return out


def _write_a2d(cfg: SyntheticA2DConfig, root: Path, progress: bool) -> dict:
    videos = _make_videos(cfg)
    missed_id = youtube_like_id("a2d", cfg.seed, "missed")
    samples = {0: [], 1: []}  # MTTR single-frame entries
    coco = {"categories": [{"id": 1, "name": "dummy_class"}], "images": [], "annotations": []}
    videoset, annotation_rows = [], []
    for v in tqdm(videos, desc="synthetic A2D videos", unit="video", disable=not progress):
        write_mp4(root / VIDEO_DIR / f"{v.video_id}.mp4", v.video.rgb, cfg.fps)
        for frame in v.frames:
            present = v.present(frame)
            rows = [v.video.scene.index(i + 1) for i in present]
            write_h5(root / H5_DIR / v.video_id / f"{frame:05d}.h5", v.masks[frame - 1, rows], present,
                     [11 + 10 * (v.video.scene.objects[r].obj_id % 7) for r in rows])
        label = 11 + 10 * (len(v.video.scene.objects) % 7)
        videoset.append([v.video_id, label, "0.000000", f"{cfg.frames_per_video / cfg.fps:.6f}", cfg.height,
                         cfg.width, cfg.frames_per_video, len(v.frames), v.subset])
        for instance, query in v.rows:
            annotation_rows.append([v.video_id, str(instance), query])
            for frame in v.frames:  # MTTR: every annotated frame in which the instance appears
                if instance not in v.present(frame):
                    continue
                samples[v.subset].append([query, v.video_id, frame, instance])
                if v.subset == 1:
                    mask = v.masks[frame - 1, v.video.scene.index(instance + 1)]
                    rle = coco_rle(mask)
                    x1, y1, x2, y2 = box_xyxy(mask)
                    image_id = f"v_{v.video_id}_f_{frame}_i_{instance}"
                    coco["images"].append({"id": image_id, "height": cfg.height, "width": cfg.width})
                    coco["annotations"].append({
                        "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                        "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "iscrowd": 0})
    # the real quirks: a malformed row in a train video, and a test video listed but never released
    first_train = next(v for v in videos if v.subset == 0)
    annotation_rows.insert(1, [first_train.video_id, BAD_INSTANCE_ROW, first_train.rows[0][1]])
    videoset.append([missed_id, 11, "0.000000", "1.000000", cfg.height, cfg.width, cfg.frames_per_video, 3, 1])
    annotation_rows.append([missed_id, "0", "the missing video's object"])

    (root / VIDEOSET_CSV).parent.mkdir(parents=True, exist_ok=True)
    with (root / VIDEOSET_CSV).open("w", newline="") as fh:
        csv.writer(fh).writerows(videoset)
    (root / ANNOTATION_TXT).parent.mkdir(parents=True, exist_ok=True)
    with (root / ANNOTATION_TXT).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "instance_id", "query"])
        writer.writerows(annotation_rows)
    (root / MISSED_TXT).write_text(missed_id + "\n")
    dump_json(samples[0], root / TRAIN_JSON)
    dump_json(samples[1], root / TEST_JSON)
    dump_json(coco, root / COCO_GT_JSON)
    return {"train_videos": cfg.num_train_videos, "test_videos": cfg.num_test_videos,
            "train_samples": len(samples[0]), "test_samples": len(samples[1]),
            "h5_files": sum(len(v.frames) for v in videos)}


def generate_a2d(cfg: SyntheticA2DConfig, root, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the synthetic A2D-Sentences to ``root`` (idempotent, atomic; see :func:`write_dataset`)."""
    config = json.loads(json.dumps(asdict(cfg)))
    return write_dataset(Path(root), MANIFEST_NAME, "bifit.synthetic.a2d", GENERATOR_VERSION, config,
                         lambda tmp: _write_a2d(cfg, tmp, progress), overwrite)
