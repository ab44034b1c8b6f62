"""The synthetic Ref-YouTube-VOS benchmark generator: format, determinism, scene and expression properties."""

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.expressions import description_kind
from bifit.synthetic.render import shape_mask
from bifit.synthetic.scene import Description, is_unambiguous, resolve
from bifit.synthetic.ytvos import generate_benchmark, load_scenes, scene_from_record

TINY = SyntheticConfig(seed=3, num_train_videos=4, num_valid_videos=2, num_test_videos=1, frames_per_video=6,
                       height=96, width=160)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "ref-youtube-vos"
    generate_benchmark(TINY, root, progress=False)
    return root


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def id_maps(root: Path, split: str, vid: str, frames) -> np.ndarray:
    return np.stack([np.array(Image.open(root / split / "Annotations" / vid / f"{f}.png")) for f in frames])


def read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())["videos"]


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("height", 100, "multiple of 32"),
    ("width", 64, r"\[96, 2048\]"),
    ("min_objects", 2, r"\[3, 8\]"),
    ("max_objects", 2, r"\[3, 8\]"),
    ("frames_per_video", 3, r"\[4, 1000\]"),
    ("large_radius", (10, 12), "min <= max"),
    ("small_radius", (12, 9), "min <= max"),
    ("num_train_videos", 0, r"\[1, 100000\]"),
    ("kind_weights", {"attribute": 1, "motion": 1, "position": 1}, "a weight >= 0 for each of attribute, motion"),
    ("kind_weights", {"attribute": 0, "motion": 0, "position": 0, "relation": 0}, "not all 0"),
    ("kind_weights", {"attribute": -1, "motion": 1, "position": 1, "relation": 1}, "a weight >= 0"),
])
def test_config_validation_names_field_and_range(field, value, expected):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}: expected .*{expected}"):
        SyntheticConfig(**{field: value})


def test_layout_matches_ref_youtube_vos(bench):
    train_exp = read(bench, "meta_expressions/train/meta_expressions.json")
    valid_exp = read(bench, "meta_expressions/valid/meta_expressions.json")
    test_exp = read(bench, "meta_expressions/test/meta_expressions.json")
    train_meta = read(bench, "train/meta.json")
    assert len(train_exp) == 4 and len(test_exp) == 1 and len(valid_exp) == 3  # valid meta = valid + test videos
    assert set(test_exp) < set(valid_exp) and set(read(bench, "valid/meta.json")) == set(valid_exp) - set(test_exp)
    for vid, entry in train_exp.items():
        assert len(vid) == 10 and all(c in "0123456789abcdef" for c in vid)
        assert entry["frames"] == ["00000", "00005", "00010", "00015", "00020", "00025"]
        for exp in entry["expressions"].values():
            assert set(exp) == {"exp", "obj_id"} and exp["obj_id"] in train_meta[vid]["objects"]
        for obj in train_meta[vid]["objects"].values():
            assert obj["category"] in SYNTHETIC_CATEGORIES
        for frame in entry["frames"]:
            jpg = Image.open(bench / "train" / "JPEGImages" / vid / f"{frame}.jpg")
            png = Image.open(bench / "train" / "Annotations" / vid / f"{frame}.png")
            assert (jpg.format, jpg.mode, jpg.size) == ("JPEG", "RGB", (160, 96))
            assert (png.mode, png.size) == ("P", (160, 96))
            assert png.getpalette()[3:6] == [128, 0, 0]  # YTVOS/DAVIS palette: id 1 is dark red
            ids = set(np.unique(np.array(png)).tolist()) - {0}
            assert ids <= {int(k) for k in train_meta[vid]["objects"]}
    for entry in test_exp.values():
        assert all(set(e) == {"exp"} for e in entry["expressions"].values())
    for vid in valid_exp:
        assert (bench / "valid" / "JPEGImages" / vid / "00000.jpg").is_file()
        assert (bench / "valid" / "Annotations" / vid).is_dir() == (vid not in test_exp)


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    again = tmp_path / "again"
    generate_benchmark(TINY, again, progress=False)
    assert file_digests(again) == file_digests(bench)
    other = tmp_path / "other"
    generate_benchmark(replace(TINY, seed=4), other, progress=False)
    a, b = file_digests(bench), file_digests(other)
    assert a["meta_expressions/train/meta_expressions.json"] != b["meta_expressions/train/meta_expressions.json"]
    assert set(a) != set(b)  # other video ids


def test_videos_have_three_moving_objects_that_occlude_and_leave(bench):
    scenes = load_scenes(bench)
    for split in ("train", "valid"):
        for vid, record in scenes[split].items():
            objs = record["objects"]
            assert len(objs) >= 3
            centres = np.asarray([o["centres"] for o in objs])  # [N, T, 2]
            assert np.all(np.linalg.norm(centres[:, -1] - centres[:, 0], axis=-1) > 10)  # all move
            ids = id_maps(bench, split, vid, [f"{5 * t:05d}" for t in range(TINY.frames_per_video)])
            full = np.stack([[shape_mask(o["shape"], *o["centres"][t], o["radius"], 96, 160)
                              for t in range(TINY.frames_per_video)] for o in objs])  # [N, T, H, W]
            visible = np.stack([ids == o["obj_id"] for o in objs])
            assert np.all(visible <= full)  # annotations are the rendered shapes minus occluded parts
            in_frame, shown = full.sum((2, 3)), visible.sum((2, 3))  # [N, T]
            assert (in_frame == 0).any(), f"{vid}: no object leaves the frame"
            assert ((in_frame > 0) & (shown <= 0.75 * in_frame)).any(), f"{vid}: no occlusion"


def test_distractors_share_attributes(bench):
    for record in load_scenes(bench)["train"].values():
        objs = record["objects"]
        pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]]
        assert any(a["colour"] == b["colour"] and a["shape"] != b["shape"] for a, b in pairs)
        assert any(a["shape"] == b["shape"] and a["size"] != b["size"] for a, b in pairs)


def test_expressions_are_unambiguous(bench):
    scenes = load_scenes(bench)
    kinds = set()
    for split in ("train", "valid"):
        for vid, record in scenes[split].items():
            frames = [f"{5 * t:05d}" for t in range(TINY.frames_per_video)]
            scene = scene_from_record(record, id_maps(bench, split, vid, frames), TINY.min_visible_pixels)
            meta = read(bench, f"meta_expressions/{split}/meta_expressions.json")[vid]["expressions"]
            referred = {e["obj_id"] for e in meta.values()}
            assert referred == {str(o["obj_id"]) for o in record["objects"]}  # every object is referred to
            for exp_id, exp in record["expressions"].items():
                assert meta[exp_id] == {"exp": exp["exp"], "obj_id": exp["obj_id"]}
                desc = Description.from_dict(exp["description"])
                kinds.add(description_kind(desc))
                assert is_unambiguous(scene, desc, int(exp["obj_id"])), (vid, exp)
                if description_kind(desc) in ("attribute", "motion"):  # independent count for plain attributes
                    keys = {"motion": "direction"}
                    matches = [o for o in record["objects"]
                               if all(o[keys.get(k, k)] == v for k, v in desc.attributes().items())]
                    assert [o["obj_id"] for o in matches] == [int(exp["obj_id"])]
                for word in desc.attributes().values():
                    assert word in exp["exp"]
            per_object = [sum(e["obj_id"] == o for e in meta.values()) for o in referred]
            assert set(per_object) == {TINY.expressions_per_object}
    assert kinds == {"attribute", "motion", "position", "relation"}


def test_kind_weights_set_the_mix_of_expression_kinds(tmp_path):
    def kinds(weights):
        cfg = replace(TINY, num_train_videos=12, num_valid_videos=1, num_test_videos=0, kind_weights=weights)
        root = tmp_path / "-".join(str(w) for w in weights.values())
        generate_benchmark(cfg, root, progress=False)
        return [description_kind(Description.from_dict(e["description"]))
                for rec in load_scenes(root)["train"].values() for e in rec["expressions"].values()]

    only_plain = kinds({"attribute": 1, "motion": 1, "position": 0, "relation": 0})
    assert set(only_plain) == {"attribute", "motion"}  # weight 0: never chosen
    mostly_relations = kinds({"attribute": 0.05, "motion": 0.05, "position": 0.05, "relation": 1})
    share = mostly_relations.count("relation") / len(mostly_relations)
    assert share > 0.4, share  # about half: each object's first kind is usually a relation, its second is not


def test_ambiguous_description_is_rejected(bench):
    record = next(iter(load_scenes(bench)["train"].values()))
    vid = next(iter(load_scenes(bench)["train"]))
    scene = scene_from_record(record, id_maps(bench, "train", vid, [f"{5 * t:05d}" for t in range(6)]), 20)
    everything = Description()  # "the object" matches every object
    assert len(resolve(scene, everything)) == len(record["objects"])
    assert not is_unambiguous(scene, everything, record["objects"][0]["obj_id"])


def test_backgrounds_are_textured(bench):
    for vid in read(bench, "train/meta.json"):
        img = np.asarray(Image.open(bench / "train" / "JPEGImages" / vid / "00000.jpg"), dtype=np.float32)
        ids = np.array(Image.open(bench / "train" / "Annotations" / vid / "00000.png"))
        bg = img[ids == 0]
        assert bg.std(0).mean() > 4.0  # not a flat colour
        assert np.abs(np.diff(img, axis=1)).mean() > 0.5


def test_idempotent_and_refuses_foreign_folders(bench, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in bench.rglob("*")}
    summary = generate_benchmark(TINY, bench, progress=False)
    assert summary["generated"] is False and summary["train_videos"] == 4 and summary["valid_videos"] == 2
    assert {p: p.stat().st_mtime_ns for p in bench.rglob("*")} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign.*overwrite=True"):
        generate_benchmark(TINY, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    small = replace(TINY, num_train_videos=1, num_valid_videos=1, num_test_videos=0, frames_per_video=4)
    summary = generate_benchmark(small, foreign, progress=False, overwrite=True)
    assert summary["generated"] and not (foreign / "notes.txt").exists()
    assert summary["train_expressions"] == sum(
        len(v["expressions"]) for v in read(foreign, "meta_expressions/train/meta_expressions.json").values())
    # a benchmark of ours with another config is replaced without overwrite=True; no temp folders are left
    assert generate_benchmark(replace(small, seed=9), foreign, progress=False)["generated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


@pytest.mark.slow
def test_default_benchmark_generates_under_30_seconds(tmp_path):
    start = time.perf_counter()
    summary = generate_benchmark(SyntheticConfig(), tmp_path / "default", progress=False)
    assert time.perf_counter() - start < 30
    assert summary["train_videos"] == 60 and summary["valid_videos"] == 12
