"""RefCOCO/+/g preparation: the restricted unpickler of the refer release, the conversion to the COCO-format split
files (on the synthetic release), and the sources / manifests."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bifit.prepare.manifest import verify
from bifit.prepare.refcoco import (
    SPLITS,
    ConversionError,
    UnsafePickleError,
    convert_refcoco,
    dump_refs,
    load_refs,
    restricted_loads,
    split_file,
)
from bifit.prepare.sources import REFCOCO_SPLIT_BY, instructions, real_manifest, synthetic_manifest
from bifit.synthetic.refcoco import SyntheticRefCOCOConfig, generate_refcoco

CFG = SyntheticRefCOCOConfig(seed=5, num_train_images=3, num_val_images=2, num_test_images=1)
IMAGE_KEYS = {"file_name", "height", "width", "original_id", "id", "caption", "dataset_name"}
ANNOTATION_KEYS = {"segmentation", "area", "iscrowd", "bbox", "category_id", "id", "original_id", "image_id"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refer") / "coco"
    generate_refcoco(CFG, root, progress=False)
    return root


@pytest.fixture(scope="module")
def converted(release) -> Path:
    out = release.parent / "converted"
    for dataset in CFG.datasets:
        convert_refcoco(release, out, dataset)
    return out


class RunsCode:
    """Unpickling this writes a file: a stand-in for a pickle that runs arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


# the bytes a pickle that runs os.system("true") holds (protocol 2): GLOBAL os.system, the argument, REDUCE
OS_SYSTEM_PICKLE = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."


# ----------------------------------------------------------------------------------------------------------------
# the restricted unpickler


def test_plain_refs_load_python3_and_python2_pickles(tmp_path):
    refs = [{"ref_id": 0, "ann_id": 7, "split": "val", "sentences": [{"sent": "the man", "sent_id": 3}],
             "score": 0.5, "flags": (True, None), "big": 2**70}]
    dump_refs(refs, tmp_path / "refs(unc).p")
    assert load_refs(tmp_path / "refs(unc).p") == refs
    # Python 2 cPickle output: str values as SHORT_BINSTRING bytes (UTF-8, or Latin-1), a unicode value, a long
    py2 = (b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x06caf\xc3\xa9 q\x03U\x03rawq\x04U\x03\xe9t\xe9q\x05"
           b"U\x01uq\x06X\x03\x00\x00\x00\xc3\xa9tq\x07U\x01nq\x08\x8a\x01\x05ua.")
    assert restricted_loads(py2, "py2.p") == [{"sent": "café ", "raw": "été", "u": "ét", "n": 5}]


def test_a_pickle_that_imports_os_system_is_refused_naming_file_and_global(tmp_path):
    path = tmp_path / "refcoco" / "refs(unc).p"
    path.parent.mkdir()
    path.write_bytes(OS_SYSTEM_PICKLE)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused to unpickle: the pickle asks to import "
                                                r"os\.system; only plain containers, strings and numbers"):
        load_refs(path)
    # the converter reads the refs the same way and writes nothing
    (tmp_path / "refcoco" / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(UnsafePickleError, match="os.system"):
        convert_refcoco(tmp_path, tmp_path / "out", "refcoco")
    assert not (tmp_path / "out" / "refcoco").exists()


def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "code_ran.txt"
    payload = pickle.dumps([{"ref_id": 0, "sentences": [RunsCode(marker)]}], protocol=2)
    (tmp_path / "refs(unc).p").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refused to unpickle: the pickle asks to import"):
        load_refs(tmp_path / "refs(unc).p")
    assert not marker.exists()
    # the control: the ordinary unpickler runs the payload's code
    pickle.loads(payload)
    assert marker.read_text() == "code ran"


def test_a_copyreg_extension_code_is_refused_too():
    import copyreg

    copyreg.add_extension("os", "system", 0x7FFF_FF00)
    try:
        with pytest.raises(UnsafePickleError, match=r"os\.system"):
            restricted_loads(b"\x80\x02\x84\x00\xff\xff\x7f)R.", "ext.p")
    finally:
        copyreg.remove_extension("os", "system", 0x7FFF_FF00)


def test_a_truncated_pickle_is_a_conversion_error():
    data = pickle.dumps([{"a": 1}], protocol=2)
    with pytest.raises(ConversionError, match=r"short\.p: not a readable pickle"):
        restricted_loads(data[:-3], "short.p")


# ----------------------------------------------------------------------------------------------------------------
# conversion


def test_converter_writes_every_split_with_the_official_fields(release, converted):
    for dataset in CFG.datasets:
        split_by = REFCOCO_SPLIT_BY[dataset]
        instances = json.loads((release / dataset / "instances.json").read_text())
        images = {i["id"]: i for i in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        refs = load_refs(release / dataset / f"refs({split_by}).p")
        summary = json.loads((converted / dataset / "conversion.json").read_text())
        assert sorted(p.name for p in (converted / dataset).iterdir()) == sorted(
            [split_file(dataset, s) for s in SPLITS[split_by]] + ["conversion.json"])
        for split in SPLITS[split_by]:
            data = json.loads((converted / dataset / split_file(dataset, split)).read_text())
            split_refs = [r for r in refs if r["split"] == split]
            sentences = [(r, s) for r in split_refs for s in r["sentences"]]
            assert sentences, (dataset, split)
            assert len(data["images"]) == len(data["annotations"]) == len(sentences)
            assert summary["splits"][split] == {"refs": len(split_refs), "sentences": len(sentences),
                                                "coco_images": len({r["image_id"] for r in split_refs})}
            assert data["categories"] == instances["categories"]
            for k, (img, ann, (ref, sentence)) in enumerate(zip(data["images"], data["annotations"], sentences)):
                assert set(img) == IMAGE_KEYS and set(ann) == ANNOTATION_KEYS
                assert img["id"] == ann["id"] == ann["image_id"] == k
                coco_image, coco_ann = images[ref["image_id"]], anns[ref["ann_id"]]
                assert img["original_id"] == coco_image["id"] and ann["original_id"] == coco_ann["id"]
                # the COCO image's own file name, not the ref's suffixed one
                assert img["file_name"] == coco_image["file_name"] != ref["file_name"]
                assert (release / "train2014" / img["file_name"]).is_file()
                assert (img["height"], img["width"]) == (coco_image["height"], coco_image["width"])
                assert img["caption"] == sentence["sent"] and img["dataset_name"] == dataset
                for key in ("segmentation", "area", "iscrowd", "bbox", "category_id"):
                    assert ann[key] == coco_ann[key]
    # refcocog uses the UMD splits, whose test holds both UNC test splits' images
    g = json.loads((converted / "refcocog" / "conversion.json").read_text())["splits"]
    c = json.loads((converted / "refcoco" / "conversion.json").read_text())["splits"]
    assert set(g) == {"train", "val", "test"} and set(c) == {"train", "val", "testA", "testB"}
    assert g["test"]["coco_images"] == c["testA"]["coco_images"] + c["testB"]["coco_images"]


def _copy_release(release: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(release / "refcoco", root / "refcoco")
    return root


@pytest.mark.parametrize(("edit", "message"), [
    (lambda refs, inst: refs[0].update(ann_id=10**9), r"ref 0: annotation 1000000000 is not in instances\.json"),
    (lambda refs, inst: refs[0].update(split="trainval"), r"ref 0: split 'trainval' is not one of \['train', "),
    (lambda refs, inst: refs[0].pop("sentences"), r"ref 0: missing key\(s\) \['sentences'\]"),
    (lambda refs, inst: inst["images"][0].update(file_name="../../etc/passwd"),
     r"has file_name '\.\./\.\./etc/passwd', which cannot be a file name \(it contains a path separator\)"),
])
def test_an_inconsistent_release_names_the_file_and_the_ref(release, tmp_path, edit, message):
    root = _copy_release(release, tmp_path)
    refs = load_refs(root / "refcoco" / "refs(unc).p")
    instances = json.loads((root / "refcoco" / "instances.json").read_text())
    first_image = refs[0]["image_id"]
    instances["images"].sort(key=lambda i: i["id"] != first_image)  # the first ref's image first
    edit(refs, instances)
    dump_refs(refs, root / "refcoco" / "refs(unc).p")
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ConversionError, match=message) as err:
        convert_refcoco(root, tmp_path / "out", "refcoco")
    assert str(root / "refcoco" / "refs(unc).p") in str(err.value)
    assert not (tmp_path / "out" / "refcoco").exists()


def test_converter_refuses_to_replace_the_release_folder_and_bad_names(release, tmp_path):
    root = _copy_release(release, tmp_path)
    with pytest.raises(ValueError, match="the output folder is the release folder itself"):
        convert_refcoco(root, root, "refcoco")
    assert (root / "refcoco" / "refs(unc).p").is_file()
    with pytest.raises(ValueError, match=r"dataset name '\.\./x' cannot be a folder name"):
        convert_refcoco(root, tmp_path / "out", "../x")
    with pytest.raises(ValueError, match="unknown splitBy 'google'"):
        convert_refcoco(root, tmp_path / "out", "refcoco", split_by="google")
    with pytest.raises(FileNotFoundError, match=r"refcoco\+/instances\.json: missing .*lichengunc/refer"):
        convert_refcoco(root, tmp_path / "out", "refcoco+")


def test_empty_sentences_are_left_out_and_counted(release, tmp_path):
    root = _copy_release(release, tmp_path)
    refs = load_refs(root / "refcoco" / "refs(unc).p")
    refs[0]["sentences"][0]["sent"] = "   "
    dump_refs(refs, root / "refcoco" / "refs(unc).p")
    summary = convert_refcoco(root, tmp_path / "out", "refcoco")
    assert summary["empty_sentences"] == 1
    total = sum(len(r["sentences"]) for r in refs if r["split"] == refs[0]["split"])
    assert summary["splits"][refs[0]["split"]]["sentences"] == total - 1


# ----------------------------------------------------------------------------------------------------------------
# sources


def test_sources_say_where_the_real_files_come_from(tmp_path):
    text = instructions("refcoco", tmp_path / "coco")
    assert "fetchable: http://images.cocodataset.org/zips/train2014.zip" in text
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        assert f"- {dataset}.zip -> {tmp_path / 'coco' / dataset}.zip (by hand from https://github.com/lichengunc/refer" in text
    items = {e.path: e for e in real_manifest("refcoco").items}
    assert items["train2014"].count == 82783
    assert {"refcoco/refs(unc).p", "refcoco+/refs(unc).p", "refcocog/refs(umd).p"} <= set(items)
    report = verify(real_manifest("refcoco"), tmp_path / "coco")
    assert any("refcocog/refs(umd).p: missing file (from refcocog.zip from https://github.com/lichengunc/refer"
               in p for p in report.problems)


def test_the_synthetic_release_verifies_against_its_manifest(release):
    assert verify(synthetic_manifest("refcoco", CFG), release).ok
    images = sorted((release / "train2014").iterdir())
    assert len(images) == CFG.num_images and np.all([p.suffix == ".jpg" for p in images])
