"""JHMDB-Sentences: synthetic writer (official formats) -> preprocess -> loader, and bad inputs."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from bifit.data.a2d import SkippedSample, centred_window
from bifit.data.jhmdb import JHMDBDataset
from bifit.data.transforms import MEAN, STD
from bifit.data.ytvos import SampleError, bounding_box
from bifit.prepare.jhmdb import COCO_GT_JSON, METADATA_JSON, preprocess, resolve
from bifit.synthetic import jhmdb as syn

TINY = syn.SyntheticJHMDBConfig(seed=4, num_videos=2, frames_per_video=8)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jhmdb") / "jh"  # any folder name: metadata paths resolve against the root
    syn.generate_jhmdb(TINY, root, progress=False)
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jhmdb_out") / "prepared"
    preprocess(raw, out, progress=False)
    return out


@pytest.fixture
def raw_copy(raw, tmp_path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


def metadata(root: Path) -> list:
    return json.loads((root / METADATA_JSON).read_text())


# ----------------------------------------------------------------------------------------------------------------


def test_written_files_follow_the_official_layout(raw):
    entries = metadata(raw)
    assert len(entries) == 3 * TINY.num_videos
    for _, frame_path, mask_path, total, _ in entries:
        assert frame_path.startswith("./jhmdb_sentences/Rename_Images/") and frame_path.endswith(".png")
        assert mask_path.startswith("./jhmdb_sentences/puppet_mask/") and mask_path.endswith("/puppet_mask.mat")
        assert resolve(raw, frame_path).is_file() and resolve(raw, mask_path).is_file()
        part_mask = scipy.io.loadmat(resolve(raw, mask_path))["part_mask"]
        n_png = len(list(resolve(raw, frame_path).parent.glob("*.png")))
        assert part_mask.shape[:2] == (TINY.height, TINY.width)
        assert total == min(n_png, part_mask.shape[2])
    totals = {e[0]: e[3] for e in entries}
    assert sorted(totals.values()) == [TINY.frames_per_video - 1, TINY.frames_per_video]  # one shorter puppet mask
    rows = (raw / "jhmdb_annotation.txt").read_text().splitlines()
    assert rows[0] == "video_id,query" and len(rows) == TINY.num_videos + 1


def test_preprocess_masks_and_coco_gt(raw, prepared):
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["test_samples"] == 3 * TINY.num_videos and summary["skipped"] == 0
    assert summary["released_coco_gt_checked"] == 3 * TINY.num_videos
    coco = json.loads((prepared / COCO_GT_JSON).read_text())
    assert all("bbox" not in a for a in coco["annotations"])  # the JHMDB GT has no bbox
    assert [i["id"] for i in coco["images"]] == [f"v_{e[0]}_f_{int(Path(e[1]).stem)}" for e in metadata(raw)]


def test_samples_round_trip_frames_masks_and_valid_indices(raw, prepared):
    ds = JHMDBDataset(prepared, num_frames=6)
    for k, (video, frame_path, mask_path, total, query) in enumerate(metadata(raw)):
        c = int(Path(frame_path).stem)
        imgs, t = ds[k]
        assert t["image_id"] == f"v_{video}_f_{c}" and t["caption"] == " ".join(query.lower().split())
        assert "labels" not in t
        assert t["frames_idx"].tolist() == centred_window(c, 1, total, 6)
        assert min(t["frames_idx"].tolist()) >= 1 and max(t["frames_idx"].tolist()) <= total  # 1-based
        pos = int(t["valid_indices"][0])
        assert int(t["frames_idx"][pos]) == c
        # the frame at valid_indices is the chosen PNG (lossless)
        png = np.asarray(Image.open(resolve(raw, frame_path)).convert("RGB"), dtype=np.float32)
        shown = (imgs[pos] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255
        assert np.abs(shown.permute(1, 2, 0).numpy() - png).max() < 1e-3
        # the mask is part_mask[..., c - 1]
        part_mask = scipy.io.loadmat(resolve(raw, mask_path))["part_mask"][..., c - 1] > 0
        assert np.array_equal(t["masks"][0].numpy(), part_mask)
        assert t["valid"].tolist() == [int(part_mask.any())]
        x1, y1, x2, y2 = bounding_box(part_mask)
        h, w = part_mask.shape
        assert torch.allclose(t["boxes"][0], torch.tensor([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w,
                                                           (y2 - y1) / h]), atol=1e-6)
        assert t["orig_size"].tolist() == t["size"].tolist() == [h, w]


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


def test_missing_mat_key_names_file_and_sample(raw_copy, tmp_path):
    video, frame_path, mask_path, _, _ = metadata(raw_copy)[0]
    mat = resolve(raw_copy, mask_path)
    scipy.io.savemat(mat, {"pose_mask": np.zeros((2, 2, 2), np.uint8)})
    with pytest.raises(SampleError) as err:
        preprocess(raw_copy, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert str(mat) in msg and "'part_mask'" in msg and f"v_{video}_f_{int(Path(frame_path).stem)}" in msg

    summary = preprocess(raw_copy, tmp_path / "out", skip_bad_samples=True, progress=False)
    skipped = json.loads((tmp_path / "out" / "skipped_samples.json").read_text())
    assert summary["skipped"] == len(skipped) == 3 and {r["file"] for r in skipped} == {str(mat)}
    assert summary["test_samples"] == 3 * TINY.num_videos - 3


def test_chosen_frame_without_a_mask(raw_copy, tmp_path):
    entries = metadata(raw_copy)
    video, frame_path, mask_path, total, _ = entries[0]
    mat = resolve(raw_copy, mask_path)
    c = int(Path(frame_path).stem)
    part_mask = scipy.io.loadmat(mat)["part_mask"]
    scipy.io.savemat(mat, {"part_mask": part_mask[..., : c - 1]})
    with pytest.raises(SampleError) as err:
        preprocess(raw_copy, tmp_path / "out", progress=False)
    assert str(mat) in str(err.value) and f"no mask for frame {c}" in str(err.value)


def test_missing_metadata_explains_what_to_place(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="do not regenerate"):
        preprocess(tmp_path / "raw", tmp_path / "out", progress=False)


def test_truncated_png_frame_is_reported_and_skippable(raw_copy, tmp_path):
    preprocess(raw_copy, tmp_path / "out", progress=False)
    _, frame_path, _, _, _ = metadata(raw_copy)[0]
    png = resolve(raw_copy, frame_path)
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    ds = JHMDBDataset(tmp_path / "out", num_frames=4)
    with pytest.raises(SampleError) as err:
        ds[0]
    assert str(png) in str(err.value) and ds.samples[0]["image_id"] in str(err.value)
    assert "corrupt" in err.value.reason

    ds = JHMDBDataset(tmp_path / "out", num_frames=4, skip_bad_samples=True)
    item = ds[0]
    assert isinstance(item, SkippedSample) and item.record["file"] == str(png) and item.record["index"] == 0
    imgs, t = ds[len(ds) - 1]  # the other samples still load
    assert imgs.shape[0] == 4


def test_mask_and_frames_of_different_sizes_are_resized_together_counted_and_warned(raw_copy, tmp_path, caplog):
    """The reference resizes a sample's frames and mask together to a size computed from the frames."""
    video, frame_path, mask_path, _, _ = metadata(raw_copy)[0]
    for png in resolve(raw_copy, frame_path).parent.glob("*.png"):
        with Image.open(png) as img:
            big = img.resize((2 * img.width, 2 * img.height), Image.NEAREST)
        big.save(png)
    with caplog.at_level(logging.WARNING, logger="bifit.prepare.a2d"):
        summary = preprocess(raw_copy, tmp_path / "out", progress=False)
    assert summary["test_size_mismatches"] == 3 and summary["skipped"] == 0  # the video's 3 samples
    sizes = f"mask is {TINY.width}x{TINY.height} (WxH) but the frames are {2 * TINY.width}x{2 * TINY.height}"
    assert f"{resolve(raw_copy, mask_path)}: {sizes}" in caplog.text
    ds = JHMDBDataset(tmp_path / "out", num_frames=4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bifit.data.a2d"):
        imgs, t = ds[0]
    assert ds.samples[0]["image_id"] in caplog.text and "resized to the frames" in caplog.text
    assert imgs.shape[-2:] == t["masks"].shape[-2:] == (2 * TINY.height, 2 * TINY.width)
    assert t["orig_size"].tolist() == [TINY.height, TINY.width]  # the GT's size: predictions go back to it
    assert t["size"].tolist() == [2 * TINY.height, 2 * TINY.width]
    part_mask = scipy.io.loadmat(resolve(raw_copy, mask_path))["part_mask"][..., int(Path(frame_path).stem) - 1] > 0
    assert np.array_equal(t["masks"][0].numpy(), part_mask.repeat(2, axis=0).repeat(2, axis=1))
    assert ds.resized_masks == {ds.samples[0]["image_id"]}
