"""RefCOCO pseudo-videos: shapes and target keys like the video loaders, the same object in every frame, boxes
from the transformed masks, batching and the loss, evaluation samples, and the joint dataset with YTVOS."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from bifit.config import Config
from bifit.data.collate import collate_fn
from bifit.data.refcoco import (
    JointDataset,
    RefCOCODataset,
    SequenceAugmentConfig,
    build_joint,
    pseudo_video,
    random_affine,
    sampling_share,
    segmentation_mask,
)
from bifit.data.transforms import (
    MEAN,
    STD,
    SYNTHETIC_RESIZE,
    box_cxcywh_to_xyxy,
    make_eval_transforms,
    make_train_transforms,
)
from bifit.data.ytvos import SampleError, YTVOSDataset, bounding_box
from bifit.models.criterion import build_criterion
from bifit.prepare.refcoco import convert_refcoco
from bifit.synthetic.config import COLOURS, SyntheticConfig
from bifit.synthetic.refcoco import SyntheticRefCOCOConfig, generate_refcoco, load_stills
from bifit.synthetic.ytvos import generate_benchmark

CFG = SyntheticRefCOCOConfig(seed=6, num_train_images=3, num_val_images=2, num_test_images=1)
YTVOS_KEYS = {"frames_idx", "labels", "boxes", "masks", "valid", "caption", "orig_size", "size"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(data root with train2014 and the release, converted annotation root)."""
    base = tmp_path_factory.mktemp("refcoco_data")
    generate_refcoco(CFG, base / "coco", progress=False)
    for dataset in CFG.datasets:
        convert_refcoco(base / "coco", base / "converted", dataset)
    return base / "coco", base / "converted"


def dataset(coco, name="refcoco", split="train", **kw) -> RefCOCODataset:
    root, ann_root = coco
    return RefCOCODataset(root, name, split, ann_root=ann_root, **kw)


def denormalise(imgs: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] normalised -> [T, H, W, 3] float 0..255."""
    x = imgs * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (x * 255).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------------------------


def test_pseudo_video_has_the_video_loaders_structure(coco):
    ds = dataset(coco, num_frames=5, rng=random.Random(0))
    imgs, target = ds[0]
    assert imgs.shape == (5, 3, CFG.height, CFG.width) and imgs.dtype == torch.float32
    assert YTVOS_KEYS <= set(target)
    assert target["boxes"].shape == (5, 4) and target["masks"].shape == (5, CFG.height, CFG.width)
    assert target["masks"].dtype == torch.bool and target["valid"].shape == (5,) and target["labels"].tolist() == [0] * 5
    assert sorted(target["frames_idx"].tolist()) == list(range(5))  # copy 0 is the original
    assert target["orig_size"].tolist() == target["size"].tolist() == [CFG.height, CFG.width]
    assert target["caption"] == " ".join(target["caption"].lower().split())
    assert target["image_id"] == "refcoco/train/0" and target["dataset_name"] == "refcoco"
    assert target["redrawn_samples"] == 0


def test_every_frame_shows_the_same_object_and_its_box_is_the_masks_tight_box(coco):
    root, _ = coco
    stills = load_stills(root)
    ds = dataset(coco, num_frames=6, rng=random.Random(3), augment=SequenceAugmentConfig(rotation=25, translate=0.1))
    checked, count = 0, min(len(ds), 8)
    for idx in range(count):
        entry = ds.entries[idx]
        record = stills[str(entry.original_id)]
        colour = next(o["colour"] for o in record["objects"] if o["ann_id"] == ds_ann_id(ds, idx))
        imgs, target = ds[idx]
        rgb = denormalise(imgs)
        original = np.asarray(Image.open(root / "train2014" / entry.file_name), dtype=np.float32)
        gt = segmentation_mask(entry.segmentation, entry.height, entry.width)
        h, w = target["size"].tolist()
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
        for k in range(6):
            mask = target["masks"][k].numpy()
            if target["frames_idx"][k] == 0:  # the original image and mask, unchanged
                assert np.array_equal(mask, gt) and np.abs(rgb[k] - original).max() < 1e-3
            if not target["valid"][k]:
                assert not mask.any() and boxes[k].abs().max() < 1e-4
                continue
            assert torch.allclose(boxes[k], torch.tensor(bounding_box(mask), dtype=torch.float32), atol=1e-3)
            inner = mask & ~binary_edge(mask)
            if inner.sum() >= 10:  # the warped mask sits on the object's pixels
                assert np.abs(rgb[k][inner].mean(0) - np.asarray(COLOURS[colour])).max() < 45
                checked += 1
            # a rotation and a shift keep the area (up to border cut-off and resampling)
            assert mask.sum() <= gt.sum() * 1.15 + 10
    assert checked > 5 * count


def ds_ann_id(ds: RefCOCODataset, idx: int) -> int:
    import json

    data = json.loads(ds.ann_path.read_text())
    return data["annotations"][idx]["original_id"]


def binary_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (where bilinear image resampling blends colours)."""
    pad = np.pad(mask, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def test_random_affine_moves_image_and_mask_with_one_matrix():
    img = np.zeros((64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), dtype=bool)
    mask[20:40, 30:50] = True
    img[mask] = 255
    rng = random.Random(1)
    for _ in range(5):
        warped, warped_mask = random_affine(Image.fromarray(img), mask, SequenceAugmentConfig(rotation=30), rng)
        bright = np.asarray(warped)[..., 0] > 127
        inter, union = (bright & warped_mask).sum(), (bright | warped_mask).sum()
        assert inter / union > 0.9 and not np.array_equal(warped_mask, mask)
    frames, masks, order = pseudo_video(Image.fromarray(img), mask, 4, SequenceAugmentConfig(shuffle=False), rng)
    assert order == [0, 1, 2, 3] and np.array_equal(masks[0], mask) and len(frames) == 4
    one = pseudo_video(Image.fromarray(img), mask, 1, SequenceAugmentConfig(), rng)
    assert one[2] == [0] and np.array_equal(one[1][0], mask)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("rotation", -1, r"degrees in \[0, 180\]"), ("translate", 1.0, r"a fraction in \[0, 1\)"),
    ("scale", (1.2, 0.8), r"\(min, max\) with 0 < min <= max"), ("shear", 90, r"degrees in \[0, 90\)")])
def test_augment_config_validation(field, value, expected):
    with pytest.raises(ValueError, match=rf"SequenceAugmentConfig\.{field}: expected {expected}"):
        SequenceAugmentConfig(**{field: value})


def test_a_batch_of_pseudo_videos_collates_and_the_criterion_runs(coco):
    torch.manual_seed(0)
    ds = dataset(coco, "refcocog", num_frames=3, rng=random.Random(2),
                 transforms=make_train_transforms(SYNTHETIC_RESIZE, rng=random.Random(2),
                                                  photometric="colour_preserving"))
    batch = collate_fn([ds[0], ds[1], ds[2]])
    b, t, _, hp, wp = batch.images.shape
    assert (b, t) == (3, 3) and hp % 32 == 0 and wp % 32 == 0 and len(batch.captions) == 3
    losses = criterion_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_dice"] > 0


def criterion_losses(batch):
    b, t, _, hp, wp = batch.images.shape
    q = 3
    outputs = {"pred_logits": torch.randn(b, t, q, 1), "pred_boxes": torch.rand(b, t, q, 4) * 0.5 + 0.25,
               "pred_masks": torch.randn(b, t, q, hp // 4, wp // 4)}
    cfg = Config()
    cfg.model.aux_loss = False
    return build_criterion(cfg)(outputs, batch.targets)


def test_evaluation_samples_are_single_frames_with_the_ground_truth(coco):
    ds = dataset(coco, split="val", num_frames=6, transforms=make_eval_transforms(48, 80))
    assert not ds.train and ds.num_frames == 1
    imgs, target = ds[1]
    assert imgs.shape == (1, 3, 48, 64) and target["orig_size"].tolist() == [CFG.height, CFG.width]
    gt = ds.gt_mask(target["image_id"])
    assert target["image_id"] == "refcoco/val/1" and gt.shape == (CFG.height, CFG.width) and gt.any()
    with pytest.raises(KeyError, match="no sample 'refcoco/val/999'"):
        ds.gt_mask("refcoco/val/999")


def test_segmentations_decode_from_polygons_and_both_rles():
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]]  # x, y pairs: a 20 x 10 rectangle
    poly = segmentation_mask(square, 40, 50)
    assert poly.shape == (40, 50) and abs(int(poly.sum()) - 200) <= 30
    rle = mask_utils.encode(np.asfortranarray(poly.astype(np.uint8)))
    assert np.array_equal(segmentation_mask({"size": rle["size"], "counts": rle["counts"].decode()}, 40, 50), poly)
    from bifit.synthetic.refcoco import uncompressed_rle

    assert np.array_equal(segmentation_mask(uncompressed_rle(poly), 40, 50), poly)
    first_pixel = np.zeros((4, 5), dtype=bool)
    first_pixel[0, 0] = True
    assert np.array_equal(segmentation_mask(uncompressed_rle(first_pixel), 4, 5), first_pixel)
    with pytest.raises(ValueError, match="not a COCO segmentation"):
        segmentation_mask(7, 4, 5)


def test_a_bad_image_names_the_file_and_can_be_skipped(coco, tmp_path):
    root, ann_root = coco
    images = tmp_path / "train2014"
    images.mkdir()
    ds = RefCOCODataset(root, "refcoco", "val", ann_root=ann_root, image_root=images)
    first = ds.entries[0]
    Image.new("RGB", (first.width + 1, first.height)).save(images / first.file_name)
    with pytest.raises(SampleError, match=rf"{first.file_name}: image is {first.width + 1}x{first.height} \(WxH\), "
                                          rf"its entry in instances_refcoco_val\.json says"):
        ds[0]
    skipping = RefCOCODataset(root, "refcoco", "val", ann_root=ann_root, image_root=images, skip_bad_samples=True)
    assert skipping[0].record["index"] == 0 and len(skipping.skipped) == 1
    missing = next(i for i, e in enumerate(ds.entries) if e.file_name != first.file_name)
    with pytest.raises(SampleError, match="missing image file"):
        ds[missing]


def test_unknown_dataset_or_split_is_refused(coco):
    with pytest.raises(ValueError, match=r"refcocog has splits \['train', 'val', 'test'\], got 'testA'"):
        dataset(coco, "refcocog", "testA")
    with pytest.raises(ValueError, match="expected one of"):
        dataset(coco, "refclef")


# ----------------------------------------------------------------------------------------------------------------
# joint training


@pytest.fixture(scope="module")
def ytvos_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("joint") / "ref-youtube-vos"
    generate_benchmark(SyntheticConfig(seed=3, num_train_videos=2, num_valid_videos=1, num_test_videos=0,
                                       frames_per_video=6, height=96, width=128), root, progress=False)
    return root


def test_joint_dataset_concatenates_and_batches_any_mix(coco, ytvos_root):
    images = [dataset(coco, name, num_frames=3, rng=random.Random(4)) for name in CFG.datasets]
    ytvos = YTVOSDataset(ytvos_root, "train", num_frames=3, categories=("circle", "diamond", "square", "triangle"),
                         rng=random.Random(4))
    joint = build_joint(ytvos, images)
    assert len(joint) == sum(len(d) for d in images) + len(ytvos)
    assert joint.part_of(0) is images[0] and joint.part_of(len(joint) - 1) is ytvos
    comp = joint.composition()
    assert list(comp) == ["refcoco train", "refcoco+ train", "refcocog train", "ref-youtube-vos train"]
    assert sum(sampling_share(joint).values()) == pytest.approx(1.0)
    batch = collate_fn([joint[0], joint[len(joint) - 1]])  # a pseudo-video and a YTVOS clip together
    assert batch.images.shape[:2] == (2, 3)
    assert batch.targets[0]["dataset_name"] == "refcoco" and "video" in batch.targets[1]
    losses = criterion_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    # a shuffled pass over the joint set draws from every part (the reference's plain concatenation)
    seen = {joint.part_of(i).__class__.__name__ for i in torch.randperm(len(joint), generator=torch.Generator()
                                                                       .manual_seed(0))[:40].tolist()}
    assert seen == {"RefCOCODataset", "YTVOSDataset"}


def test_joint_dataset_refuses_parts_that_cannot_share_a_batch(coco, ytvos_root):
    cats = ("circle", "diamond", "square", "triangle")
    with pytest.raises(ValueError, match="every part must make clips of one length"):
        JointDataset([dataset(coco, num_frames=2), YTVOSDataset(ytvos_root, "train", num_frames=3, categories=cats)])
    with pytest.raises(ValueError, match="expressions_per_clip > 1"):
        JointDataset([dataset(coco, num_frames=3),
                      YTVOSDataset(ytvos_root, "train", num_frames=3, categories=cats, expressions_per_clip=2)])
    with pytest.raises(ValueError, match="is an evaluation dataset"):
        JointDataset([dataset(coco, split="val"), dataset(coco, num_frames=1)])
