"""JHMDB-Sentences preparation: GT masks from the puppet ``.mat`` files, the COCO ground truth for mAP and the
sample index.

    preprocess(raw_root, out_root) -> summary dict

The evaluation set is fixed by the released ``jhmdb_sentences_samples_metadata.json`` (3 frames per video that MTTR
drew at random; regenerating it changes the benchmark, so it is required, never rebuilt). Its paths start with
``./jhmdb_sentences/``; they are resolved against ``raw_root`` (the reference joins them onto a fixed ``data``
folder, whatever root is configured). Writes ``out_root``::

    index.json              {"dataset", "split": "test", "raw_root" (relative to out_root), "samples": [...]}
    masks/<video>/<frame:05d>.png   part_mask[..., frame - 1] ("L", 0/255)
    jhmdb_sentences_gt_annotations_in_coco_format.json   COCO GT rebuilt from the .mat files (no bbox)
    skipped_samples.json, summary.json

A mask whose size differs from the chosen frame's is kept (the loader resizes it to the frames, as the reference's
transforms do), warned about and counted in the summary (``test_size_mismatches``); the index records both sizes.

A missing or unreadable ``.mat``, a missing ``part_mask`` key, a chosen frame without a mask (beyond T_mask) or
beyond the frames on disk raises :class:`~bifit.data.ytvos.SampleError` naming the file and the image id; with
``skip_bad_samples`` the sample is left out and recorded. The released COCO GT, when present, must match.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from bifit.data.ytvos import SampleError
from bifit.fsutil import component_problem, relative_path_problem, staged_folder
from bifit.prepare.a2d import (
    SKIPPED_NAME,
    SkipRecorder,
    coco_gt_dataset,
    compare_coco_gt,
    size_mismatches,
    warn_size_mismatch,
    write_mask_png,
)
from bifit.prepare.sources import JHMDB_JSON_PAGE

METADATA_JSON = "jhmdb_sentences_samples_metadata.json"
COCO_GT_JSON = "jhmdb_sentences_gt_annotations_in_coco_format.json"
ANNOTATION_TXT = "jhmdb_annotation.txt"
FRAME_DIR = "Rename_Images"
MASK_DIR = "puppet_mask"
MASK_KEY = "part_mask"
PATH_PREFIX = "./jhmdb_sentences/"


def image_id(video: str, frame: int) -> str:
    """``v_<video_id>_f_<frame_idx>`` (frame 1-based, not padded)."""
    return f"v_{video}_f_{frame}"


def resolve(raw_root: Path, released_path: str) -> Path:
    """A metadata path (``./jhmdb_sentences/...``) inside ``raw_root``."""
    rel = released_path
    for prefix in (PATH_PREFIX, PATH_PREFIX[2:]):
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
            break
    return Path(raw_root) / rel


def read_metadata(path: Path) -> list[tuple[str, str, str, int, str]]:
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing. The JHMDB-Sentences evaluation set is defined by MTTR's released "
                                f"metadata file (3 fixed frames per video): download it from {JHMDB_JSON_PAGE} and "
                                "place it there; do not regenerate it") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of [video_id, chosen_frame_path, masks_path, "
                         "video_total_frames, query] entries")
    out = []
    for k, e in enumerate(entries):
        ok = isinstance(e, list) and len(e) == 5 and all(isinstance(v, str) for v in (e[0], e[1], e[2], e[4]))
        if not ok or not isinstance(e[3], int) or isinstance(e[3], bool):
            raise ValueError(f"{path}: entry {k} is {e!r}, expected [video_id, chosen_frame_path, masks_path, "
                             "video_total_frames (int), query]")
        if why := component_problem(e[0]):
            raise ValueError(f"{path}: entry {k}: video_id {e[0]!r} cannot be a folder name ({why})")
        for field, value in (("chosen_frame_path", e[1]), ("masks_path", e[2])):
            if why := relative_path_problem(value):
                raise ValueError(f"{path}: entry {k}: {field} {value!r} must stay inside the dataset root ({why})")
        out.append(tuple(e))
    return out


def read_puppet_mask(path: Path, sample_id: str) -> np.ndarray:
    """``part_mask`` of a puppet_mask.mat as [T_mask, H, W] bool (stored (H, W, T_mask))."""
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError as err:
        raise SampleError(path, sample_id, "missing puppet_mask.mat") from err
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        raise SampleError(path, sample_id, f"corrupt or unreadable .mat file ({err})") from err
    if MASK_KEY not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise SampleError(path, sample_id, f"missing key {MASK_KEY!r} (the file has {keys})")
    masks = np.asarray(mat[MASK_KEY])
    if masks.ndim != 3:
        raise SampleError(path, sample_id, f"{MASK_KEY!r} has shape {masks.shape}, expected (H, W, T_mask)")
    return np.moveaxis(masks, -1, 0) > 0


def frame_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of a frame PNG from its header; None when unreadable (the loader reports that frame)."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError):
        return None


def preprocess(raw_root, out_root, *, skip_bad_samples: bool = False, progress: bool = True) -> dict:
    """Prepare JHMDB-Sentences from ``raw_root`` into ``out_root`` (replaced atomically). Returns the summary."""
    raw_root, out_root = Path(raw_root).resolve(), Path(out_root)
    entries = read_metadata(raw_root / METADATA_JSON)
    start = time.perf_counter()
    with staged_folder(out_root) as tmp:
        skips = SkipRecorder(skip_bad_samples, "JHMDB-Sentences")
        by_mat = defaultdict(list)
        for k, entry in enumerate(entries):
            by_mat[entry[2]].append(k)
        samples, records, seen = [None] * len(entries), [None] * len(entries), set()
        for mat_rel, ks in tqdm(by_mat.items(), desc="JHMDB puppet masks", unit="video", disable=not progress):
            mat_path = resolve(raw_root, mat_rel)
            try:
                masks = read_puppet_mask(mat_path, f"video {entries[ks[0]][0]}")
            except SampleError as err:
                for k in ks:
                    skips.add(SampleError(err.file, image_id(entries[k][0], int(Path(entries[k][1]).stem)),
                                          err.reason))
                continue
            for k in ks:
                video, chosen, _, total, query = entries[k]
                frame_path = resolve(raw_root, chosen)
                frame = int(frame_path.stem)
                iid = image_id(video, frame)
                if iid in seen:
                    raise ValueError(f"{raw_root / METADATA_JSON}: image id {iid} appears twice")
                seen.add(iid)
                try:
                    frames_on_disk = len(list(frame_path.parent.glob("*.png")))
                    if frames_on_disk < total:
                        raise SampleError(frame_path.parent, iid, f"{frames_on_disk} PNG frames on disk but "
                                                                  f"video_total_frames is {total}")
                    if not 1 <= frame <= total:
                        raise SampleError(frame_path, iid, f"chosen frame {frame} outside 1..video_total_frames "
                                                           f"({total})")
                    if frame > masks.shape[0]:
                        raise SampleError(mat_path, iid, f"no mask for frame {frame}: {MASK_KEY!r} has "
                                                         f"{masks.shape[0]} frames")
                except SampleError as err:
                    skips.add(err)
                    continue
                mask = masks[frame - 1]
                mask_rel = Path("masks") / video / f"{frame:05d}.png"
                write_mask_png(tmp / mask_rel, mask)
                frame_hw = frame_size(frame_path)
                samples[k] = {"image_id": iid, "video": video, "frame_idx": frame,
                              "frame_dir": str(frame_path.parent.relative_to(raw_root)), "total_frames": total,
                              "query": query, "mask": str(mask_rel), "height": int(mask.shape[0]),
                              "width": int(mask.shape[1]), "frame_height": frame_hw and frame_hw[0],
                              "frame_width": frame_hw and frame_hw[1], "empty": not bool(mask.any())}
                warn_size_mismatch(mat_path, iid, mask.shape, frame_hw)
                records[k] = {"image_id": iid, "mask": mask, "bbox": None}
        keep = [k for k in range(len(entries)) if samples[k] is not None]
        index = {"dataset": "jhmdb_sentences", "split": "test",
                 "raw_root": os.path.relpath(raw_root, out_root.resolve()), "samples": [samples[k] for k in keep]}
        (tmp / "index.json").write_text(json.dumps(index) + "\n")
        coco = coco_gt_dataset([records[k] for k in keep])
        (tmp / COCO_GT_JSON).write_text(json.dumps(coco) + "\n")
        released_gt = raw_root / COCO_GT_JSON
        summary = {"dataset": "jhmdb_sentences", "raw_root": str(raw_root), "test_samples": len(keep),
                   "videos": len({samples[k]["video"] for k in keep}),
                   "test_empty_masks": sum(samples[k]["empty"] for k in keep),
                   "test_size_mismatches": len(size_mismatches([samples[k] for k in keep])),
                   "released_coco_gt_checked": (compare_coco_gt(released_gt, coco, {r["id"] for r in skips.records})
                                                if released_gt.is_file() else 0),
                   "skipped": len(skips.records), "seconds": round(time.perf_counter() - start, 3)}
        (tmp / SKIPPED_NAME).write_text(json.dumps(skips.records, indent=1) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
