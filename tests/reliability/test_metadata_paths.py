"""Ids and names read from metadata become paths: each one must be a single path component (or, for the JHMDB
metadata's relative paths, stay inside the root), refused naming the file and the field. The training listing's
cases are in bad_inputs.CORRUPT_DATASETS; here the inference listing and the three preparation readers."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from bifit.data.ytvos import SampleError, inference_expressions
from bifit.fsutil import component_problem, relative_path_problem
from bifit.prepare.a2d import read_single_frame_json, read_videoset
from bifit.prepare.davis import ConversionError, parse_annotation_line
from bifit.prepare.jhmdb import read_metadata


@pytest.mark.parametrize("value,why", [("", "it is empty"), (".", "'.' names a folder itself"),
                                       ("..", "'..' names a folder itself"), ("a/b", "it contains a path separator"),
                                       ("..\\x", "it contains a path separator"), ("a\x00b", "it contains a NUL")])
def test_component_problem_names_the_reason(value, why):
    assert component_problem(value).startswith(why)


@pytest.mark.parametrize("value", ["0a1b2c3d4e", "00005", "bike-packing", "v_x_f_3", "..hidden", "a..b"])
def test_ordinary_names_are_components(value):
    assert component_problem(value) is None


@pytest.mark.parametrize("value,why", [("/etc/passwd", "it is absolute"), ("a/../../b", "it has a '..' component"),
                                       ("C:\\x", "it is absolute"), ("..\\x", "it has a '..' component")])
def test_relative_path_problem(value, why):
    assert relative_path_problem(value) == why
    assert relative_path_problem("./jhmdb_sentences/Rename_Images/run/x/00001.png") is None


def test_inference_refuses_a_video_id_that_would_write_outside_the_predictions(toy_data, tmp_path):
    root = shutil.copytree(toy_data / "ref-youtube-vos", tmp_path / "copy")
    path = root / "meta_expressions" / "valid" / "meta_expressions.json"
    meta = json.loads(path.read_text())
    vid = sorted(meta["videos"])[0]
    meta["videos"]["../../../escaped"] = meta["videos"].pop(vid)
    path.write_text(json.dumps(meta))
    with pytest.raises(SampleError, match=re.escape(f"{path}: video id '../../../escaped' cannot be a folder name")):
        inference_expressions(root, "valid", videos=["../../../escaped"])


def test_davis_text_annotation_with_a_path_as_video_is_refused():
    with pytest.raises(ConversionError, match=r"^Davis17_annot1\.txt:7: video '\.\./x' cannot be a folder name "
                                              r"\(it contains a path separator\)"):
        parse_annotation_line('../x 1 "a man riding a bike"', "Davis17_annot1.txt", 7)
    assert parse_annotation_line('bike-packing 1 "a man riding a bike"', "f.txt", 1).video == "bike-packing"


def test_a2d_videoset_and_single_frame_json_refuse_path_ids(tmp_path):
    csv = tmp_path / "videoset.csv"
    csv.write_text("EadxBPmQvtg,0,0,0,0,0,0,0,0\n../../x,0,0,0,0,0,0,0,1\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}:2: video id '../../x' cannot be a folder name")):
        read_videoset(csv)
    single = tmp_path / "a2d_test.json"
    single.write_text(json.dumps([["a man", "EadxBPmQvtg", 3, 1], ["a dog", "../x", 3, 1]]))
    with pytest.raises(ValueError, match=re.escape(f"{single}: entry 1: video_id '../x' cannot be a folder name")):
        read_single_frame_json(single)


def test_jhmdb_metadata_paths_must_stay_inside_the_root(tmp_path):
    good = ["brush_hair_0", "./jhmdb_sentences/Rename_Images/brush_hair/x/00001.png",
            "./jhmdb_sentences/puppet_mask/brush_hair/x/puppet_mask.mat", 40, "a woman brushing her hair"]
    path = tmp_path / "jhmdb_sentences_samples_metadata.json"
    path.write_text(json.dumps([good, [*good[:2], "./jhmdb_sentences/../../../etc/puppet_mask.mat", *good[3:]]]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: entry 1: masks_path "
                                                   "'./jhmdb_sentences/../../../etc/puppet_mask.mat' must stay inside "
                                                   "the dataset root (it has a '..' component)")):
        read_metadata(path)
    path.write_text(json.dumps([["../v", *good[1:]]]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: entry 0: video_id '../v' cannot be a folder name")):
        read_metadata(path)
