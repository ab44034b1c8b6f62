"""Ref-YouTube-VOS loader on a small generated benchmark: round trip, clip sampling, inference listing, bad data."""

import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bifit.data.collate import collate_fn
from bifit.data.transforms import MEAN, STD, box_cxcywh_to_xyxy
from bifit.data.ytvos import (
    SampleError,
    YTVOSDataset,
    bounding_box,
    inference_expressions,
    inference_videos,
    load_gt_masks,
    load_video,
    sample_clip_indices,
)
from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.render import shape_mask
from bifit.synthetic.ytvos import generate_benchmark, load_scenes

TINY = SyntheticConfig(seed=11, num_train_videos=3, num_valid_videos=2, num_test_videos=1, frames_per_video=6,
                       height=96, width=160)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ytvos") / "ref-youtube-vos"
    generate_benchmark(TINY, root, progress=False)
    return root


@pytest.fixture
def bench_copy(bench, tmp_path) -> Path:
    return Path(shutil.copytree(bench, tmp_path / "copy"))


def dataset(root, **kw) -> YTVOSDataset:
    kw.setdefault("num_frames", 4)
    return YTVOSDataset(root, "train", categories=SYNTHETIC_CATEGORIES, rng=random.Random(0), **kw)


def meta(root, rel="meta_expressions/train/meta_expressions.json") -> dict:
    return json.loads((Path(root) / rel).read_text())["videos"]


# ----------------------------------------------------------------------------------------------------------------


def test_sample_listing_is_one_per_expression_and_anchor(bench):
    ds = dataset(bench, num_frames=4)
    exps = meta(bench)
    n_exp = sum(len(v["expressions"]) for v in exps.values())
    assert len(ds) == n_exp * math.ceil(TINY.frames_per_video / 4)
    assert {s.anchor for s in ds.samples} == {0, 4}
    assert ds.skipped == []


def test_round_trip_masks_boxes_labels(bench):
    ds = dataset(bench)
    train_meta = meta(bench, "train/meta.json")
    scenes = load_scenes(bench)["train"]
    for idx in range(0, len(ds), 5):
        imgs, t = ds[idx]
        s = ds.samples[idx]
        assert imgs.shape == (4, 3, 96, 160) and t["masks"].shape == (4, 96, 160) and t["masks"].dtype == torch.bool
        assert t["video"] == s.video and t["exp_id"] == s.exp_id and t["obj_id"] == s.obj_id
        assert t["caption"] == " ".join(meta(bench)[s.video]["expressions"][s.exp_id]["exp"].lower().split())
        assert t["orig_size"].tolist() == [96, 160] and t["size"].tolist() == [96, 160]
        category = train_meta[s.video]["objects"][s.obj_id]["category"]
        assert t["labels"].tolist() == [SYNTHETIC_CATEGORIES.index(category)] * 4
        assert t["category"].item() == SYNTHETIC_CATEGORIES.index(category)
        obj = next(o for o in scenes[s.video]["objects"] if str(o["obj_id"]) == s.obj_id)
        xyxy = box_cxcywh_to_xyxy(t["boxes"]) * torch.tensor([160, 96, 160, 96])
        for k, pos in enumerate(t["frames_idx"].tolist()):
            frame = s.frames[pos]
            png = np.array(Image.open(bench / "train" / "Annotations" / s.video / f"{frame}.png"))
            expected = png == int(s.obj_id)
            assert torch.equal(t["masks"][k], torch.from_numpy(expected))
            shape = shape_mask(obj["shape"], *obj["centres"][pos], obj["radius"], 96, 160)
            assert np.all(expected <= shape)  # the mask is the rendered object (minus occlusion)
            assert t["valid"][k] == int(expected.any())
            box = bounding_box(expected) if expected.any() else (0, 0, 0, 0)
            torch.testing.assert_close(xyxy[k], torch.tensor(box, dtype=torch.float32), atol=1e-3, rtol=0)
            jpg = np.asarray(Image.open(bench / "train" / "JPEGImages" / s.video / f"{frame}.jpg"), np.float32)
            pixels = (imgs[k] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255
            torch.testing.assert_close(pixels.permute(1, 2, 0), torch.from_numpy(jpg), atol=1e-3, rtol=0)


def test_expression_objects_exist_in_meta_and_masks(bench):
    train_meta = meta(bench, "train/meta.json")
    for vid, entry in meta(bench).items():
        pngs = np.stack([np.array(Image.open(bench / "train" / "Annotations" / vid / f"{f}.png"))
                         for f in entry["frames"]])
        for exp in entry["expressions"].values():
            assert exp["obj_id"] in train_meta[vid]["objects"]
            assert (pngs == int(exp["obj_id"])).sum() > 0


@pytest.mark.parametrize(("anchor", "length", "t"), [(0, 12, 6), (11, 12, 6), (6, 12, 5), (4, 12, 1), (3, 12, 3),
                                                     (1, 3, 6), (0, 2, 9), (0, 1, 4)])
def test_clip_sampling(anchor, length, t):
    rng = random.Random(anchor * 100 + length)
    for _ in range(20):
        idx = sample_clip_indices(anchor, length, t, rng)
        assert len(idx) == t and idx == sorted(idx) and anchor in idx
        assert all(0 <= i < length for i in idx)
        if t == 1:
            assert idx == [anchor]
        elif length >= 4:  # the local neighbours lie 1..3 frames away (clamped at the ends)
            assert any(max(0, anchor - 3) <= i < anchor for i in idx) or anchor == 0
            assert any(anchor < i <= min(length - 1, anchor + 3) for i in idx) or anchor == length - 1
    if length < t - 3:  # every frame appears
        assert set(sample_clip_indices(anchor, length, t, rng)) == set(range(length))


def test_inference_listing_is_valid_minus_test(bench, bench_copy):
    valid, test = meta(bench, "meta_expressions/valid/meta_expressions.json"), meta(
        bench, "meta_expressions/test/meta_expressions.json")
    videos = inference_videos(bench)
    assert videos == sorted(set(valid) - set(test)) and len(videos) == 2
    exps = inference_expressions(bench)
    assert [e.video for e in exps] == sorted(e.video for e in exps)
    assert len(exps) == sum(len(valid[v]["expressions"]) for v in videos)
    assert all(e.obj_id is not None and e.frames == tuple(valid[e.video]["frames"]) for e in exps)
    with pytest.raises(ValueError, match="2 valid videos after filtering, expected 202"):
        inference_videos(bench, expected_count=202)
    (bench_copy / "meta_expressions" / "test" / "meta_expressions.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta_expressions/test/meta_expressions\.json"):
        inference_videos(bench_copy)


def test_load_video_and_gt(bench):
    e = inference_expressions(bench)[0]
    imgs, orig = load_video(bench, e.video, e.frames, short_side=96)
    assert imgs.shape == (6, 3, 96, 160) and orig == (96, 160)
    imgs, _ = load_video(bench, e.video, e.frames, short_side=120)
    assert imgs.shape == (6, 3, 120, 200)  # Resize(120): the longer side is int(120 * 160 / 96), no cap
    gt = load_gt_masks(bench, e.video, e.frames, e.obj_id)
    pngs = np.stack([np.array(Image.open(bench / "valid" / "Annotations" / e.video / f"{f}.png")) for f in e.frames])
    assert gt.dtype == torch.bool and torch.equal(gt, torch.from_numpy(pngs == int(e.obj_id))) and gt.any()


def test_dataloader_batches(bench):
    ds = dataset(bench)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn, drop_last=True)
    batch = next(iter(loader))
    assert batch.images.shape == (2, 4, 3, 96, 160) and batch.image_mask.shape == (2, 4, 96, 160)
    assert not batch.image_mask.any() and len(batch.captions) == 2 and len(batch.targets) == 2


def test_clip_without_valid_frame_is_redrawn(bench):
    """A clip left without a valid frame by the transforms (e.g. a crop) is replaced by a random sample."""
    first_video = dataset(bench).samples[0].video

    def drop_first_video(clip, target):  # stands in for a crop that misses the object
        imgs, target = dataset(bench).transforms(clip, target)
        if target["video"] == first_video:
            target["valid"] = torch.zeros_like(target["valid"])
        return imgs, target

    ds = dataset(bench, transforms=drop_first_video)
    _, t = ds[0]
    assert t["video"] != first_video and t["valid"].any()


def erase_object(root: Path, vid: str, obj_id: str, frames) -> None:
    """Remove the object's id from the annotation PNGs of ``frames`` (palette kept)."""
    for frame in frames:
        path = root / "train" / "Annotations" / vid / f"{frame}.png"
        with Image.open(path) as png:
            ids, palette = np.array(png), png.getpalette()
        ids[ids == int(obj_id)] = 0
        out = Image.fromarray(ids, mode="P")
        out.putpalette(palette)
        out.save(path)


def test_clip_missing_the_object_is_redrawn_counted_and_warned(bench_copy, caplog):
    """An object missing from some frames of a training video: a clip of only those frames has no valid frame and
    is replaced by a random other sample, as the reference's loop does; not an error, but counted and warned."""
    s = dataset(bench_copy).samples[0]
    assert s.anchor == 0
    erase_object(bench_copy, s.video, s.obj_id, s.frames[:-1])  # left in the last frame only
    ds = dataset(bench_copy, num_frames=2)  # anchor 0 with T=2 samples frames [0, 0]
    with caplog.at_level(logging.WARNING, logger="bifit.data.ytvos"):
        _, t = ds[0]
    assert t["valid"].any() and ds.redrawn >= 1 and t["redrawn_samples"] == ds.redrawn
    assert f"redrawing Ref-YouTube-VOS sample 0 (counted in redrawn_samples): no frame of the clip has the " \
           f"object after the transforms [video {s.video} exp_id {s.exp_id} obj_id {s.obj_id} frames " \
           f"{[s.frames[0]] * 2}]" in caplog.text
    other_video = next(i for i, x in enumerate(ds.samples) if x.video != s.video)
    _, clean = ds[other_video]
    assert clean["redrawn_samples"] == 0


def test_object_without_any_mask_is_redrawn_and_counted(bench_copy, caplog):
    """An expression whose object id is in no annotation PNG: the reference redraws every clip of it; so do we,
    naming the object in the warning (not an error that would stop a run on data the reference trains on)."""
    path = bench_copy / "meta_expressions" / "train" / "meta_expressions.json"
    exps = json.loads(path.read_text())
    vid = next(iter(exps["videos"]))
    for exp in exps["videos"][vid]["expressions"].values():
        exp["obj_id"] = "7"
    path.write_text(json.dumps(exps))
    meta_path = bench_copy / "train" / "meta.json"
    objects = json.loads(meta_path.read_text())
    objects["videos"][vid]["objects"]["7"] = {"category": "circle", "frames": []}  # an empty frame list: listed
    meta_path.write_text(json.dumps(objects))
    with caplog.at_level(logging.WARNING, logger="bifit.data.ytvos"):
        ds = dataset(bench_copy)
        assert ds.samples[0].video == vid and ds.samples[0].obj_id == "7"
        _, t = ds[0]
    assert t["video"] != vid and t["valid"].any() and t["redrawn_samples"] == ds.redrawn >= 1
    assert f"train/meta.json: object 7 has an empty frame list [video {vid} exp_id" in caplog.text
    assert f"Annotations/{vid}: object id 7 has no mask in any annotation PNG of the video" in caplog.text


def test_redraws_made_in_dataloader_workers_reach_the_engine_count(bench_copy):
    """Each DataLoader worker counts in its own copy of the dataset; the count travels in the items."""
    from bifit.engine import redrawn_in

    s = dataset(bench_copy).samples[0]
    erase_object(bench_copy, s.video, s.obj_id, s.frames)
    ds = dataset(bench_copy, num_frames=2)
    same_object = [i for i, x in enumerate(ds.samples) if (x.video, x.obj_id) == (s.video, s.obj_id)]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=same_object, collate_fn=collate_fn,
                                         num_workers=2)
    total = sum(redrawn_in(batch) for batch in loader)
    assert ds.redrawn == 0 and total >= len(same_object)  # every one of them was redrawn at least once


def corrupt_video_frames(root: Path, vid: str) -> Path:
    frames = sorted((root / "train" / "JPEGImages" / vid).glob("*.jpg"))
    for f in frames:
        f.write_bytes(f.read_bytes()[:300])  # truncated JPEG
    return frames[0]


def test_truncated_jpeg_raises_naming_file(bench_copy):
    ds = dataset(bench_copy)
    first = corrupt_video_frames(bench_copy, ds.samples[0].video)
    with pytest.raises(SampleError, match=rf"{first.parent}/\d+\.jpg: corrupt or unreadable image .*"
                                          rf"video {ds.samples[0].video} exp_id 0"):
        ds[0]


def test_missing_mask_raises_naming_file(bench_copy):
    ds = dataset(bench_copy)
    vid = ds.samples[0].video
    for png in (bench_copy / "train" / "Annotations" / vid).glob("*.png"):
        png.unlink()
    with pytest.raises(SampleError, match=rf"Annotations/{vid}/\d+\.png: missing annotation PNG \[video {vid}"):
        ds[0]


def test_expression_with_missing_object_raises_naming_file_and_id(bench_copy):
    path = bench_copy / "meta_expressions" / "train" / "meta_expressions.json"
    exps = json.loads(path.read_text())
    vid = next(iter(exps["videos"]))
    exps["videos"][vid]["expressions"]["1"]["obj_id"] = "42"
    path.write_text(json.dumps(exps))
    with pytest.raises(SampleError, match=rf"train/meta\.json: expression refers to an object missing from "
                                          rf"meta\.json \[video {vid} exp_id 1 obj_id 42\]"):
        dataset(bench_copy)
    ds = dataset(bench_copy, skip_bad_samples=True)
    assert ds.skipped == [{"file": str(bench_copy / "train" / "meta.json"),
                           "id": f"video {vid} exp_id 1 obj_id 42",
                           "reason": "expression refers to an object missing from meta.json", "index": None}]
    assert all((s.video, s.exp_id) != (vid, "1") for s in ds.samples)


def test_skip_bad_samples_records_and_serves_next(bench_copy, caplog):
    ds = dataset(bench_copy, skip_bad_samples=True)
    bad_vid = ds.samples[0].video
    corrupt_video_frames(bench_copy, bad_vid)
    first_good = next(i for i, s in enumerate(ds.samples) if s.video != bad_vid)
    with caplog.at_level(logging.WARNING, logger="bifit.data.ytvos"):
        _, t = ds[0]
    assert (t["video"], t["exp_id"]) == (ds.samples[first_good].video, ds.samples[first_good].exp_id)
    assert [r["index"] for r in ds.skipped] == list(range(first_good))  # each bad sample on the way, once
    assert all(r["file"].endswith(".jpg") and bad_vid in r["file"] and bad_vid in r["id"] for r in ds.skipped)
    assert all("corrupt or unreadable image" in r["reason"] for r in ds.skipped)
    assert "skipping bad Ref-YouTube-VOS sample" in caplog.text
    _, again = ds[0]
    assert again["video"] == t["video"] and len(ds.skipped) == first_good  # deterministic, no duplicates


def test_expressions_per_clip_share_the_clip_and_refer_to_other_objects(bench):
    ds = dataset(bench, expressions_per_clip=3)
    exps = meta(bench)
    train_meta = meta(bench, "train/meta.json")
    for idx in range(0, len(ds), 7):
        imgs, group = ds[idx]
        s = ds.samples[idx]
        assert isinstance(group, list) and len(group) == 3
        assert (group[0]["exp_id"], group[0]["obj_id"]) == (s.exp_id, s.obj_id)
        present = set()
        for pos in group[0]["frames_idx"].tolist():
            png = np.array(Image.open(bench / "train" / "Annotations" / s.video / f"{s.frames[pos]}.png"))
            present |= {str(i) for i in np.unique(png) if i}
        partners = [t["obj_id"] for t in group[1:]]
        assert set(partners) <= present
        assert len(set(partners) - {s.obj_id}) == min(2, len(present - {s.obj_id}))  # distinct objects first
        for t in group:
            assert t["video"] == s.video and torch.equal(t["frames_idx"], group[0]["frames_idx"])
            assert t["caption"] == " ".join(exps[s.video]["expressions"][t["exp_id"]]["exp"].lower().split())
            assert exps[s.video]["expressions"][t["exp_id"]]["obj_id"] == t["obj_id"]
            category = train_meta[s.video]["objects"][t["obj_id"]]["category"]
            assert t["category"].item() == SYNTHETIC_CATEGORIES.index(category)  # each member its own object's
            for k, pos in enumerate(t["frames_idx"].tolist()):
                png = np.array(Image.open(bench / "train" / "Annotations" / s.video / f"{s.frames[pos]}.png"))
                assert torch.equal(t["masks"][k], torch.from_numpy(png == int(t["obj_id"])))
                assert t["valid"][k] == int((png == int(t["obj_id"])).any())


def test_expressions_per_clip_get_the_same_augmentation_and_batch_expression_major(bench):
    from bifit.data.transforms import PAPER_RESIZE, make_train_transforms

    rng = random.Random(3)
    ds = YTVOSDataset(bench, "train", 2, transforms=make_train_transforms(PAPER_RESIZE, rng=rng, photometric="none"),
                      categories=SYNTHETIC_CATEGORIES, rng=rng, expressions_per_clip=2)
    for idx in range(12):
        imgs, group = ds[idx]
        plain = next(s for s in ds.video_expressions(group[0]["video"]) if s.exp_id == group[0]["exp_id"])
        size = tuple(imgs.shape[-2:])
        for t in group:
            assert t["masks"].shape[-2:] == size and t["size"].tolist() == list(size)
        partner = next(s for s in ds.video_expressions(plain.video) if s.exp_id == group[1]["exp_id"])
        assert group[1]["caption"] in (partner.caption, syn_swap(partner.caption))
    # a flip applies to the whole group: every caption swapped, every mask mirrored
    from bifit.data.transforms import Compose, Normalize, RandomHorizontalFlip

    flipping = YTVOSDataset(bench, "train", 2, transforms=Compose([RandomHorizontalFlip(p=1.0), Normalize()]),
                            categories=SYNTHETIC_CATEGORIES, rng=random.Random(0), expressions_per_clip=3)
    swapped = 0
    for idx in range(0, len(flipping), 3):
        _, group = flipping[idx]
        video = group[0]["video"]
        for t in group:
            partner = next(s for s in flipping.video_expressions(video) if s.exp_id == t["exp_id"])
            assert t["caption"] == syn_swap(partner.caption)
            swapped += t["caption"] != partner.caption
            for k, pos in enumerate(t["frames_idx"].tolist()):
                png = np.array(Image.open(bench / "train" / "Annotations" / video / f"{partner.frames[pos]}.png"))
                assert torch.equal(t["masks"][k], torch.from_numpy(png[:, ::-1].copy() == int(t["obj_id"])))
    assert swapped > 0  # some expressions name left or right
    plain_ds = dataset(bench, expressions_per_clip=2)
    (imgs0, g0), (imgs1, g1) = plain_ds[0], plain_ds[5]
    batch = collate_fn([(imgs0, g0), (imgs1, g1)])
    assert batch.images.shape[0] == 2 and len(batch.targets) == 4
    assert [t["exp_id"] for t in batch.targets] == [g0[0]["exp_id"], g1[0]["exp_id"], g0[1]["exp_id"], g1[1]["exp_id"]]
    assert batch.targets[0]["exp_id"] == plain_ds.samples[0].exp_id
    assert batch.captions == [t["caption"] for t in batch.targets]
    with pytest.raises(ValueError, match="same number of expressions"):
        collate_fn([(imgs0, g0), (imgs1, g1[:1])])


def syn_swap(caption: str) -> str:
    from bifit.data.transforms import swap_left_right

    return swap_left_right(caption)


def test_train_stage_dataset_takes_expressions_per_clip_from_the_config(bench):
    from pipeline.config import PipelineConfig
    from pipeline.train import _dataset

    cfg = PipelineConfig()
    cfg.data.root, cfg.data.categories, cfg.data.num_frames = str(bench), "synthetic", 2
    cfg.datasets.ytvos_proxy.exclude_from_training = False
    cfg.data.expressions_per_clip = 3
    _, group = _dataset(cfg)[0]
    assert [len(group), group[0]["masks"].shape[0]] == [3, 2]
    cfg.data.expressions_per_clip = 1
    _, target = _dataset(cfg)[0]
    assert isinstance(target, dict)


def test_excluded_videos_are_not_listed_nor_partners(bench):
    ds = dataset(bench, expressions_per_clip=2)
    video = ds.samples[0].video
    assert len(ds.video_expressions(video)) == len(meta(bench)[video]["expressions"])
    held = dataset(bench, expressions_per_clip=2, exclude_videos=[video])  # e.g. the ytvos_proxy videos
    assert held.samples == [s for s in ds.samples if s.video != video]
    assert held.video_expressions(video) == []
    other = held.samples[0]
    assert held.video_expressions(other.video) == ds.video_expressions(other.video)
