"""Clip transforms of the official pipelines and their quirks."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from bifit.data import transforms as T


def make_clip(n=3, h=40, w=60, box=(10, 5, 29, 24)):
    """n random frames plus a target with one rectangle object at inclusive xyxy ``box`` in every frame."""
    rng = np.random.default_rng(0)
    clip = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
    x1, y1, x2, y2 = box
    masks = torch.zeros(n, h, w)
    masks[:, y1 : y2 + 1, x1 : x2 + 1] = 1
    target = {
        "boxes": torch.tensor([box] * n, dtype=torch.float32),
        "masks": masks,
        "valid": torch.ones(n, dtype=torch.int32),
        "labels": torch.zeros(n, dtype=torch.long),
        "caption": "the bright circle left of the right square",
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }
    return clip, target


class Always:
    """rng stub: every coin flip succeeds, uniform/randint/choice pick fixed values."""

    def __init__(self, coin=0.0):
        self.coin = coin

    def random(self):
        return self.coin

    def uniform(self, a, b):
        return b

    def randint(self, a, b):
        return a

    def randrange(self, n):
        return n - 1

    def choice(self, seq):
        return seq[-1]


def test_caption_swap_quirk():
    assert T.swap_left_right("the bright circle left of the right square") == \
        "the bleft circle right of the left square"
    assert T.swap_left_right("upright leftmost") == "upleft rightmost"


def test_hflip_boxes_masks_caption():
    clip, target = make_clip()
    out_clip, out = T.RandomHorizontalFlip(p=1.0)(clip, target)
    # x1' = W - x2, x2' = W - x1 (inclusive-pixel boxes, as in the reference)
    assert out["boxes"][0].tolist() == [60 - 29, 5, 60 - 10, 24]
    assert torch.equal(out["masks"], target["masks"].flip(-1))
    assert out["caption"] == "the bleft circle right of the left square"
    assert np.array_equal(np.asarray(out_clip[1]), np.asarray(clip[1])[:, ::-1])
    _, same = T.RandomHorizontalFlip(p=0.0)(clip, target)
    assert same["caption"] == target["caption"]


@pytest.mark.parametrize(("wh", "short", "max_size", "expected_hw"), [
    ((1280, 720), 288, 640, (288, 512)),
    ((1280, 720), 320, 640, (320, 568)),
    ((1280, 720), 352, 640, (352, 625)),
    ((1280, 720), 392, 640, (360, 640)),
    ((1280, 720), 512, 640, (360, 640)),
    ((320, 240), 512, 640, (480, 640)),
    ((427, 320), 360, 640, (360, 480)),
    ((569, 320), 360, 640, (360, 640)),
    ((320, 240), 360, 640, (360, 480)),
    ((854, 480), 360, None, (360, 640)),  # torchvision Resize(360): int(640.5) = 640
    ((1280, 720), 360, None, (360, 640)),
    ((160, 96), 96, None, (96, 160)),  # already the right size: unchanged
])
def test_resize_rule(wh, short, max_size, expected_hw):
    assert T.resized_hw(wh, short, max_size) == expected_hw


def test_resize_scales_boxes_and_thresholds_masks():
    clip, target = make_clip()
    out_clip, out = T.resize(clip, target, (80, 120))
    assert out_clip[0].size == (120, 80) and out["size"].tolist() == [80, 120]
    assert out["boxes"][0].tolist() == [20, 10, 58, 48]
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (3, 80, 120)
    assert out["masks"][0, 10:50, 20:60].all() and out["masks"][0].sum() == 40 * 40


def test_check_one_pixel_object_is_invalid():
    clip, target = make_clip(box=(10, 5, 10, 24))  # 1 pixel wide: x2 == x1
    _, out = T.Check()(clip, target)
    assert out["valid"].tolist() == [0, 0, 0] and not out["boxes"].any()
    clip, target = make_clip(box=(10, 5, 11, 24))  # 2 pixels wide
    _, out = T.Check()(clip, target)
    assert out["valid"].tolist() == [1, 1, 1] and out["boxes"][0].tolist() == [10, 5, 11, 24]


def test_crop_clips_boxes_and_outside_object_becomes_invalid():
    clip, target = make_clip()
    _, out = T.crop(clip, target, (0, 20, 30, 30))  # top, left, h, w
    assert out["boxes"][0].tolist() == [0, 5, 9, 24] and out["size"].tolist() == [30, 30]
    assert out["masks"].shape == (3, 30, 30)
    _, out = T.Check()(*T.crop(clip, target, (0, 40, 30, 20)))  # region right of the object
    assert out["valid"].tolist() == [0, 0, 0] and not out["boxes"].any()


def test_random_size_crop_same_region_for_all_frames():
    clip, target = make_clip(n=4)
    out_clip, out = T.RandomSizeCrop(20, 50, rng=random.Random(1))(clip, target)
    assert len({img.size for img in out_clip}) == 1
    w, h = out_clip[0].size
    assert 20 <= w <= 50 and 20 <= h <= 40 and out["masks"].shape == (4, h, w)
    small_clip, small = make_clip(h=16, w=16, box=(1, 1, 5, 5))  # smaller than min_size: lower bound drops
    out_clip, _ = T.RandomSizeCrop(20, 50, rng=random.Random(1))(small_clip, small)
    assert out_clip[0].size == (16, 16)


def test_wrap_to_uint8_does_not_clip():
    assert T.wrap_to_uint8(np.array([256.7, -1.2, 300.0, 12.9])).tolist() == [0, 255, 44, 12]


def test_photometric_distort_per_frame_and_wraps():
    frame = Image.fromarray(np.full((8, 8, 3), 240, dtype=np.uint8))
    # every branch on, brightness +32: 240 + 32 = 272 -> contrast x1.5 -> wraps past 255 instead of clipping
    out, _ = T.PhotometricDistort(rng=Always())([frame], {})
    assert out[0].mode == "RGB" and out[0].size == (8, 8)
    assert np.asarray(out[0]).max() < 240  # wrapped to small values
    # no branch taken: HSV round trip only, at most 1 off from float truncation
    out, _ = T.PhotometricDistort(rng=Always(coin=0.99))([frame], {})
    assert np.abs(np.asarray(out[0], dtype=int) - 240).max() <= 1
    # parameters drawn per frame: identical frames come out different
    gradient = Image.fromarray(np.linspace(0, 255, 8 * 8 * 3).reshape(8, 8, 3).astype(np.uint8))
    out, _ = T.PhotometricDistort(rng=random.Random(3))([gradient] * 6, {})
    assert len({np.asarray(o).tobytes() for o in out}) > 1


def test_hsv_round_trip_and_bgr_interpretation():
    img = np.random.default_rng(0).uniform(0, 255, (5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(T.hsv_to_bgr(T.bgr_to_hsv(img)), img, atol=1e-3)
    hsv = T.bgr_to_hsv(np.array([[[0.0, 0.0, 255.0]]], dtype=np.float32))  # channel 2 is read as red
    np.testing.assert_allclose(hsv[0, 0], [0.0, 1.0, 255.0], atol=1e-4)
    hsv = T.bgr_to_hsv(np.array([[[255.0, 0.0, 0.0]]], dtype=np.float32))  # channel 0 is read as blue
    np.testing.assert_allclose(hsv[0, 0], [240.0, 1.0, 255.0], atol=1e-4)


def test_normalize_stacks_and_converts_boxes():
    clip, target = make_clip()
    imgs, out = T.Normalize()(clip, target)
    assert imgs.shape == (3, 3, 40, 60) and imgs.dtype == torch.float32
    expected = torch.tensor([(10 + 29) / 2 / 60, (5 + 24) / 2 / 40, 19 / 60, 19 / 40])
    torch.testing.assert_close(out["boxes"][0], expected)
    raw = torch.from_numpy(np.asarray(clip[0], dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(T.MEAN)[:, None, None], torch.tensor(T.STD)[:, None, None]
    torch.testing.assert_close(imgs[0], (raw - mean) / std)


@pytest.mark.parametrize("cfg", [T.SYNTHETIC_RESIZE, T.PAPER_RESIZE])
def test_train_pipeline_end_to_end(cfg):
    rng = random.Random(0)
    pipeline = T.make_train_transforms(cfg, rng=rng)
    for _ in range(6):
        clip, target = make_clip(n=2, h=192, w=320, box=(100, 50, 160, 120))
        imgs, out = pipeline(clip, target)
        h, w = imgs.shape[-2:]
        assert imgs.shape[:2] == (2, 3) and out["masks"].shape == (2, h, w) and out["size"].tolist() == [h, w]
        assert min(h, w) <= max(cfg.scales) and (cfg.max_size is None or max(h, w) <= cfg.max_size)
        assert out["masks"].dtype == torch.bool and out["valid"].dtype == torch.int32
        assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
        assert out["caption"] in (target["caption"], T.swap_left_right(target["caption"]))


def test_crop_probability_sets_how_often_the_crop_branch_is_taken():
    # 128 x 224 frames; the plain branch keeps them at 128 x 224, the crop branch crops at most 160 of the 280
    # columns the 160-scale resize gives, so its output is never 224 wide
    base = dict(scales=(128,), max_size=256, crop_resize_scales=(160,), crop_min=128, crop_max=160)

    def widths(probability, n=40):
        pipeline = T.make_train_transforms(T.ResizeConfig(**base, crop_probability=probability), rng=random.Random(3),
                                           photometric="none")
        return [pipeline(*make_clip(n=2, h=128, w=224, box=(100, 50, 130, 80)))[0].shape[-1] for _ in range(n)]

    assert set(widths(0.0)) == {224}
    assert 224 not in widths(1.0)
    cropped = sum(w != 224 for w in widths(0.5))
    assert 10 <= cropped <= 30  # about half of 40
    with pytest.raises(ValueError, match=r"ResizeConfig\.crop_probability: expected a float in \[0, 1\]"):
        T.ResizeConfig(crop_probability=1.5)


def test_resize_config_from_the_data_section_carries_every_resize_setting():
    from bifit.config import DataConfig

    data = DataConfig(train_scales=[128, 144], max_size=256, crop_resize_scales=[160, 176], crop_min=120,
                      crop_max=150, crop_probability=0.25)
    assert T.ResizeConfig.from_data_config(data) == T.ResizeConfig(
        scales=(128, 144), max_size=256, crop_resize_scales=(160, 176), crop_min=120, crop_max=150,
        crop_probability=0.25)


def test_eval_transforms():
    clip, target = make_clip(n=2, h=320, w=427)
    imgs, out = T.make_eval_transforms(360, 640)(clip, target)
    assert imgs.shape == (2, 3, 360, 480) and out["size"].tolist() == [360, 480]
    clip, target = make_clip(n=2, h=480, w=854)
    imgs, _ = T.make_video_eval_transform(360)(clip, {})
    assert imgs.shape == (2, 3, 360, 640)


def test_resize_config_validation():
    with pytest.raises(ValueError, match=r"ResizeConfig\.max_size: expected None or >= max\(scales\)=224"):
        T.ResizeConfig(scales=(160, 224), max_size=200)
    with pytest.raises(ValueError, match=r"ResizeConfig\.crop_min/crop_max"):
        T.ResizeConfig(crop_min=700, crop_max=600)
