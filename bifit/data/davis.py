"""Ref-DAVIS17 loader over the converted layout of :mod:`bifit.prepare.davis`.

Evaluation (what BIFIT does with Ref-DAVIS17: the Ref-YouTube-VOS model, zero-shot, on the 30 val sequences):
:func:`ref_davis_videos` lists the val sequences in ``ImageSets/2017/val.txt`` order from ``index.json`` (no folder
is listed), each with its frames and, per object k, the four expressions 4k + a (a = annotator column 0..3, which
becomes the ``anno_<a>`` run of the evaluation), kept as written in the meta (capitals and spacing): the
official inference feeds them to the tokenizer unchanged. :func:`load_frames` gives the whole sequence resized
with torchvision ``Resize(short_side)`` semantics, :func:`load_gt_labels` the unsupervised GT label maps
(0 background, k object k, 255 void).

Training (not used by the paper, provided because the reference has it): :class:`RefDavisDataset` is the
Ref-YouTube-VOS training dataset over ``train/`` with the DAVIS clip sampling: the neighbour step (a frame 1-3
before and one 1-3 after the anchor) is always drawn, also for T = 1, where the sorted first entry (not
necessarily the anchor) is used, as in the reference. Category ids index the sorted category names found in the
converted ``meta.json`` files (the reference's 78-class list is not distributed with the data; ids only matter
for non-binary runs).

A missing or corrupt frame or annotation raises :class:`~bifit.data.ytvos.SampleError` naming the file and the
sequence/frame; an expression whose object is missing from ``meta.json`` is reported by the training listing
(skipped and recorded with ``skip_bad_samples``).
"""

from __future__ import annotations

import dataclasses
import json
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bifit.data.ytvos import YTVOSDataset, load_id_map, load_video, read_videos
from bifit.prepare.davis import INDEX_NAME, NUM_ANNOTATORS


@dataclass(frozen=True)
class RefDavisVideo:
    name: str
    frames: tuple[str, ...]
    size: tuple[int, int]  # (H, W) of the frames
    captions: tuple[tuple[str, ...], ...]  # [object k][annotator a], as written (the official inference keeps it)
    obj_ids: tuple[tuple[str, ...], ...]  # [object k][annotator a]
    exp_ids: tuple[tuple[str, ...], ...]  # [object k][annotator a] = str(4k + a)

    @property
    def num_objects(self) -> int:
        return len(self.captions)


def read_index(prepared_root) -> dict:
    path = Path(prepared_root) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing; run the preprocess stage (Ref-DAVIS17 conversion) first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if index.get("dataset") != "ref_davis17" or "sequences" not in index:
        raise ValueError(f"{path}: not a Ref-DAVIS17 index (expected 'dataset': 'ref_davis17' and 'sequences')")
    return index


def expression_text(meta_path: Path, seq: str, exp_id: str, entry) -> str:
    """The 'exp' of one meta entry as written; an entry without words is refused (it would be an empty query)."""
    text = entry.get("exp") if isinstance(entry, dict) else None
    if not isinstance(text, str) or not text.split():
        raise ValueError(f"{meta_path}: sequence {seq!r} exp_id {exp_id}: expected a non-empty 'exp' string, "
                         f"got {text!r}")
    return text


def ref_davis_videos(prepared_root, split: str = "valid") -> list[RefDavisVideo]:
    """The sequences of ``split`` ("valid" = DAVIS val, "train") in ImageSets order, with their expressions."""
    root = Path(prepared_root)
    index = read_index(root)
    order = index["val"] if split == "valid" else index["train"]
    meta_path = root / "meta_expressions" / split / "meta_expressions.json"
    meta = read_videos(meta_path)
    videos = []
    for seq in order:
        if seq not in meta:
            raise KeyError(f"{meta_path}: no sequence {seq!r} (listed in {root / INDEX_NAME})")
        exps = meta[seq]["expressions"]
        n_obj = len(exps) // NUM_ANNOTATORS
        captions, obj_ids, exp_ids = [], [], []
        for k in range(n_obj):
            ids = tuple(str(NUM_ANNOTATORS * k + a) for a in range(NUM_ANNOTATORS))
            missing = [i for i in ids if i not in exps]
            if missing:
                raise KeyError(f"{meta_path}: sequence {seq!r} lacks exp_id(s) {missing} of object {k}")
            captions.append(tuple(expression_text(meta_path, seq, i, exps[i]) for i in ids))
            obj_ids.append(tuple(str(exps[i]["obj_id"]) for i in ids))
            exp_ids.append(ids)
        entry = index["sequences"][seq]
        videos.append(RefDavisVideo(seq, tuple(entry["frames"]), tuple(entry["size"]), tuple(captions),
                                    tuple(obj_ids), tuple(exp_ids)))
    return videos


def load_frames(prepared_root, video: RefDavisVideo, short_side: int = 360, split: str = "valid"):
    """``(imgs [T, 3, h, w] normalised, (H, W))``: the whole sequence, shorter side ``short_side`` (no cap)."""
    return load_video(prepared_root, video.name, video.frames, split, short_side=short_side)


def load_gt_labels(prepared_root, video: RefDavisVideo, split: str = "valid") -> np.ndarray:
    """GT label maps [T, H, W] uint8 from the unsupervised annotations (0 background, k object k, 255 void)."""
    folder = Path(prepared_root) / split / "Annotations" / video.name
    h, w = video.size
    maps = [load_id_map(folder / f"{f}.png", f"sequence {video.name} frame {f}", (w, h)) for f in video.frames]
    return np.stack(maps).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# training


def davis_categories(prepared_root) -> tuple[str, ...]:
    """Sorted category names of the converted train and valid ``meta.json``."""
    names = set()
    for split in ("train", "valid"):
        for entry in read_videos(Path(prepared_root) / split / "meta.json").values():
            names.update(o["category"] for o in entry.get("objects", {}).values())
    return tuple(sorted(names))


def davis_anchor(anchor: int, length: int, num_frames: int, rng=_random) -> int:
    """T = 1 in the DAVIS loader: the neighbours are drawn anyway and the sorted first of the three is kept."""
    before, after = rng.randint(1, 3), rng.randint(1, 3)
    return sorted([anchor, max(0, anchor - before), min(length - 1, anchor + after)])[0]


class RefDavisDataset(YTVOSDataset):
    """Ref-DAVIS17 training clips over ``<prepared_root>/train`` (see the module docstring)."""

    def __init__(self, prepared_root, split: str = "train", num_frames: int = 6, transforms=None,
                 categories: Sequence[str] | None = None, skip_bad_samples: bool = False, rng=None,
                 max_retries: int = 100):
        categories = categories if categories is not None else davis_categories(prepared_root)
        super().__init__(prepared_root, split, num_frames, transforms, categories, skip_bad_samples, rng, max_retries)

    def load(self, sample):
        if self.num_frames == 1:
            sample = dataclasses.replace(sample, anchor=davis_anchor(sample.anchor, len(sample.frames), 1, self.rng))
        return super().load(sample)
