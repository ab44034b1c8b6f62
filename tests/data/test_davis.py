"""Ref-DAVIS17 on a tiny synthetic copy of the three official zips: writer, safe extraction, non-destructive
conversion (renames, string sort, latin-1, truncation), loader and training sampling."""

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bifit.data.davis import (
    RefDavisDataset,
    davis_anchor,
    davis_categories,
    load_frames,
    load_gt_labels,
    ref_davis_videos,
)
from bifit.prepare.archive import extract
from bifit.prepare.davis import (
    ConversionError,
    convert_ref_davis,
    parse_annotation_line,
    read_annotation_file,
    video_expressions,
)
from bifit.synthetic.davis import (
    MISSPELLED,
    SEMANTICS_ZIP,
    TEXT_ZIP,
    TRAINVAL_ZIP,
    SyntheticDavisConfig,
    generate_ref_davis,
)

VOID = 255
TINY = SyntheticDavisConfig(seed=3, num_train_videos=2, num_val_videos=2, frames_per_video=6, height=96, width=160)


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    raw = tmp_path_factory.mktemp("davis") / "ref-davis"
    summary = generate_ref_davis(TINY, raw, progress=False)
    for name in (TRAINVAL_ZIP, SEMANTICS_ZIP, TEXT_ZIP):
        extract(raw / name, raw, progress=False)
    prepared = raw.parent / "prepared"
    conversion = convert_ref_davis(raw, prepared, progress=False)
    return raw, prepared, summary, conversion


def test_writer_is_deterministic_and_idempotent(davis, tmp_path):
    raw, _, summary, _ = davis
    assert summary["generated"] and summary["train"] == ["classic-car", "dogs-scale"]
    assert summary["val"] == ["blackswan", "bmx-trees"]
    again = generate_ref_davis(TINY, raw, progress=False)
    assert not again["generated"]
    other = generate_ref_davis(TINY, tmp_path, progress=False)
    assert other["generated"]
    for name in (TRAINVAL_ZIP, SEMANTICS_ZIP, TEXT_ZIP):
        assert (tmp_path / name).read_bytes() == (raw / name).read_bytes()


def test_writer_refuses_to_replace_foreign_zips(tmp_path):
    (tmp_path / TRAINVAL_ZIP).write_bytes(b"a real download")
    with pytest.raises(FileExistsError, match="refusing to replace real downloads"):
        generate_ref_davis(TINY, tmp_path, progress=False)
    assert (tmp_path / TRAINVAL_ZIP).read_bytes() == b"a real download"


def test_official_layout_and_quirks(davis):
    raw, _, _, _ = davis
    assert (raw / "DAVIS/ImageSets/2017/val.txt").read_text() == "blackswan\nbmx-trees\n"
    frames = sorted(p.name for p in (raw / "DAVIS/JPEGImages/480p/blackswan").iterdir())
    assert frames == [f"{t:05d}.jpg" for t in range(6)]
    png = Image.open(raw / "DAVIS/Annotations_unsupervised/480p/blackswan/00001.png")
    assert png.mode == "P" and png.size == (160, 96)
    labels = np.array(png)
    assert VOID in labels and labels[labels != VOID].max() >= 2  # void ring in frame 1, several objects
    annot2 = (raw / "davis_text_annotations/Davis17_annot2.txt").read_bytes()
    assert "café".encode("latin-1") in annot2 and "café".encode() not in annot2
    annot1 = (raw / "davis_text_annotations/Davis17_annot1.txt").read_text()
    assert all(f"{MISSPELLED[s]} 1 " in annot1 for s in ("classic-car", "dogs-scale"))
    semantics = json.loads((raw / "DAVIS/davis_semantics.json").read_text())
    assert set(semantics) == {"classic-car", "dogs-scale", "blackswan", "bmx-trees"}
    # ids are numbered by first appearance: every object present in frame 0 has a smaller id than any later one
    for name in ("blackswan", "bmx-trees"):
        maps = np.stack([np.array(Image.open(p)) for p in
                         sorted((raw / f"DAVIS/Annotations_unsupervised/480p/{name}").iterdir())])
        first = {int(v) for v in np.unique(maps[0]) if v not in (0, VOID)}
        later = {int(v) for v in np.unique(maps) if v not in (0, VOID)} - first
        assert not later or min(later) > max(first)


def test_conversion_follows_the_reference_rules(davis):
    raw, prepared, _, conversion = davis
    meta = json.loads((prepared / "meta_expressions/valid/meta_expressions.json").read_text())["videos"]
    assert list(meta) == ["blackswan", "bmx-trees"]
    exps = meta["blackswan"]["expressions"]
    assert len(exps) % 4 == 0 and exps["2"]["exp"].endswith("near the café")
    assert [exps[str(i)]["obj_id"] for i in range(4)] == ["1"] * 4
    assert meta["blackswan"]["frames"] == [f"{t:05d}" for t in range(6)]
    train = json.loads((prepared / "meta_expressions/train/meta_expressions.json").read_text())["videos"]
    assert set(train) == {"classic-car", "dogs-scale"}  # misspelled names in the text files were renamed
    semantics = json.loads((raw / "DAVIS/davis_semantics.json").read_text())
    n_last = len(semantics["dogs-scale"])
    assert len(train["dogs-scale"]["expressions"]) == 4 * (n_last - 1)  # annotator 2 full-video lacks one object
    assert any("dogs-scale: annotator lists of lengths" in n for n in conversion["irregularities"])
    objects = json.loads((prepared / "valid/meta.json").read_text())["videos"]["blackswan"]["objects"]
    assert objects == {k: {"category": v} for k, v in semantics["blackswan"].items()}
    # non-destructive: the DAVIS tree is intact and the converted files are the same bytes (hard links here)
    src = raw / "DAVIS/JPEGImages/480p/blackswan/00003.jpg"
    dst = prepared / "valid/JPEGImages/blackswan/00003.jpg"
    assert src.is_file() and dst.read_bytes() == src.read_bytes()
    assert conversion["files_linked"] + conversion["files_copied"] == 2 * 6 * 4
    assert (prepared / "valid/Annotations/bmx-trees/00005.png").read_bytes() == \
        (raw / "DAVIS/Annotations_unsupervised/480p/bmx-trees/00005.png").read_bytes()


def test_annotation_parsing_sorting_and_truncation(tmp_path):
    assert parse_annotation_line('clasic-car 2 "a  car   on the left"', "f", 1).video == "classic-car"
    assert parse_annotation_line('dog 1 "a dog"', "f", 1).sentence == "a dog"
    assert parse_annotation_line("   ", "f", 3) is None
    with pytest.raises(ConversionError, match=r"f:7: expected '<video> <obj_id>"):
        parse_annotation_line("dog 1", "f", 7)
    path = tmp_path / "a.txt"
    path.write_bytes('x 2 "two"\nx 10 "ten"\nx 1 "one"\n'.encode("latin-1"))
    assert [e.obj_id for e in read_annotation_file(path, "latin-1")["x"]] == ["1", "10", "2"]  # string order
    path.write_bytes('x 1 "caf\xe9"\n'.encode("latin-1"))
    assert read_annotation_file(path, "latin-1")["x"][0].sentence == "café"
    with pytest.raises(ConversionError, match="not valid utf-8"):
        read_annotation_file(path, "utf-8")
    cols = [read_annotation_file(path, "latin-1")["x"]] * 3 + [[]]
    assert video_expressions(cols) == ({}, 0)
    with pytest.raises(ConversionError, match="missing Ref-DAVIS17 text annotation file"):
        read_annotation_file(tmp_path / "none.txt", "utf-8")


def test_annotation_lines_end_at_newlines_only(tmp_path):
    # byte 0x85 is U+0085 in latin-1 and 0x1c a separator: str.splitlines() would cut the sentences there
    path = tmp_path / "Davis17_annot2.txt"
    path.write_bytes(b'x 1 "a dog\x85 running left"\r\nx 2 "a\x1ccat"\r\ny 1 "a bird"\n')
    by_video = read_annotation_file(path, "latin-1")
    # inside a sentence they are whitespace to str.split(), as in the reference: one space each
    assert [(e.obj_id, e.sentence) for e in by_video["x"]] == [("1", "a dog running left"), ("2", "a cat")]
    assert [e.sentence for e in by_video["y"]] == ["a bird"]
    expressions, n_obj = video_expressions([by_video["x"]] * 4)
    assert n_obj == 2 and len(expressions) == 8 and expressions["4"]["exp"] == "a cat"


def test_conversion_reports_missing_sequence_files(davis, tmp_path):
    raw, _, _, _ = davis
    import shutil

    copy = Path(shutil.copytree(raw, tmp_path / "raw", symlinks=True))
    shutil.rmtree(copy / "DAVIS/Annotations_unsupervised/480p/bmx-trees")
    with pytest.raises(ConversionError, match="bmx-trees.*missing unsupervised annotations"):
        convert_ref_davis(copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_loader_lists_sequences_with_four_annotators(davis):
    raw, prepared, _, _ = davis
    videos = ref_davis_videos(prepared)
    assert [v.name for v in videos] == ["blackswan", "bmx-trees"]
    v = videos[0]
    assert v.size == (96, 160) and len(v.frames) == 6
    assert all(len(row) == 4 for row in v.captions) and v.exp_ids[1] == ("4", "5", "6", "7")
    assert v.captions[0][2].endswith("near the café") and v.captions[0][0] == v.captions[0][0].lower()
    imgs, orig = load_frames(prepared, v, short_side=64)
    assert imgs.shape == (6, 3, 64, 106) and orig == (96, 160)
    gt = load_gt_labels(prepared, v)
    assert gt.shape == (6, 96, 160) and gt.dtype == np.uint8
    raw_png = np.array(Image.open(raw / "DAVIS/Annotations_unsupervised/480p/blackswan/00004.png"))
    assert np.array_equal(gt[4], raw_png)


def test_training_dataset_and_t1_sampling(davis):
    _, prepared, _, _ = davis
    assert set(davis_categories(prepared)) <= {"circle", "square", "triangle", "diamond"}
    ds = RefDavisDataset(prepared, num_frames=2, rng=random.Random(0))
    imgs, target = ds[0]
    assert imgs.shape[0] == 2 and target["masks"].shape[0] == 2 and target["video"] in ("classic-car", "dogs-scale")
    rng = random.Random(5)
    draws = [davis_anchor(4, 6, 1, rng) for _ in range(200)]
    assert set(draws) == {1, 2, 3}  # the sorted first of (4, 4 - b, min(5, 4 + a)): 4 - b with b in 1..3
    ds1 = RefDavisDataset(prepared, num_frames=1, rng=random.Random(0))
    positions = {int(ds1[i][1]["frames_idx"][0]) for i in range(len(ds1)) if ds1.samples[i].anchor == 0}
    assert positions == {0}


def test_zip_members_are_the_official_names(davis):
    raw, _, _, _ = davis
    with zipfile.ZipFile(raw / TEXT_ZIP) as zf:
        assert sorted(zf.namelist()) == sorted(f"davis_text_annotations/{n}" for n in (
            "Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
            "Davis17_annot2_full_video.txt"))
    with zipfile.ZipFile(raw / SEMANTICS_ZIP) as zf:
        assert zf.namelist() == ["DAVIS/README.md", "DAVIS/SOURCES.md", "DAVIS/davis_semantics.json"]
        semantics_readme = zf.read("DAVIS/README.md")
    with zipfile.ZipFile(raw / TRAINVAL_ZIP) as zf:  # the same documentation names, other contents
        assert zf.read("DAVIS/README.md") != semantics_readme
    assert (raw / "DAVIS/README.md").read_bytes() == semantics_readme  # the later zip's copy, as unzip leaves it


def test_expression_of_a_missing_object_is_reported(davis, tmp_path):
    import shutil

    raw, _, _, _ = davis
    copy = Path(shutil.copytree(raw, tmp_path / "raw", symlinks=True))
    for name, enc in zip(("Davis17_annot1.txt", "Davis17_annot1_full_video.txt", "Davis17_annot2.txt",
                          "Davis17_annot2_full_video.txt"), ("utf-8", "utf-8", "latin-1", "latin-1")):
        path = copy / "davis_text_annotations" / name
        path.write_bytes(path.read_bytes() + 'blackswan 0 "a ghost"\n'.encode(enc))
    summary = convert_ref_davis(copy, tmp_path / "out", progress=False)
    assert any("blackswan: expressions refer to object(s) ['0'] missing" in n for n in summary["irregularities"])
    meta = json.loads((tmp_path / "out/meta_expressions/valid/meta_expressions.json").read_text())["videos"]
    assert meta["blackswan"]["expressions"]["0"] == {"exp": "a ghost", "obj_id": "0"}  # "0" sorts first
