"""Clip transforms shared by the referring-video loaders (the official training and eval pipelines).

Every transform is a callable ``(clip, target) -> (clip, target)`` where ``clip`` is a list of T PIL images of one
video and ``target`` is the loaders' sample dict (absolute xyxy ``boxes [T, 4]``, ``masks [T, H, W]``,
``valid [T]``, ``caption``, ``size``...). Geometric parameters are drawn once per clip and applied to every frame;
photometric parameters are drawn again for every frame, as the official transform does. The final ``Normalize``
stacks the clip into a float tensor ``[T, 3, H, W]`` and turns the boxes into normalised cxcywh.

Randomness comes from a ``random.Random``-like object (``random`` module by default). PyTorch reseeds the ``random``
module in every DataLoader worker, so workers draw different augmentations. (The reference PhotometricDistort uses
numpy's global generator, which PyTorch does not reseed; that duplicate-augmentation bug is not replicated.)

Quirks replicated on purpose: the caption left/right substring swap on flip ("bright" -> "bleft"), RGB handled as BGR
in the HSV round trip, the uint8 cast without clipping (values wrap), and the strict ``x2 > x1 and y2 > y1`` validity
test of ``Check`` on boxes whose x2/y2 are inclusive pixel indices (a 1-pixel-wide object is invalid).
"""

from __future__ import annotations

import itertools
import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as F
from PIL import Image

from bifit.config import check

Clip = list[Image.Image]
Target = dict
ClipTransform = Callable[[Clip, Target], tuple]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LEFT_RIGHT_PLACEHOLDER = "@"


@dataclass(frozen=True)
class ResizeConfig:
    """Scales of the training RandomSelect (the official multi-scale resize and crop).

    Branch (a): RandomResize(scales, max_size). Branch (b), taken with probability crop_probability (official 0.5):
    RandomResize(crop_resize_scales, no max size), then RandomSizeCrop(crop_min, crop_max), then
    RandomResize(scales, max_size).
    """

    scales: tuple[int, ...] = (288, 320, 352, 392, 416, 448, 480, 512)
    max_size: int | None = 640
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    crop_probability: float = 0.5

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_data_config(cls, data) -> ResizeConfig:
        """The training resize of a `bifit.config.DataConfig` (train_scales, max_size, crop_*)."""
        return cls(scales=tuple(data.train_scales), max_size=data.max_size,
                   crop_resize_scales=tuple(data.crop_resize_scales), crop_min=data.crop_min, crop_max=data.crop_max,
                   crop_probability=data.crop_probability)

    def validate(self, where: str = "ResizeConfig"):
        for name in ("scales", "crop_resize_scales"):
            values = getattr(self, name)
            check(bool(values) and all(int(v) >= 1 for v in values), f"{where}.{name}",
                  "a non-empty sequence of positive ints", values)
        check(self.max_size is None or self.max_size >= max(self.scales), f"{where}.max_size",
              f"None or >= max(scales)={max(self.scales)}", self.max_size)
        check(1 <= self.crop_min <= self.crop_max, f"{where}.crop_min/crop_max", "1 <= crop_min <= crop_max",
              (self.crop_min, self.crop_max))
        check(0.0 <= self.crop_probability <= 1.0, f"{where}.crop_probability", "a float in [0, 1]",
              self.crop_probability)


PAPER_RESIZE = ResizeConfig()
# The embedded synthetic benchmark has 192x320 frames: train around native resolution instead of the paper's
# 288..512 shorter sides chosen for 720p YouTube frames.
SYNTHETIC_RESIZE = ResizeConfig(
    scales=(160, 176, 192, 208, 224), max_size=384, crop_resize_scales=(200, 240, 280), crop_min=160, crop_max=280
)
PAPER_EVAL_SHORT_SIDE = 360
SYNTHETIC_EVAL_SHORT_SIDE = 192  # native height of the default synthetic frames (no resize at inference)


# ----------------------------------------------------------------------------------------------------------------
# functional helpers


def swap_left_right(caption: str) -> str:
    """Simultaneous substring swap of "left" and "right", plain substring replacement as in the official flip
    ("bright" becomes "bleft")."""
    return caption.replace("left", LEFT_RIGHT_PLACEHOLDER).replace("right", "left").replace(
        LEFT_RIGHT_PLACEHOLDER, "right"
    )


def resized_hw(image_wh: tuple[int, int], short_side: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) of the RandomResize rule: shorter side ``short_side``, longer side capped at ``max_size``."""
    w, h = image_wh
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * short_side > max_size:
            short_side = int(round(max_size * short / long))
    if (w <= h and w == short_side) or (h <= w and h == short_side):
        return h, w
    if w < h:
        return int(short_side * h / w), short_side
    return short_side, int(short_side * w / h)


def hflip(clip: Clip, target: Target) -> tuple[Clip, Target]:
    clip = [F.hflip(img) for img in clip]
    w, _ = clip[0].size
    target = target.copy()
    if "boxes" in target:
        # x1' = W - x2, x2' = W - x1
        boxes = target["boxes"][:, [2, 1, 0, 3]]
        target["boxes"] = boxes * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "caption" in target:
        target["caption"] = swap_left_right(target["caption"])
    if "captions" in target:  # several expressions sharing the clip (YTVOSDataset expressions_per_clip > 1)
        target["captions"] = [swap_left_right(c) for c in target["captions"]]
    return clip, target


def resize(clip: Clip, target: Target, size_hw: tuple[int, int]) -> tuple[Clip, Target]:
    old_w, old_h = clip[0].size
    new_h, new_w = size_hw
    if (new_h, new_w) != (old_h, old_w):
        clip = [F.resize(img, [new_h, new_w]) for img in clip]
    target = target.copy()
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    if "masks" in target:
        masks = target["masks"][:, None].float()  # [T, 1, H, W]
        target["masks"] = nnf.interpolate(masks, size=(new_h, new_w), mode="nearest")[:, 0] > 0.5
    target["size"] = torch.tensor([new_h, new_w])
    return clip, target


def crop(clip: Clip, target: Target, region: tuple[int, int, int, int]) -> tuple[Clip, Target]:
    """Crop every frame to ``region = (top, left, height, width)``; boxes are shifted and clipped, not recomputed."""
    top, left, height, width = region
    clip = [F.crop(img, top, left, height, width) for img in clip]
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
        corners = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([width, height], dtype=torch.float32))
        corners = corners.clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + height, left : left + width]
    target["size"] = torch.tensor([height, width])
    return clip, target


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# photometric distortion on one float32 HWC frame, channels read as B, G, R (as the official transform reads RGB)

# value picked for (b, g, r) in each hue sector, as indices into (v, p, q, t) of the usual HSV -> RGB formula
_HSV_SECTORS = np.asarray([(1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0)])
_EPS = float(np.finfo(np.float32).eps)


def bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """Float HSV like OpenCV's float path: H in [0, 360), S = (V - min) / |V|, V = max (same range as input)."""
    b, g, r = img[..., 0], img[..., 1], img[..., 2]
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = diff / (np.abs(v) + _EPS)
    scale = 60.0 / (diff + _EPS)
    h = np.where(v == r, (g - b) * scale, np.where(v == g, 120.0 + (b - r) * scale, 240.0 + (r - g) * scale))
    h = np.where(h < 0, h + 360.0, h)
    return np.stack([h, s, v], axis=-1).astype(np.float32)


def hsv_to_bgr(img: np.ndarray) -> np.ndarray:
    """Inverse of :func:`bgr_to_hsv`; S outside [0, 1] is not clipped, so values can leave [0, 255]."""
    h, s, v = img[..., 0] / 60.0, img[..., 1], img[..., 2]
    h = np.mod(h, 6.0)
    sector = np.floor(h).astype(np.int64).clip(0, 5)
    frac = h - sector
    tab = np.stack([v, v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))]).reshape(4, -1)  # (v, p, q, t)
    picks = _HSV_SECTORS[sector.reshape(-1)]  # [H*W, 3]
    pixels = np.arange(picks.shape[0])[:, None]
    return tab[picks, pixels].reshape(*img.shape[:-1], 3).astype(np.float32)


def wrap_to_uint8(img: np.ndarray) -> np.ndarray:
    """Truncating cast to uint8 without clipping: out-of-range values wrap modulo 256, as in the official transform."""
    return (np.trunc(img).astype(np.int64) & 0xFF).astype(np.uint8)


class PhotometricDistort:
    """SSD-style photometric distortion, drawn independently for each frame as the official transform does."""

    permutations = tuple(itertools.permutations(range(3)))

    def __init__(self, brightness_delta: float = 32.0, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                 hue_delta: float = 18.0, channel_swap: bool = True, wrap: bool = True, rng=None):
        self.brightness_delta = brightness_delta
        self.contrast = contrast
        self.saturation = saturation
        self.hue_delta = hue_delta
        self.channel_swap = channel_swap  # the official "lighting noise": a random channel permutation
        self.wrap = wrap  # official: cast to uint8 without clipping (values wrap); else clip to [0, 255]
        self.rng = rng or _random

    @classmethod
    def colour_preserving(cls, rng=None) -> PhotometricDistort:
        """Brightness, contrast and mild saturation only: no hue shift, no channel permutation, clipped.

        For data whose expressions name colours (the synthetic benchmark): the official distortion turns a red
        square blue in half of the frames, which makes colour words unlearnable."""
        return cls(saturation=(0.75, 1.25), hue_delta=0.0, channel_swap=False, wrap=False, rng=rng)

    def __call__(self, clip: Clip, target: Target) -> tuple[Clip, Target]:
        cast = wrap_to_uint8 if self.wrap else (lambda a: np.clip(a, 0, 255).astype(np.uint8))
        return [Image.fromarray(cast(self.distort(np.asarray(img, dtype=np.float32)))) for img in clip], target

    def distort(self, img: np.ndarray) -> np.ndarray:
        img = img.copy()  # [H, W, 3] float32, 0..255
        if self.rng.random() < 0.5:
            img += self.rng.uniform(-self.brightness_delta, self.brightness_delta)
        if self.rng.random() < 0.5:  # order A: contrast first
            img = self.hsv_jitter(self.random_contrast(img))
        else:  # order B: contrast last
            img = self.random_contrast(self.hsv_jitter(img))
        if self.channel_swap and self.rng.random() < 0.5:
            img = img[..., list(self.permutations[self.rng.randrange(len(self.permutations))])]
        return img

    def random_contrast(self, img: np.ndarray) -> np.ndarray:
        if self.rng.random() < 0.5:
            img = img * np.float32(self.rng.uniform(*self.contrast))
        return img

    def hsv_jitter(self, img: np.ndarray) -> np.ndarray:
        hsv = bgr_to_hsv(img)
        if self.rng.random() < 0.5:
            hsv[..., 1] *= np.float32(self.rng.uniform(*self.saturation))
        if self.hue_delta and self.rng.random() < 0.5:
            hsv[..., 0] += np.float32(self.rng.uniform(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = np.where(hsv[..., 0] > 360.0, hsv[..., 0] - 360.0, hsv[..., 0])
            hsv[..., 0] = np.where(hsv[..., 0] < 0.0, hsv[..., 0] + 360.0, hsv[..., 0])
        return hsv_to_bgr(hsv)


# ----------------------------------------------------------------------------------------------------------------
# clip transforms


class Compose:
    def __init__(self, transforms: Sequence[ClipTransform]):
        self.transforms = list(transforms)

    def __call__(self, clip, target):
        for t in self.transforms:
            clip, target = t(clip, target)
        return clip, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, rng=None):
        self.p = p
        self.rng = rng or _random

    def __call__(self, clip, target):
        return hflip(clip, target) if self.rng.random() < self.p else (clip, target)


class RandomResize:
    """Shorter side drawn from ``sizes``, longer side capped at ``max_size`` (None: no cap)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, rng=None):
        self.sizes = list(sizes)
        self.max_size = max_size
        self.rng = rng or _random

    def __call__(self, clip, target):
        size = self.rng.choice(self.sizes)
        return resize(clip, target, resized_hw(clip[0].size, size, self.max_size))


class RandomSizeCrop:
    """One random region for the whole clip: width in [min, min(W, max)], height in [min, min(H, max)].

    Where the image is smaller than ``min_size`` the lower bound drops to the image side (the reference would raise
    on the empty random range).
    """

    def __init__(self, min_size: int, max_size: int, rng=None):
        self.min_size = min_size
        self.max_size = max_size
        self.rng = rng or _random

    def __call__(self, clip, target):
        img_w, img_h = clip[0].size
        w = self.rng.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = self.rng.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        top = self.rng.randint(0, img_h - h)
        left = self.rng.randint(0, img_w - w)
        return crop(clip, target, (top, left, h, w))


class RandomSelect:
    """``first`` with probability p, else ``second``."""

    def __init__(self, first: ClipTransform, second: ClipTransform, p: float = 0.5, rng=None):
        self.first, self.second, self.p = first, second, p
        self.rng = rng or _random

    def __call__(self, clip, target):
        return self.first(clip, target) if self.rng.random() < self.p else self.second(clip, target)


class Check:
    """A frame is valid iff its box has x2 > x1 and y2 > y1 (strict); invalid boxes are zeroed."""

    def __call__(self, clip, target):
        target = target.copy()
        if "boxes" in target:
            corners = target["boxes"].reshape(-1, 2, 2)
            keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
            target["boxes"] = torch.where(keep[:, None], target["boxes"], torch.zeros_like(target["boxes"]))
        elif "masks" in target:
            keep = target["masks"].flatten(1).any(1)
        else:
            return clip, target
        target["valid"] = keep.to(torch.int32)
        return clip, target


class Normalize:
    """ToTensor + mean/std normalisation; stacks the clip to ``[T, 3, H, W]`` and boxes to normalised cxcywh."""

    def __init__(self, mean=MEAN, std=STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, clip, target):
        imgs = torch.stack([F.normalize(F.to_tensor(img), self.mean, self.std) for img in clip])  # [T, 3, H, W]
        target = target.copy()
        if "boxes" in target:
            h, w = imgs.shape[-2:]
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return imgs, target


class VideoResize:
    """torchvision ``Resize(short_side)`` on each frame: shorter side ``short_side``, no cap (YTVOS inference)."""

    def __init__(self, short_side: int = 360):
        self.short_side = short_side

    def __call__(self, clip, target):
        return resize(clip, target, resized_hw(clip[0].size, self.short_side, None))


# ----------------------------------------------------------------------------------------------------------------
# builders


PHOTOMETRIC = ("official", "colour_preserving", "none")


def make_train_transforms(cfg: ResizeConfig = PAPER_RESIZE, rng=None, photometric: str = "official") -> Compose:
    """Flip -> PhotometricDistort -> RandomSelect(resize | resize, crop, resize) -> Check -> Normalize.

    photometric: "official" (the reference distortion with its quirks), "colour_preserving" or "none"."""
    if photometric not in PHOTOMETRIC:
        raise ValueError(f"photometric distortion must be one of {PHOTOMETRIC}, got {photometric!r}")
    distort = {"official": lambda: [PhotometricDistort(rng=rng)],
               "colour_preserving": lambda: [PhotometricDistort.colour_preserving(rng=rng)],
               "none": lambda: []}[photometric]()
    return Compose([
        RandomHorizontalFlip(rng=rng),
        *distort,
        RandomSelect(
            Compose([RandomResize(cfg.scales, cfg.max_size, rng=rng), Check()]),
            Compose([
                RandomResize(cfg.crop_resize_scales, rng=rng),
                RandomSizeCrop(cfg.crop_min, cfg.crop_max, rng=rng),
                RandomResize(cfg.scales, cfg.max_size, rng=rng),
                Check(),
            ]),
            p=1.0 - cfg.crop_probability,  # one draw per clip whatever the probability
            rng=rng,
        ),
        Normalize(),
    ])


def make_eval_transforms(short_side: int = 360, max_size: int | None = 640) -> Compose:
    """A2D/JHMDB-style eval: RandomResize([short_side], max_size) + Normalize."""
    return Compose([RandomResize([short_side], max_size), Normalize()])


def make_video_eval_transform(short_side: int = 360) -> Compose:
    """YTVOS/DAVIS inference: Resize(short_side) with no cap + Normalize."""
    return Compose([VideoResize(short_side), Normalize()])
