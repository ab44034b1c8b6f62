"""RefCOCO / RefCOCO+ / RefCOCOg as referring-video samples: pseudo-videos made from single images, and the joint
dataset that mixes them with Ref-YouTube-VOS clips (ReferFormer's pretraining and joint-training data).

Input: the converter's output (:mod:`bifit.prepare.refcoco`), ``<ann_root>/<dataset>/instances_<dataset>_<split>.json``
(one image entry per sentence, exactly one annotation each), and the COCO images ``<image_root>/<file_name>``
(``data/coco/train2014/``, where ReferFormer's layout puts the COCO 2014 train images). Segmentations decode with pycocotools: polygons (the real data),
uncompressed or compressed RLE (the synthetic copy).

**Training** (:class:`RefCOCODataset` with ``train=True``, the default for the train split): one sample per
sentence. The image becomes a ``num_frames``-frame pseudo-video by a sequence augmentation: the original image
plus ``num_frames - 1`` copies, each under its own random affine transform (:class:`SequenceAugmentConfig`),
the image warped bilinearly and the mask with nearest neighbour under the same matrix (torchvision ``affine``,
zero fill), then the frames put in random order; ``frames_idx`` says which copy each frame is (0 = the original).
Every frame shows the same object, so the referred object is the same in every frame. Each frame's box is the
tight box of its transformed mask (inclusive x2/y2, as the video loaders compute boxes), ``valid`` is 1 where the
mask is non-empty after the warp. Then the video training transforms run on the clip, as for the videos
(the reference's joint training applies the same transforms to images as to clips). A pseudo-video without a valid frame after the
transforms is replaced by a random other sample, counted like the video loaders' redraws.

The sequence augmentation's ranges are not documented by the reference. The defaults here are our choice, close to the
image-to-sequence augmentation of the ReferFormer lineage as we understand it (no reference code was available
to check): rotation uniform in [-20, 20] degrees, translation uniform in [-10 %, 10 %] of the width and height,
no scaling or shear, frame order shuffled. All of them are configurable. Photometric jitter is left to the
training transforms' PhotometricDistort, which already draws it per frame.

**Evaluation** (``train=False``): each sentence is one 1-frame clip, the image through the given eval transforms,
with ``image_id`` (``<dataset>/<split>/<id>``) and ``orig_size``; :meth:`RefCOCODataset.gt_mask` gives the
ground truth at the original size.

Sample structure: ``(imgs [T, 3, H, W], target)`` exactly like :class:`bifit.data.ytvos.YTVOSDataset`
(``frames_idx``, ``labels``, ``boxes``, ``masks``, ``valid``, ``caption``, ``orig_size``, ``size``), plus
``image_id``, ``dataset_name`` and ``category_id`` (the COCO category, informational). ``labels`` are zeros: the
referring model is trained binary (the criterion's class target is class 0 on valid frames), and COCO category
ids are no YTVOS class indices. Captions are lower-cased and whitespace-collapsed, as for video training.

**Joint training** (:class:`JointDataset`): the image datasets and the YTVOS clips concatenated into one index
space and drawn uniformly by the ordinary (distributed) random sampler, as the reference builds its joint
dataset (a plain concatenation; no re-weighting, so each part contributes in proportion to its sample count).
"""

from __future__ import annotations

import bisect
import json
import logging
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import ConcatDataset, Dataset
from torchvision.transforms import InterpolationMode

from bifit.config import check
from bifit.data.a2d import SkippedSample
from bifit.data.collate import normalize_text
from bifit.data.transforms import Compose, Normalize
from bifit.data.ytvos import REDRAWN_KEY, RedrawCounter, SampleError, bounding_box, load_image
from bifit.fsutil import component_problem
from bifit.prepare.refcoco import SPLIT_BY, SPLITS, split_file

log = logging.getLogger(__name__)

IMAGE_DIR = "train2014"


@dataclass(frozen=True)
class SequenceAugmentConfig:
    """Random affine transform of each added frame of a pseudo-video (the original image is frame 0).

    rotation: degrees, uniform in [-rotation, rotation]; translate: fraction of the image width/height, uniform
    in [-translate, translate]; scale: (min, max), uniform; shear: degrees, uniform in [-shear, shear] along x;
    shuffle: put the frames (the original among them) in random order.
    """

    rotation: float = 20.0
    translate: float = 0.1
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    shuffle: bool = True

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(self.scale))
        self.validate()

    def validate(self, where: str = "SequenceAugmentConfig"):
        check(isinstance(self.rotation, (int, float)) and 0 <= self.rotation <= 180, f"{where}.rotation",
              "degrees in [0, 180]", self.rotation)
        check(isinstance(self.translate, (int, float)) and 0 <= self.translate < 1, f"{where}.translate",
              "a fraction in [0, 1)", self.translate)
        check(len(self.scale) == 2 and all(isinstance(s, (int, float)) and s > 0 for s in self.scale)
              and self.scale[0] <= self.scale[1], f"{where}.scale", "(min, max) with 0 < min <= max", self.scale)
        check(isinstance(self.shear, (int, float)) and 0 <= self.shear < 90, f"{where}.shear", "degrees in [0, 90)",
              self.shear)
        check(isinstance(self.shuffle, bool), f"{where}.shuffle", "a bool", self.shuffle)


def annotation_path(ann_root, dataset: str, split: str) -> Path:
    return Path(ann_root) / dataset / split_file(dataset, split)


def segmentation_mask(segm, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation: polygons, uncompressed RLE or compressed RLE."""
    if isinstance(segm, list):
        polygons = [p for p in segm if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"not a COCO segmentation (polygons or RLE): {type(segm).__name__}")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation is {mask.shape[1]}x{mask.shape[0]} (WxH), the image entry says "
                         f"{width}x{height}")
    return mask


@dataclass(frozen=True)
class Entry:
    """One sentence of the converted split: its image entry and its annotation."""

    id: int
    file_name: str
    height: int
    width: int
    caption: str
    original_id: int
    segmentation: object
    category_id: int

    def sample_id(self, dataset: str, split: str) -> str:
        return f"{dataset}/{split}/{self.id}"


def read_entries(path: Path) -> list[Entry]:
    """The entries of a converted split file (checked: one annotation per image, a single-component file name)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing converted RefCOCO split; run bifit.prepare.refcoco."
                                "convert_refcoco on the refer release first") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    anns: dict = {}
    for ann in data.get("annotations", []):
        if ann["image_id"] in anns:
            raise ValueError(f"{path}: image {ann['image_id']} has more than one annotation (expected one per "
                             "sentence)")
        anns[ann["image_id"]] = ann
    out = []
    for img in data.get("images", []):
        ann = anns.get(img["id"])
        if ann is None:
            raise ValueError(f"{path}: image entry {img['id']} has no annotation")
        problem = component_problem(img.get("file_name"))
        if problem:
            raise ValueError(f"{path}: image entry {img['id']} has file_name {img.get('file_name')!r}, which cannot "
                             f"be a file name ({problem})")
        caption = img.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}: image entry {img['id']} has no caption")
        out.append(Entry(int(img["id"]), img["file_name"], int(img["height"]), int(img["width"]), caption,
                         int(img.get("original_id", img["id"])), ann["segmentation"], int(ann.get("category_id", 0))))
    return out


def random_affine(img: Image.Image, mask: np.ndarray, cfg: SequenceAugmentConfig, rng) -> tuple[Image.Image,
                                                                                                np.ndarray]:
    """One frame: the image and its mask under the same random affine transform about the image centre."""
    w, h = img.size
    angle = rng.uniform(-cfg.rotation, cfg.rotation)
    shift = [rng.uniform(-cfg.translate, cfg.translate) * w, rng.uniform(-cfg.translate, cfg.translate) * h]
    scale = rng.uniform(*cfg.scale)
    shear = [rng.uniform(-cfg.shear, cfg.shear), 0.0]
    warped = F.affine(img, angle=angle, translate=shift, scale=scale, shear=shear,
                      interpolation=InterpolationMode.BILINEAR, fill=0)
    mask_img = F.affine(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), angle=angle, translate=shift,
                        scale=scale, shear=shear, interpolation=InterpolationMode.NEAREST, fill=0)
    return warped, np.asarray(mask_img) > 127


def pseudo_video(img: Image.Image, mask: np.ndarray, num_frames: int, cfg: SequenceAugmentConfig, rng):
    """(frames, masks, copy index of each frame): the original and ``num_frames - 1`` random affine copies,
    shuffled when ``cfg.shuffle``."""
    frames, masks = [img], [mask]
    for _ in range(num_frames - 1):
        f, m = random_affine(img, mask, cfg, rng)
        frames.append(f)
        masks.append(m)
    order = list(range(num_frames))
    if cfg.shuffle:
        rng.shuffle(order)
    return [frames[k] for k in order], [masks[k] for k in order], order


class RefCOCODataset(Dataset):
    """Sentences of one split of RefCOCO, RefCOCO+ or RefCOCOg (see the module docstring).

    root: the COCO data root (``data/coco``): images in ``<root>/train2014``, converted splits in
    ``<root>/<dataset>/`` unless ``image_root`` / ``ann_root`` say otherwise (the converter writes next to, not
    into, the release folders). ``train`` defaults to ``split == "train"``. ``num_frames`` is the training
    pseudo-video length; evaluation clips are the image alone. ``rng`` (augmentation, shuffling, redraws) defaults
    to the ``random`` module, which the training loader reseeds per item (:class:`bifit.data.samplers.
    PerSampleSeeded`). A missing or unreadable image, or an image whose size differs from its entry, raises
    :class:`~bifit.data.ytvos.SampleError`; with ``skip_bad_samples`` training serves the next sample and
    evaluation returns a :class:`~bifit.data.a2d.SkippedSample` (both recorded in ``skipped``).
    """

    def __init__(self, root, dataset: str = "refcoco", split: str = "train", num_frames: int = 6, transforms=None,
                 *, train: bool | None = None, augment: SequenceAugmentConfig | None = None, image_root=None,
                 ann_root=None, skip_bad_samples: bool = False, rng=None, max_retries: int = 100):
        if dataset not in SPLIT_BY:
            raise ValueError(f"RefCOCODataset.dataset: expected one of {list(SPLIT_BY)}, got {dataset!r}")
        if split not in SPLITS[SPLIT_BY[dataset]]:
            raise ValueError(f"RefCOCODataset.split: {dataset} has splits {list(SPLITS[SPLIT_BY[dataset]])}, got "
                             f"{split!r}")
        if num_frames < 1:
            raise ValueError(f"RefCOCODataset.num_frames: expected >= 1, got {num_frames}")
        self.root, self.dataset_name, self.split = Path(root), dataset, split
        self.train = split == "train" if train is None else train
        self.num_frames = num_frames if self.train else 1
        self.image_root = Path(image_root) if image_root is not None else self.root / IMAGE_DIR
        self.ann_path = annotation_path(ann_root if ann_root is not None else self.root, dataset, split)
        self.entries = read_entries(self.ann_path)
        if not self.entries:
            raise ValueError(f"{self.ann_path}: no sentences")
        self._by_sample_id = {e.sample_id(dataset, split): e for e in self.entries}
        self.transforms = transforms if transforms is not None else Compose([Normalize()])
        self.augment = augment if augment is not None else SequenceAugmentConfig()
        self.skip_bad_samples, self.rng, self.max_retries = skip_bad_samples, rng or _random, max_retries
        self.skipped: list[dict] = []
        self.redraws = RedrawCounter(log, f"{dataset} {split}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def redrawn(self) -> int:
        return self.redraws.count

    def __getitem__(self, idx: int):
        if not self.train:
            try:
                return self.load(self.entries[idx])
            except SampleError as err:
                if not self.skip_bad_samples:
                    raise
                return SkippedSample(self._record_skip(err, idx))
        redraws = 0
        for _ in range(self.max_retries):
            try:
                imgs, target = self.load(self.entries[idx])
            except SampleError as err:
                if not self.skip_bad_samples:
                    raise
                self._record_skip(err, idx)
                idx = (idx + 1) % len(self)
                continue
            if torch.any(target["valid"] == 1):
                target[REDRAWN_KEY] = redraws
                return imgs, target
            self.redraws.add(idx, partial(self._no_valid_reason, self.entries[idx]))
            redraws += 1
            idx = self.rng.randint(0, len(self) - 1)  # no valid frame: redraw, as the video loaders do
        raise RuntimeError(f"{self.ann_path}: no loadable pseudo-video with a valid frame after "
                           f"max_retries={self.max_retries} attempts")

    def _no_valid_reason(self, entry: Entry) -> str:
        return f"no frame of the pseudo-video has the object after the transforms [{self.sample_id(entry)}]"

    def _record_skip(self, err: SampleError, index: int) -> dict:
        record = {**err.record(), "index": index}
        if not any(r["index"] == index for r in self.skipped):
            self.skipped.append(record)
            log.warning("skipping bad %s sample %d: %s", self.dataset_name, index, err)
        return record

    def sample_id(self, entry: Entry) -> str:
        return entry.sample_id(self.dataset_name, self.split)

    def read(self, entry: Entry) -> tuple[Image.Image, np.ndarray]:
        """The image (RGB) and its referred object's mask at the original size (raises SampleError)."""
        path, sid = self.image_root / entry.file_name, self.sample_id(entry)
        img = load_image(path, sid)
        if img.size != (entry.width, entry.height):
            raise SampleError(path, sid, f"image is {img.size[0]}x{img.size[1]} (WxH), its entry in "
                                         f"{self.ann_path.name} says {entry.width}x{entry.height}")
        try:
            mask = segmentation_mask(entry.segmentation, entry.height, entry.width)
        except (ValueError, TypeError, KeyError) as err:
            raise SampleError(self.ann_path, sid, f"unreadable segmentation ({err})") from err
        return img, mask

    def gt_mask(self, image_id: str) -> np.ndarray:
        """Ground truth (H, W) bool at the original size of the evaluation sample ``image_id``."""
        entry = self._by_sample_id.get(image_id)
        if entry is None:
            raise KeyError(f"{self.ann_path}: no sample {image_id!r}")
        return segmentation_mask(entry.segmentation, entry.height, entry.width)

    def load(self, entry: Entry):
        """Load and transform one sample (raises SampleError on bad files)."""
        img, mask = self.read(entry)
        if self.train:
            frames, masks, order = pseudo_video(img, mask, self.num_frames, self.augment, self.rng)
        else:
            frames, masks, order = [img], [mask], [0]
        w, h = img.size
        boxes = torch.tensor([bounding_box(m) if m.any() else (0, 0, 0, 0) for m in masks], dtype=torch.float32)
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        t = len(frames)
        target = {
            "frames_idx": torch.tensor(order, dtype=torch.long),
            "labels": torch.zeros(t, dtype=torch.long),
            "boxes": boxes,  # [T, 4] absolute xyxy, the tight box of each frame's mask
            "masks": torch.from_numpy(np.stack(masks)).float(),  # [T, H, W]
            "valid": torch.tensor([int(m.any()) for m in masks], dtype=torch.int32),
            "caption": normalize_text(entry.caption),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
            "image_id": self.sample_id(entry),
            "dataset_name": self.dataset_name,
            "category_id": entry.category_id,
        }
        imgs, target = self.transforms(frames, target)
        target["masks"] = target["masks"].bool()
        return imgs, target


# ----------------------------------------------------------------------------------------------------------------
# joint training


class JointDataset(ConcatDataset):
    """Ref-YouTube-VOS clips and RefCOCO/+/g pseudo-videos in one index space (a plain concatenation, drawn
    uniformly by the training sampler, as the reference's joint training does).

    Every part must produce clips of the same length (``num_frames``) and one target per item (YTVOS
    ``expressions_per_clip`` 1), so that :func:`bifit.data.collate.collate_fn` batches any mix of them.
    ``part_of(index)`` names the part an index falls in; ``redrawn`` and ``skipped`` gather the parts'.
    """

    def __init__(self, datasets: Sequence[Dataset]):
        datasets = list(datasets)
        if not datasets:
            raise ValueError("JointDataset: no datasets to join")
        lengths = {type(d).__name__ + f"[{i}]": getattr(d, "num_frames", None) for i, d in enumerate(datasets)}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"JointDataset: every part must make clips of one length (num_frames), got {lengths}")
        for d in datasets:
            if getattr(d, "expressions_per_clip", 1) != 1:
                raise ValueError("JointDataset: a YTVOS part with expressions_per_clip > 1 yields lists of targets "
                                 "that cannot be batched with single-target pseudo-videos; use 1")
            if isinstance(d, RefCOCODataset) and not d.train:
                raise ValueError(f"JointDataset: {d.dataset_name} {d.split} is an evaluation dataset (train=False)")
        super().__init__(datasets)
        self.num_frames = next(iter(lengths.values()))

    def part_of(self, index: int) -> Dataset:
        return self.datasets[bisect.bisect_right(self.cumulative_sizes, index % len(self))]

    @property
    def redrawn(self) -> int:
        return sum(getattr(d, "redrawn", 0) for d in self.datasets)

    @property
    def skipped(self) -> list[dict]:
        return [r for d in self.datasets for r in getattr(d, "skipped", [])]

    def composition(self) -> dict[str, int]:
        """Samples per part, e.g. {"refcoco train": 120926, "ref-youtube-vos train": ...} (names made unique)."""
        out: dict[str, int] = {}
        for d in self.datasets:
            name = (f"{d.dataset_name} {d.split}" if isinstance(d, RefCOCODataset)
                    else f"ref-youtube-vos {getattr(d, 'split', '')}".strip())
            key, k = name, 2
            while key in out:
                key, k = f"{name} ({k})", k + 1
            out[key] = len(d)
        return out


def build_joint(ytvos: Dataset, image_datasets: Sequence[RefCOCODataset]) -> JointDataset:
    """The joint training set: the RefCOCO/+/g train pseudo-videos, then the YTVOS clips (order does not matter
    to the uniform sampler)."""
    return JointDataset([*image_datasets, ytvos])


def sampling_share(joint: JointDataset) -> dict[str, float]:
    """Expected fraction of each part in a uniformly shuffled epoch (its share of the samples)."""
    comp = joint.composition()
    total = sum(comp.values())
    return {k: v / total for k, v in comp.items()} if total else {}


__all__ = ["IMAGE_DIR", "Entry", "JointDataset", "RefCOCODataset", "SequenceAugmentConfig", "annotation_path",
           "build_joint", "pseudo_video", "random_affine", "read_entries", "sampling_share", "segmentation_mask"]
