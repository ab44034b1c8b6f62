"""The synthetic refer release: determinism, the official files, and expressions that pick one object in their
still."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bifit.data.refcoco import segmentation_mask
from bifit.prepare.refcoco import SPLITS, load_refs
from bifit.prepare.sources import REFCOCO_SPLIT_BY
from bifit.synthetic.config import COLOURS, SyntheticConfig
from bifit.synthetic.refcoco import (
    CATEGORY_IDS,
    MANIFEST_NAME,
    SyntheticRefCOCOConfig,
    generate_refcoco,
    load_stills,
    still_from_record,
)
from bifit.synthetic.scene import Description, attribute_matches, is_unambiguous

CFG = SyntheticRefCOCOConfig(seed=7, num_train_images=3, num_val_images=2, num_test_images=1)
MIN_VISIBLE = SyntheticConfig.min_visible_pixels
LOCATION_WORDS = ("left", "right", "top", "bottom", "lowest", "above", "below", "under")
MOTION_WORDS = ("moving", "moves", "going")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_refcoco") / "coco"
    generate_refcoco(CFG, root, progress=False)
    return root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def id_map(instances: dict, image: dict) -> tuple[np.ndarray, dict[int, int]]:
    """The still's visible-object id map rebuilt from the written annotations, and annotation id -> map id
    (1, 2, ... in the image's annotation order)."""
    out = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    local = {}
    for ann in instances["annotations"]:
        if ann["image_id"] == image["id"]:
            mask = segmentation_mask(ann["segmentation"], image["height"], image["width"])
            assert not out[mask].any(), "visible masks of one image overlap"
            local[ann["id"]] = len(local) + 1
            out[mask] = local[ann["id"]]
    return out, local


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("height", 100, "multiple of 32"),
    ("num_val_images", 0, r"\[1, 100000\]"),
    ("datasets", ("refcoco", "refclef"), "distinct names among"),
    ("datasets", ("refcoco", "refcoco"), "distinct names among"),
])
def test_config_validation_names_field_and_range(field, value, expected):
    with pytest.raises(ValueError, match=rf"SyntheticRefCOCOConfig\.{field}: expected .*{expected}"):
        SyntheticRefCOCOConfig(**{field: value})


def test_deterministic_in_the_seed_and_idempotent(release, tmp_path):
    again = generate_refcoco(CFG, tmp_path / "again", progress=False)
    assert again["generated"] and digests(tmp_path / "again") == digests(release)
    assert generate_refcoco(CFG, release, progress=False)["generated"] is False  # same config: left alone
    other = SyntheticRefCOCOConfig(seed=8, num_train_images=3, num_val_images=2, num_test_images=1)
    generate_refcoco(other, tmp_path / "other", progress=False)
    assert digests(tmp_path / "other")["train2014/COCO_train2014_000000000001.jpg"] != \
        digests(release)["train2014/COCO_train2014_000000000001.jpg"]
    manifest = json.loads((release / MANIFEST_NAME).read_text())
    assert manifest["generator"] == "bifit.synthetic.refcoco" and manifest["summary"]["images"] == CFG.num_images


def test_release_files_and_splits(release):
    for dataset in CFG.datasets:
        split_by = REFCOCO_SPLIT_BY[dataset]
        refs = load_refs(release / dataset / f"refs({split_by}).p")
        assert {r["split"] for r in refs} == set(SPLITS[split_by])
        instances = json.loads((release / dataset / "instances.json").read_text())
        ann_ids = {a["id"]: a for a in instances["annotations"]}
        for ref in refs:
            ann = ann_ids[ref["ann_id"]]
            assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            assert all(s["raw"] == s["sent"] and s["tokens"] == s["sent"].split() for s in ref["sentences"])
        for image in instances["images"]:
            with Image.open(release / "train2014" / image["file_name"]) as img:
                assert img.size == (image["width"], image["height"]) and img.mode == "RGB"
        for ann in instances["annotations"]:  # area and bbox (x, y, w, h) agree with the mask
            mask = segmentation_mask(ann["segmentation"], CFG.height, CFG.width)
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() > 0 and ann["iscrowd"] == 0
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # the images are shared; each UNC split's images form refcocog's UMD split of the same name (tests merged)
    unc = {r["image_id"]: r["split"] for r in load_refs(release / "refcoco" / "refs(unc).p")}
    umd = {r["image_id"]: r["split"] for r in load_refs(release / "refcocog" / "refs(umd).p")}
    assert all(umd[i] == {"testA": "test", "testB": "test"}.get(s, s) for i, s in unc.items() if i in umd)


def test_every_expression_picks_one_object_in_its_still(release):
    stills = load_stills(release)
    checked = 0
    for dataset in CFG.datasets:
        split_by = REFCOCO_SPLIT_BY[dataset]
        instances = json.loads((release / dataset / "instances.json").read_text())
        images = {i["id"]: i for i in instances["images"]}
        refs = {r["ref_id"]: r for r in load_refs(release / dataset / f"refs({split_by}).p")}
        for image_id, record in stills.items():
            image = images[int(image_id)]
            ids, local = id_map(instances, image)
            # rebuild the still from the written masks (every object present has an annotation)
            assert sorted(local) == sorted(o["ann_id"] for o in record["objects"])
            objects = [{**o, "obj_id": local[o["ann_id"]]} for o in record["objects"]]
            scene = still_from_record({**record, "objects": objects}, ids, MIN_VISIBLE)
            assert record["refs"][dataset], (dataset, image_id)  # every image has a referred object
            for ref in record["refs"][dataset]:
                written = refs[ref["ref_id"]]
                assert written["ann_id"] == ref["ann_id"] and written["image_id"] == int(image_id)
                for sentence, text in zip(ref["sentences"], written["sentences"]):
                    assert sentence["sent"] == text["sent"]
                    desc = Description.from_dict(sentence["description"])
                    target = local[ref["ann_id"]]
                    assert is_unambiguous(scene, desc, target), (dataset, image_id, text["sent"])
                    assert desc.motion is None and not any(w in text["sent"] for w in MOTION_WORDS)
                    if dataset == "refcoco+":
                        assert desc.extreme is None and desc.relation is None
                        assert not any(w in text["sent"].split() for w in LOCATION_WORDS), text["sent"]
                    # the attribute words name the referred object's shape and colour
                    obj = next(o for o in objects if o["obj_id"] == target)
                    assert target in attribute_matches(scene, Description(**desc.attributes()))
                    assert desc.shape in (None, obj["shape"]) and desc.colour in (None, obj["colour"])
                    checked += 1
    assert checked > 20


def test_the_referred_pixels_show_the_objects_colour(release):
    stills = load_stills(release)
    instances = json.loads((release / "refcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    for image_id, record in stills.items():
        with Image.open(release / "train2014" / f"COCO_train2014_{int(image_id):012d}.jpg") as img:
            rgb = np.asarray(img, dtype=np.float32)
        for o in record["objects"]:
            ann = anns[o["ann_id"]]
            assert ann["category_id"] == CATEGORY_IDS[o["shape"]]
            mask = segmentation_mask(ann["segmentation"], CFG.height, CFG.width)
            if mask.sum() < MIN_VISIBLE:
                continue
            mean = rgb[mask].mean(0)
            assert np.abs(mean - np.asarray(COLOURS[o["colour"]])).max() < 45, (image_id, o["colour"], mean)
