"""A2D-Sentences preparation: instance masks, the COCO ground truth for mAP and sample indices, all from the
official ``.h5`` annotations.

    preprocess(raw_root, out_root) -> summary dict

Reads ``raw_root`` (the released layout: ``Release/clips320H/*.mp4``, ``Release/videoset.csv``,
``text_annotations/`` and MTTR's JSON files; see :mod:`bifit.prepare.sources`) and writes ``out_root``::

    index_train.json, index_test.json   {"dataset", "split", "raw_root" (relative to out_root), "samples": [...]};
                                        one sample per entry of the single-frame JSON, with its image_id, video
                                        file, 1-based frame, instance id, query, mask PNG, the mask's (H, W) and
                                        the video's frame_height/frame_width: loaders never list folders
    masks/<video>/<frame:05d>_<instance>.png   the instance's binary mask ("L", 0/255) at the annotation size
    a2d_sentences_test_annotations_in_coco_format.json   COCO GT (segm RLE, bbox from reBBox), rebuilt from .h5
    skipped_samples.json                [{"file", "id", "reason"}], empty unless skip_bad_samples
    summary.json                        the returned summary

The single-frame JSONs released by MTTR are used when present (preferred: they define the benchmark); otherwise
they are regenerated with MTTR's procedure from videoset.csv, a2d_annotation.txt,
a2d_missed_videos.txt and the .h5 files, and written to ``out_root``. When the released COCO GT is present it
is compared with the rebuilt one (same image ids, same RLE masks) and a difference is an error.

A mask whose size differs from the video's frames is kept (the loader resizes it to the frames, as the reference's
transforms do), warned about and counted in the summary (``<split>_size_mismatches``).

A missing/corrupt ``.h5`` file, a missing dataset in it, an entry whose instance is not in the frame's
``instance`` list, or a missing video raises :class:`~bifit.data.ytvos.SampleError` naming the file and the
image id; with ``skip_bad_samples`` the sample is left out of the index (and of the COCO GT) and recorded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from bifit.data.ytvos import SampleError
from bifit.fsutil import component_problem, staged_folder

log = logging.getLogger(__name__)

TRAIN_JSON = "a2d_sentences_single_frame_train_annotations.json"
TEST_JSON = "a2d_sentences_single_frame_test_annotations.json"
COCO_GT_JSON = "a2d_sentences_test_annotations_in_coco_format.json"
VIDEO_DIR = Path("Release") / "clips320H"
VIDEOSET_CSV = Path("Release") / "videoset.csv"
H5_DIR = Path("text_annotations") / "a2d_annotation_with_instances"
ANNOTATION_TXT = Path("text_annotations") / "a2d_annotation.txt"
MISSED_TXT = Path("text_annotations") / "a2d_missed_videos.txt"
SPLITS = {"train": (0, TRAIN_JSON), "test": (1, TEST_JSON)}  # videoset.csv subset code, single-frame JSON
SKIPPED_NAME = "skipped_samples.json"
H5_DATASETS = ("instance", "reMask", "reBBox")


def image_id(video: str, frame: int, instance: int) -> str:
    """``v_<video_id>_f_<frame_idx>_i_<instance_id>`` (frame 1-based, not padded)."""
    return f"v_{video}_f_{frame}_i_{instance}"


# ----------------------------------------------------------------------------------------------------------------
# masks and COCO records (shared with the JHMDB preparation and the synthetic writers)


def coco_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) binary mask with ASCII counts (the released GT JSON format)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def box_xyxy(mask: np.ndarray) -> list[float]:
    """Tight box of a mask with x2/y2 inclusive pixel indices; zeros for an empty mask."""
    if not mask.any():
        return [0.0, 0.0, 0.0, 0.0]
    ys, xs = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    return [float(xs[0]), float(ys[0]), float(xs[-1]), float(ys[-1])]


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L").save(path)


def read_mask_png(path: Path, sample_id: str) -> np.ndarray:
    """A mask PNG written by :func:`write_mask_png` as (H, W) bool."""
    try:
        with Image.open(path) as png:
            return np.array(png.convert("L")) > 0
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing mask PNG (run the preprocess stage again)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable mask PNG ({err})") from err


def coco_gt_dataset(records: list[dict]) -> dict:
    """COCO GT from [{"image_id", "mask" (H, W), "bbox" [x, y, w, h] or None}] (one annotation per image)."""
    images, annotations = [], []
    for k, r in enumerate(records):
        rle = coco_rle(r["mask"])
        images.append({"id": r["image_id"], "height": int(r["mask"].shape[0]), "width": int(r["mask"].shape[1])})
        ann = {"id": k + 1, "image_id": r["image_id"], "category_id": 1, "segmentation": rle,
               "area": float(mask_utils.area(rle))}
        if r.get("bbox") is not None:
            ann["bbox"] = [float(v) for v in r["bbox"]]
        ann["iscrowd"] = 0
        annotations.append(ann)
    return {"categories": [{"id": 1, "name": "dummy_class"}], "images": images, "annotations": annotations}


def compare_coco_gt(released_path: Path, ours: dict, skipped_ids: set[str]) -> int:
    """Check the rebuilt GT against the released file: every image of ours is there with the same size and RLE,
    and every released image is ours or a recorded skip. Returns the number of images compared."""
    try:
        released = json.loads(Path(released_path).read_text())
        rel_images = {str(i["id"]): i for i in released["images"]}
        rel_anns = {str(a["image_id"]): a for a in released["annotations"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{released_path}: unreadable COCO GT ({err!r})") from err
    problems = []
    for img, ann in zip(ours["images"], ours["annotations"]):
        iid = img["id"]
        if iid not in rel_images or iid not in rel_anns:
            problems.append(f"{iid}: not in the released file")
            continue
        if (rel_images[iid]["height"], rel_images[iid]["width"]) != (img["height"], img["width"]):
            problems.append(f"{iid}: size {rel_images[iid]['height']}x{rel_images[iid]['width']} released, "
                            f"{img['height']}x{img['width']} rebuilt")
        elif rel_anns[iid]["segmentation"]["counts"] != ann["segmentation"]["counts"]:
            problems.append(f"{iid}: the released mask differs from the .h5/.mat mask")
    extra = sorted(set(rel_images) - {i["id"] for i in ours["images"]} - skipped_ids)
    problems += [f"{iid}: in the released file but not rebuilt" for iid in extra]
    if problems:
        raise ValueError(f"{released_path}: the released COCO GT does not match the one rebuilt from the "
                         f"annotations ({len(problems)} problems): " + "; ".join(problems[:5]))
    return len(ours["images"])


# ----------------------------------------------------------------------------------------------------------------
# raw files


def read_h5(path: Path, sample_id: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """One A2D annotation file -> (instance ids, masks [N, H, W] bool, boxes [N, 4] x1, y1, x2, y2).

    reMask is stored transposed, (N, W, H), and as a single (W, H) array when N = 1.
    """
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_DATASETS if k not in f]
            if missing:
                raise SampleError(path, sample_id, f"missing dataset(s) {missing} (the file has {sorted(f.keys())})")
            instances = np.asarray(f["instance"], dtype=np.float64).reshape(-1)
            masks = np.asarray(f["reMask"])
            boxes = np.asarray(f["reBBox"], dtype=np.float64)
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing .h5 annotation file") from err
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable .h5 file ({err})") from err
    n = instances.shape[0]
    if n == 0 or not np.all(instances == np.round(instances)):
        raise SampleError(path, sample_id, f"dataset 'instance' must hold >= 1 integer ids, got {instances.tolist()}")
    if masks.ndim == 2 and n == 1:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] != n:
        raise SampleError(path, sample_id, f"dataset 'reMask' has shape {masks.shape}, expected (N, W, H) "
                                           f"(or (W, H) for one instance) with N = len(instance) = {n}")
    if boxes.size != 4 * n:
        raise SampleError(path, sample_id, f"dataset 'reBBox' has shape {boxes.shape}, expected (4, {n})")
    return [int(i) for i in instances], masks.transpose(0, 2, 1) > 0, boxes.reshape(4, n).T


def video_frame_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of a video's frames from its header; None when unreadable (the loader reports that video)."""
    import av

    try:
        with av.open(str(path)) as container:
            codec = container.streams.video[0].codec_context
            return int(codec.height), int(codec.width)
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None


def warn_size_mismatch(mask_source: Path, sample_id: str, mask_hw: tuple[int, int], frame_hw) -> bool:
    """Warn when a mask and its frames differ in size (both known); True when they do."""
    if frame_hw is None or tuple(mask_hw) == tuple(frame_hw):
        return False
    log.warning("%s: mask is %dx%d (WxH) but the frames are %dx%d; the loader resizes it to the frames [%s]",
                mask_source, mask_hw[1], mask_hw[0], frame_hw[1], frame_hw[0], sample_id)
    return True


def size_mismatches(samples: list[dict]) -> list[str]:
    """Image ids of index ``samples`` whose mask size differs from the frame size read by the preprocess stage."""
    return [s["image_id"] for s in samples if s.get("frame_height") is not None
            and (s["height"], s["width"]) != (s["frame_height"], s["frame_width"])]


def h5_path(raw_root: Path, video: str, frame: int) -> Path:
    return Path(raw_root) / H5_DIR / video / f"{frame:05d}.h5"


def read_videoset(path: Path) -> dict[str, int]:
    """videoset.csv (no header, 9 columns) -> video id -> subset (0 train, 1 test)."""
    out = {}
    try:
        with Path(path).open(newline="") as fh:
            for line, row in enumerate(csv.reader(fh), 1):
                if not row:
                    continue
                if len(row) != 9 or row[8].strip() not in ("0", "1"):
                    raise ValueError(f"{path}:{line}: expected 9 columns ending with subset 0/1, got {row}")
                if why := component_problem(row[0]):
                    raise ValueError(f"{path}:{line}: video id {row[0]!r} cannot be a folder name ({why})")
                out[row[0]] = int(row[8])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing (needed to regenerate the single-frame JSONs)") from err
    return out


def read_annotation_rows(path: Path) -> tuple[list[tuple[str, int, str]], list[dict]]:
    """a2d_annotation.txt -> ([(video, instance, query)], dropped rows). Rows whose instance_id is not an integer
    (the real file's ``1 (copy)``) are dropped, as every consumer of the file does."""
    rows, dropped = [], []
    try:
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"video_id", "instance_id", "query"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected the header video_id,instance_id,query, got {reader.fieldnames}")
            for line, row in enumerate(reader, 2):
                try:
                    rows.append((row["video_id"], int(row["instance_id"]), row["query"]))
                except (TypeError, ValueError):
                    dropped.append({"file": str(path), "line": line, "row": row})
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing (needed to regenerate the single-frame JSONs)") from err
    return rows, dropped


def regenerate_single_frame(raw_root: Path, split: str) -> tuple[list[list], list[dict]]:
    """MTTR's procedure: for each kept annotation row (videos of the split, not missed), for each .h5 of the
    video in sorted order, one entry ``[query, video, frame, instance]`` where the instance is present."""
    raw_root = Path(raw_root)
    subsets = read_videoset(raw_root / VIDEOSET_CSV)
    missed_path = raw_root / MISSED_TXT
    missed = set(missed_path.read_text().split()) if missed_path.is_file() else set()
    rows, dropped = read_annotation_rows(raw_root / ANNOTATION_TXT)
    keep = {v for v, s in subsets.items() if s == SPLITS[split][0] and v not in missed}
    present: dict[Path, list[int]] = {}
    entries = []
    for video, instance, query in rows:
        if video not in keep:
            continue
        folder = raw_root / H5_DIR / video
        for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
            if path not in present:
                present[path] = read_h5(path, f"video {video} frame {path.stem}")[0]
            if instance in present[path]:
                entries.append([query.lower(), video, int(path.stem), instance])
    return entries, dropped


def read_single_frame_json(path: Path) -> list[tuple[str, str, int, int]]:
    try:
        entries = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of [query, video_id, frame_idx, instance_id] entries")
    out = []
    for k, e in enumerate(entries):
        ok = isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], str)
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in e[2:]):
            raise ValueError(f"{path}: entry {k} is {e!r}, expected [query, video_id, frame_idx (int, 1-based), "
                             "instance_id (int)]")
        if why := component_problem(e[1]):
            raise ValueError(f"{path}: entry {k}: video_id {e[1]!r} cannot be a folder name ({why})")
        out.append((e[0], e[1], e[2], e[3]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# preprocess


class SkipRecorder:
    """Collects SampleErrors: raises the first one, or with ``enabled`` records it and logs a warning."""

    def __init__(self, enabled: bool, what: str):
        self.enabled, self.what, self.records = enabled, what, []

    def add(self, err: SampleError) -> None:
        if not self.enabled:
            raise err
        self.records.append(err.record())
        log.warning("skipping bad %s sample: %s", self.what, err)


def _split_samples(raw_root: Path, out_root: Path, split: str, skips: SkipRecorder, progress: bool):
    """(index samples, COCO records (test), provenance of the single-frame JSON, dropped annotation rows)."""
    released = raw_root / SPLITS[split][1]
    dropped = []
    if released.is_file():
        entries, source = read_single_frame_json(released), "released"
    else:
        regenerated, dropped = regenerate_single_frame(raw_root, split)
        (out_root / SPLITS[split][1]).write_text(json.dumps(regenerated) + "\n")
        entries, source = [tuple(e) for e in regenerated], "regenerated"
    by_file = defaultdict(list)  # one read per .h5 file
    for k, (query, video, frame, instance) in enumerate(entries):
        by_file[(video, frame)].append((k, query, instance))
    samples, coco_records, seen_ids = [None] * len(entries), [None] * len(entries), set()
    frame_sizes: dict[str, tuple[int, int] | None] = {}
    for (video, frame), group in tqdm(sorted(by_file.items()), desc=f"A2D {split} annotations", unit="file",
                                      disable=not progress):
        path = h5_path(raw_root, video, frame)
        video_file = VIDEO_DIR / f"{video}.mp4"
        try:
            if not (raw_root / video_file).is_file():
                raise SampleError(raw_root / video_file, f"video {video}", "missing video file")
            instances, masks, boxes = read_h5(path, f"video {video} frame {frame}")
            if video not in frame_sizes:
                frame_sizes[video] = video_frame_size(raw_root / video_file)
        except SampleError as err:
            for _, _, instance in group:
                skips.add(SampleError(err.file, image_id(video, frame, instance), err.reason))
            continue
        for k, query, instance in group:
            iid = image_id(video, frame, instance)
            if instance not in instances:
                skips.add(SampleError(path, iid, f"the entry refers to instance {instance}, which is not in the "
                                                 f"frame's 'instance' dataset {instances}"))
                continue
            j = instances.index(instance)
            mask_rel = Path("masks") / video / f"{frame:05d}_{instance}.png"
            if not (out_root / mask_rel).is_file():
                write_mask_png(out_root / mask_rel, masks[j])
            frame_hw = frame_sizes[video] or (None, None)
            samples[k] = {"image_id": iid, "video": video, "frame_idx": frame, "instance_id": instance,
                          "query": query, "video_file": str(video_file), "mask": str(mask_rel),
                          "height": int(masks[j].shape[0]), "width": int(masks[j].shape[1]),
                          "frame_height": frame_hw[0], "frame_width": frame_hw[1],
                          "empty": not bool(masks[j].any())}
            warn_size_mismatch(path, iid, masks[j].shape, frame_sizes[video])
            if split == "test":
                if iid in seen_ids:
                    raise ValueError(f"{released if source == 'released' else raw_root / ANNOTATION_TXT}: image id "
                                     f"{iid} appears twice in the test split; the COCO GT needs one sentence per "
                                     "(video, instance)")
                seen_ids.add(iid)
                x1, y1, x2, y2 = boxes[j]
                coco_records[k] = {"image_id": iid, "mask": masks[j], "bbox": [x1, y1, x2 - x1, y2 - y1]}
    keep = [k for k in range(len(entries)) if samples[k] is not None]
    return [samples[k] for k in keep], [coco_records[k] for k in keep if coco_records[k] is not None], source, dropped


def preprocess(raw_root, out_root, *, skip_bad_samples: bool = False, progress: bool = True) -> dict:
    """Prepare A2D-Sentences from ``raw_root`` into ``out_root`` (replaced atomically). Returns the summary."""
    raw_root, out_root = Path(raw_root).resolve(), Path(out_root)
    if not raw_root.is_dir():
        raise FileNotFoundError(f"{raw_root}: A2D-Sentences root not found (expected Release/clips320H/*.mp4, "
                                "Release/videoset.csv, text_annotations/ and the MTTR JSON files there; "
                                "the download stage prints where each comes from)")
    start = time.perf_counter()
    with staged_folder(out_root) as tmp:
        skips = SkipRecorder(skip_bad_samples, "A2D-Sentences")
        summary = {"dataset": "a2d_sentences", "raw_root": str(raw_root)}
        for split in SPLITS:
            samples, coco_records, source, dropped = _split_samples(raw_root, tmp, split, skips, progress)
            index = {"dataset": "a2d_sentences", "split": split, "raw_root": os.path.relpath(raw_root, out_root.resolve()),
                     "samples": samples}
            (tmp / f"index_{split}.json").write_text(json.dumps(index) + "\n")
            summary[f"{split}_samples"] = len(samples)
            summary[f"{split}_single_frame_json"] = source
            summary[f"{split}_empty_masks"] = sum(s["empty"] for s in samples)
            summary[f"{split}_size_mismatches"] = len(size_mismatches(samples))
            if dropped:
                summary["dropped_annotation_rows"] = dropped
        coco = coco_gt_dataset(coco_records)
        (tmp / COCO_GT_JSON).write_text(json.dumps(coco) + "\n")
        released_gt = raw_root / COCO_GT_JSON
        skipped_ids = {r["id"] for r in skips.records}
        summary["released_coco_gt_checked"] = (compare_coco_gt(released_gt, coco, skipped_ids)
                                               if released_gt.is_file() else 0)
        summary["skipped"] = len(skips.records)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / SKIPPED_NAME).write_text(json.dumps(skips.records, indent=1) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


