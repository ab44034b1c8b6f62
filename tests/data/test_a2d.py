"""A2D-Sentences: synthetic writer (official formats) -> preprocess -> loader, and bad inputs."""

import json
import logging
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from bifit.data.a2d import (
    A2DDataset,
    SkippedSample,
    centred_window,
    collate_skipping,
    read_video,
    read_video_frames,
)
from bifit.data.transforms import MEAN, STD, SYNTHETIC_RESIZE, Compose, Normalize, make_train_transforms
from bifit.data.ytvos import SampleError, bounding_box
from bifit.prepare.a2d import (
    COCO_GT_JSON,
    H5_DIR,
    TEST_JSON,
    TRAIN_JSON,
    preprocess,
    read_h5,
    read_mask_png,
    regenerate_single_frame,
    size_mismatches,
)
from bifit.synthetic import a2d as syn
from bifit.synthetic.video import make_video

TINY = syn.SyntheticA2DConfig(seed=5, num_train_videos=2, num_test_videos=2, frames_per_video=8, annotated_frames=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a2d") / "a2d_sentences"
    syn.generate_a2d(TINY, root, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a2d_out") / "prepared"
    preprocess(raw, out, progress=False)
    return out


@pytest.fixture
def raw_copy(raw, tmp_path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


def denormalise(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] float in 0..255."""
    return ((img * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------------


def test_writer_is_idempotent_and_deterministic(raw, tmp_path):
    again = syn.generate_a2d(TINY, raw, progress=False)
    assert again["generated"] is False
    other = tmp_path / "again"
    syn.generate_a2d(TINY, other, progress=False)
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        assert (other / path.relative_to(raw)).read_bytes() == path.read_bytes(), path


def test_h5_layout_is_transposed_and_single_instance_is_2d(tmp_path):
    masks = np.zeros((2, 5, 7), bool)  # (N, H, W), non-square so a missing transpose shows
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    syn.write_h5(tmp_path / "two.h5", masks, [3, 0], [11, 21])
    syn.write_h5(tmp_path / "one.h5", masks[:1], [3], [11])
    with h5py.File(tmp_path / "two.h5") as f:
        assert f["reMask"].shape == (2, 7, 5) and f["reBBox"].shape == (4, 2)
    with h5py.File(tmp_path / "one.h5") as f:
        assert f["reMask"].shape == (7, 5) and f["reBBox"].shape == (4, 1)
    ids, read, boxes = read_h5(tmp_path / "two.h5", "x")
    assert ids == [3, 0] and np.array_equal(read, masks)
    assert boxes.tolist() == [[2, 1, 5, 2], [0, 4, 0, 4]]
    ids, read, _ = read_h5(tmp_path / "one.h5", "x")
    assert ids == [3] and np.array_equal(read, masks[:1])


def test_preprocess_summary_and_released_gt_check(raw, prepared):
    summary = json.loads((prepared / "summary.json").read_text())
    released_test = json.loads((raw / TEST_JSON).read_text())
    assert summary["test_samples"] == len(released_test) > 0
    assert summary["train_samples"] == len(json.loads((raw / TRAIN_JSON).read_text())) > 0
    assert summary["released_coco_gt_checked"] == len(released_test)  # rebuilt from .h5 == written from scenes
    assert summary["skipped"] == 0 and summary["test_single_frame_json"] == "released"
    assert json.loads((prepared / "skipped_samples.json").read_text()) == []


def test_regenerated_single_frame_json_equals_released(raw):
    for split, name in (("train", TRAIN_JSON), ("test", TEST_JSON)):
        entries, dropped = regenerate_single_frame(raw, split)
        assert entries == json.loads((raw / name).read_text())
        assert [d["row"]["instance_id"] for d in dropped] == [syn.BAD_INSTANCE_ROW]  # the "1 (copy)" row
    missed = (raw / "text_annotations" / "a2d_missed_videos.txt").read_text().split()
    assert missed and all(e[1] not in missed for e in regenerate_single_frame(raw, "test")[0])


def test_preprocess_regenerates_missing_released_json(raw_copy, tmp_path):
    released = json.loads((raw_copy / TEST_JSON).read_text())
    (raw_copy / TEST_JSON).unlink()
    summary = preprocess(raw_copy, tmp_path / "out", progress=False)
    assert summary["test_single_frame_json"] == "regenerated"
    assert json.loads((tmp_path / "out" / TEST_JSON).read_text()) == released


def test_eval_samples_round_trip_masks_frames_and_valid_indices(raw, prepared):
    ds = A2DDataset(prepared, "test", num_frames=5)  # no resize: original size
    coco = json.loads((prepared / COCO_GT_JSON).read_text())
    gt = {a["image_id"]: a for a in coco["annotations"]}
    scenes = {}
    for k in range(len(ds)):
        s = ds.samples[k]
        imgs, t = ds[k]
        f = s["frame_idx"] - 1
        assert t["image_id"] == s["image_id"] == f"v_{s['video']}_f_{s['frame_idx']}_i_{s['instance_id']}"
        assert imgs.shape == (5, 3, TINY.height, TINY.width)
        assert t["frames_idx"].tolist() == centred_window(f, 0, TINY.frames_per_video - 1, 5)
        assert int(t["frames_idx"][t["valid_indices"][0]]) == f
        assert t["labels"].tolist() == [0] and t["valid"].tolist() == [1]
        # the mask is the instance's .h5 mask, and the released COCO GT (written from the scenes) agrees
        ids, masks, _ = read_h5(raw / H5_DIR / s["video"] / f"{s['frame_idx']:05d}.h5", "x")
        h5_mask = masks[ids.index(s["instance_id"])]
        assert t["masks"].shape == (1, TINY.height, TINY.width) and t["masks"].dtype == torch.bool
        assert np.array_equal(t["masks"][0].numpy(), h5_mask)
        rle = dict(gt[s["image_id"]]["segmentation"], counts=gt[s["image_id"]]["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), h5_mask)
        # boxes: normalised cxcywh of the inclusive xyxy box
        x1, y1, x2, y2 = bounding_box(h5_mask)
        expected = [(x1 + x2) / 2 / TINY.width, (y1 + y2) / 2 / TINY.height, (x2 - x1) / TINY.width,
                    (y2 - y1) / TINY.height]
        assert torch.allclose(t["boxes"][0], torch.tensor(expected), atol=1e-6)
        # the frame at valid_indices is the decoded frame f, which is the rendered frame f (1-based h5 number)
        key = s["video"]
        if key not in scenes:
            index = next(i for i in range(2) if syn.youtube_like_id("a2d", TINY.seed, "valid", i) == key)
            scenes[key] = make_video(TINY.scene_config(), "valid", index).rgb
        # (H.264 yuv420p is lossy: the rendered frame f is by far the closest, not an exact match)
        shown = denormalise(imgs[int(t["valid_indices"][0])])
        errors = [np.abs(shown - rendered).mean() for rendered in scenes[key]]
        others = errors[:f] + errors[f + 1 :]
        assert errors[f] < 5.0 and errors[f] < 0.6 * min(others), (f, errors)


def test_train_clips_contain_the_annotated_frame(prepared):
    rng = random.Random(0)
    ds = A2DDataset(prepared, "train", num_frames=5, rng=rng,
                    transforms=make_train_transforms(SYNTHETIC_RESIZE, rng=rng, photometric="none"))
    assert ds.train
    for k in range(0, len(ds), 7):
        imgs, t = ds[k]
        f = ds.samples[k]["frame_idx"] - 1
        pos = int(t["valid_indices"][0])
        assert imgs.shape[0] == 5 and t["frames_idx"].tolist() == sorted(t["frames_idx"].tolist())
        assert f in t["frames_idx"].tolist() and pos == t["frames_idx"].tolist().index(f)
        assert t["masks"].shape[0] == 1 and t["valid"].tolist() == [1]
        assert t["masks"].shape[-2:] == imgs.shape[-2:]


def test_train_sample_with_an_invalid_annotated_frame_is_redrawn_and_counted(prepared, caplog):
    """As the reference: a sample whose annotated frame is invalid after the transforms is replaced by a random
    other one; the redraw is counted on the dataset and on the item served, and warned about."""
    first = A2DDataset(prepared, "train").samples[0]["image_id"]

    def invalidate_first(clip, target):  # stands in for a crop that misses the object
        imgs, target = Compose([Normalize()])(clip, target)
        if target["image_id"] == first:
            target["valid"] = torch.zeros_like(target["valid"])
        return imgs, target

    ds = A2DDataset(prepared, "train", num_frames=3, rng=random.Random(0), transforms=invalidate_first)
    with caplog.at_level(logging.WARNING, logger="bifit.data.a2d"):
        _, t = ds[0]
    assert t["image_id"] != first and t["valid"].tolist() == [1]
    assert t["redrawn_samples"] == ds.redrawn >= 1
    assert "redrawing A2D-Sentences sample 0 (counted in redrawn_samples): the annotated frame" in caplog.text
    assert first in caplog.text


def test_centred_window():
    assert centred_window(5, 0, 11, 6) == [2, 3, 4, 5, 6, 7]  # f-3 .. f+2
    assert centred_window(5, 0, 11, 5) == [3, 4, 5, 6, 7]  # f-2 .. f+2
    assert centred_window(0, 0, 11, 6) == [0, 0, 0, 0, 1, 2]
    assert centred_window(11, 0, 11, 5) == [9, 10, 11, 11, 11]
    assert centred_window(3, 1, 3, 1) == [3]


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


def _first_test_entry(root: Path) -> list:
    return json.loads((root / TEST_JSON).read_text())[0]


def test_missing_h5_dataset_names_file_and_sample(raw_copy, tmp_path):
    _, video, frame, instance = _first_test_entry(raw_copy)
    path = raw_copy / H5_DIR / video / f"{frame:05d}.h5"
    with h5py.File(path, "a") as f:
        del f["reMask"]
    with pytest.raises(SampleError) as err:
        preprocess(raw_copy, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert str(path) in msg and "reMask" in msg and f"v_{video}_f_{frame}_i_{instance}" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written

    summary = preprocess(raw_copy, tmp_path / "out", skip_bad_samples=True, progress=False)
    skipped = json.loads((tmp_path / "out" / "skipped_samples.json").read_text())
    assert summary["skipped"] == len(skipped) >= 1
    assert all(r["file"] == str(path) and "reMask" in r["reason"] for r in skipped)
    kept = {s["image_id"] for s in json.loads((tmp_path / "out" / "index_test.json").read_text())["samples"]}
    assert f"v_{video}_f_{frame}_i_{instance}" not in kept
    assert len(kept) + len(skipped) == len(json.loads((raw_copy / TEST_JSON).read_text()))


def test_expression_referring_to_missing_instance(raw_copy, tmp_path):
    entries = json.loads((raw_copy / TEST_JSON).read_text())
    _, video, frame, _ = entries[0]
    entries[0][3] = 7
    (raw_copy / TEST_JSON).write_text(json.dumps(entries))
    with pytest.raises(SampleError) as err:
        preprocess(raw_copy, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert str(raw_copy / H5_DIR / video / f"{frame:05d}.h5") in msg
    assert "instance 7" in msg and f"v_{video}_f_{frame}_i_7" in msg


def test_released_gt_that_disagrees_is_an_error(raw_copy, tmp_path):
    coco = json.loads((raw_copy / COCO_GT_JSON).read_text())
    coco["images"][0]["height"] += 1
    (raw_copy / COCO_GT_JSON).write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="does not match"):
        preprocess(raw_copy, tmp_path / "out", progress=False)


def test_truncated_video_is_reported_and_skippable(raw_copy, tmp_path):
    preprocess(raw_copy, tmp_path / "out", progress=False)
    ds = A2DDataset(tmp_path / "out", "test", num_frames=3)
    video_path = raw_copy / ds.samples[0]["video_file"]
    data = video_path.read_bytes()
    video_path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SampleError) as err:
        ds[0]
    assert str(video_path) in str(err.value) and ds.samples[0]["image_id"] in str(err.value)
    assert "video" in err.value.reason

    ds = A2DDataset(tmp_path / "out", "test", num_frames=3, skip_bad_samples=True)
    item = ds[0]
    assert isinstance(item, SkippedSample) and item.record["file"] == str(video_path)
    assert ds.skipped == [item.record]
    batch, skipped = collate_skipping([item, ds[len(ds) - 1]])
    assert skipped == [item.record] and len(batch.targets) == 1


def test_truncated_frames_beyond_decoded_length(raw_copy, tmp_path):
    """A video that decodes but has fewer frames than the annotation expects."""
    preprocess(raw_copy, tmp_path / "out", progress=False)
    ds = A2DDataset(tmp_path / "out", "test", num_frames=3)
    s = ds.samples[-1]
    video_path = raw_copy / s["video_file"]
    frames = np.stack(read_video_frames(video_path, "x"))
    syn.write_mp4(video_path, frames[: s["frame_idx"] - 1], TINY.fps)
    with pytest.raises(SampleError, match="beyond the"):
        ds[len(ds) - 1]


def test_missing_mask_png_names_the_file(prepared, tmp_path):
    out = Path(shutil.copytree(prepared, tmp_path / "out"))
    ds = A2DDataset(out, "test", num_frames=2, raw_root=A2DDataset(prepared, "test").raw_root)
    mask_path = out / ds.samples[0]["mask"]
    mask_path.unlink()
    with pytest.raises(SampleError) as err:
        ds[0]
    assert str(mask_path) in str(err.value) and ds.samples[0]["image_id"] in str(err.value)
    with pytest.raises(SampleError, match="missing mask PNG"):
        read_mask_png(mask_path, "x")


# ----------------------------------------------------------------------------------------------------------------
# decoding: presentation order, repeated timestamps, a packet that does not decode


def flat_frame(value: int, h: int = 16, w: int = 24) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def write_png_mp4(path: Path, frames: list[np.ndarray], pts: list[int] | None = None) -> None:
    """A lossless (PNG-coded) mp4 whose k-th packet is frames[k] with presentation timestamp pts[k] (frame units).

    Intra-only: the decoder outputs frames in packet order, so only sorting by pts puts them in presentation
    order. No edit list, so the muxer keeps the timestamps as given (dts = packet order)."""
    import av

    with av.open(str(path), "w", format="mp4", options={"use_editlist": "0"}) as container:
        stream = container.add_stream("png", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "rgb24"
        for k, frame in enumerate(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                if pts is not None:
                    packet.dts, packet.pts = k, pts[k] + len(frames)  # pts >= dts, as mp4 requires
                container.mux(packet)


def packet_spans(path: Path) -> list[tuple[int, int]]:
    """(file offset, size) of every video packet, in file order."""
    import av

    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]


def test_frames_come_in_presentation_order_not_decoding_order(tmp_path):
    """The reference's torchvision read_video sorts the decoded frames by pts; frame k is the k-th smallest pts."""
    presentation = [3, 6, 1, 5, 7, 0, 4, 2]  # packet k is shown at position presentation[k]
    path = tmp_path / "shuffled.mp4"
    write_png_mp4(path, [flat_frame(10 * p) for p in presentation], presentation)
    frames = read_video_frames(path, "x")
    assert [int(f[0, 0, 0]) for f in frames] == [10 * k for k in range(8)]


def test_a_repeated_timestamp_keeps_one_frame_the_last_decoded(tmp_path):
    """The reference keys frames by pts in a dict: a later frame with the same pts replaces the earlier one."""
    path = tmp_path / "repeated.mp4"
    write_png_mp4(path, [flat_frame(v) for v in (0, 10, 20, 30)], [0, 1, 1, 2])
    frames = read_video_frames(path, "x")
    assert [int(f[0, 0, 0]) for f in frames] == [0, 20, 30]


def corrupt_packet(path: Path, index: int) -> None:
    """Zero the bytes of the index-th video packet (in file order): that frame no longer decodes."""
    pos, size = packet_spans(path)[index]
    data = bytearray(path.read_bytes())
    data[pos:pos + size] = bytes(size)
    path.write_bytes(data)


def test_a_packet_that_does_not_decode_is_warned_about_and_the_other_frames_kept(tmp_path, caplog):
    path = tmp_path / "corrupt.mp4"
    write_png_mp4(path, [flat_frame(10 * k) for k in range(8)])
    corrupt_packet(path, 3)  # frame 4 (1-based)
    with caplog.at_level(logging.WARNING, logger="bifit.data.a2d"):
        video = read_video(path, "v_x_f_2_i_1")
    assert [int(f[0, 0, 0]) for f in video.frames] == [0, 10, 20, 20, 40, 50, 60, 70]  # later frames keep numbers
    assert list(video.undecodable) == [3] and "frame 4 " in video.undecodable[3]
    assert f"{path}: frame 4 (pts " in caplog.text and "could not be decoded" in caplog.text
    assert "v_x_f_2_i_1" in caplog.text


def test_a2d_sample_next_to_an_undecodable_frame_loads_and_one_on_it_is_an_error(raw_copy, tmp_path):
    preprocess(raw_copy, tmp_path / "out", progress=False)
    ds = A2DDataset(tmp_path / "out", "test", num_frames=3)
    k = next(i for i, s in enumerate(ds.samples) if 2 <= s["frame_idx"] < TINY.frames_per_video)
    frame_idx, video_path = ds.samples[k]["frame_idx"], raw_copy / ds.samples[k]["video_file"]
    decoded = read_video_frames(video_path, "x")
    write_png_mp4(video_path, decoded)
    corrupt_packet(video_path, frame_idx)  # the frame after the annotated one (1-based frame_idx + 1)
    imgs, t = ds[k]  # loads: the undecodable neighbour stands in as a copy of the annotated frame
    anchor = int(t["valid_indices"][0])
    assert t["frames_idx"].tolist() == [frame_idx - 2, frame_idx - 1, frame_idx]
    assert torch.equal(imgs[anchor], imgs[anchor + 1]) and not torch.equal(imgs[anchor], imgs[anchor - 1])

    write_png_mp4(video_path, decoded)
    corrupt_packet(video_path, frame_idx - 1)  # the annotated frame itself
    ds = A2DDataset(tmp_path / "out", "test", num_frames=3)
    with pytest.raises(SampleError, match=rf"the annotated frame {frame_idx} \(pts \d+\) could not be decoded"):
        ds[k]


# ----------------------------------------------------------------------------------------------------------------
# a mask whose size differs from its frames: resized to the frames, as the reference's transforms do


def test_mask_and_frames_of_different_sizes_are_resized_together_counted_and_warned(raw_copy, tmp_path, caplog):
    video = _first_test_entry(raw_copy)[1]
    video_path = raw_copy / "Release" / "clips320H" / f"{video}.mp4"
    frames = np.stack(read_video_frames(video_path, "x"))
    syn.write_mp4(video_path, frames.repeat(2, axis=1).repeat(2, axis=2), TINY.fps)  # frames twice the mask size
    with caplog.at_level(logging.WARNING, logger="bifit.prepare.a2d"):
        summary = preprocess(raw_copy, tmp_path / "out", progress=False)
    ds = A2DDataset(tmp_path / "out", "test", num_frames=3)
    affected = [k for k, s in enumerate(ds.samples) if s["video"] == video]
    assert affected and summary["test_size_mismatches"] == len(affected) and summary["train_size_mismatches"] == 0
    assert size_mismatches(ds.samples) == [ds.samples[k]["image_id"] for k in affected]
    sizes = f"mask is {TINY.width}x{TINY.height} (WxH) but the frames are {2 * TINY.width}x{2 * TINY.height}"
    assert sizes in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bifit.data.a2d"):
        imgs, t = ds[affected[0]]
    s = ds.samples[affected[0]]
    assert s["image_id"] in caplog.text and str(tmp_path / "out" / s["mask"]) in caplog.text
    assert imgs.shape[-2:] == t["masks"].shape[-2:] == (2 * TINY.height, 2 * TINY.width)
    assert t["orig_size"].tolist() == [TINY.height, TINY.width]  # the GT's size: predictions go back to it
    mask = read_mask_png(tmp_path / "out" / s["mask"], "x")
    assert np.array_equal(t["masks"][0].numpy(), mask.repeat(2, axis=0).repeat(2, axis=1))  # nearest neighbour
    assert t["valid"].tolist() == [1]
