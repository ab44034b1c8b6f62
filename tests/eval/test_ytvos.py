"""The Ref-YouTube-VOS evaluator (bifit/eval/ytvos.py): masks in the submission layout, J&F of what was written,
the shuffled-expression control, and the real valid split (no ground truth: masks only)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bifit.data.ytvos import Expression, inference_expressions, inference_videos, load_gt_masks
from bifit.eval.ytvos import evaluate_valid, predict_valid, score_expression, shuffled_captions
from bifit.synthetic.config import SyntheticConfig
from bifit.synthetic.ytvos import generate_benchmark
from tests.conftest import tiny_model
from tests.eval.fakes import WordTokenizer

OPTIONS = dict(short_side=48, window=None, threshold=0.5, batch=4, amp=False)
BENCH = SyntheticConfig(seed=3, num_train_videos=2, num_valid_videos=2, num_test_videos=1, frames_per_video=4,
                        height=96, width=128)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Two valid videos with local ground truth (the synthetic valid meta names every expression's object)."""
    return Path(generate_benchmark(BENCH, tmp_path_factory.mktemp("ytvos_eval") / "ytvos", progress=False)["root"])


def _written(folder, e) -> np.ndarray:
    masks = []
    for f in e.frames:
        with Image.open(folder / e.video / e.exp_id / f"{f}.png") as im:
            assert im.mode == "L"
            masks.append(np.array(im))
    return np.stack(masks)


def test_shuffled_control_gives_every_expression_a_caption_of_another_video():
    expressions = [Expression(v, str(i), f"{v} caption {i}", ("00000",), "1") for v in "abc" for i in range(2)]
    shuffled = shuffled_captions(expressions, seed=0)
    assert shuffled == shuffled_captions(expressions, seed=0)
    assert sorted(shuffled) == sorted(e.caption for e in expressions)
    assert all(not c.startswith(e.video) for e, c in zip(expressions, shuffled))


def test_valid_split_scores_the_masks_it_writes_and_the_control(bench, tmp_path):
    model = tiny_model(seed=0).eval()
    metrics, result = evaluate_valid(model, WordTokenizer(), bench, seed=0, out_dir=tmp_path, max_expressions=12,
                                     progress=False, **OPTIONS)
    expressions = inference_expressions(bench, "valid")[:12]  # the first video's and some of the second's
    assert metrics["num_expressions"] == len(result.rows) == len(expressions)
    assert metrics["jf_gain_over_shuffled"] == pytest.approx(metrics["jf"] - metrics["jf_shuffled"])
    assert metrics["jf"] == pytest.approx(np.mean([r["jf"] for r in result.rows]))
    for e, row in zip(expressions, result.rows):
        written = _written(tmp_path, e)
        gt = load_gt_masks(bench, e.video, e.frames, e.obj_id, "valid").numpy()
        assert written.shape == gt.shape and set(np.unique(written)) <= {0, 255}  # original size, 0/255
        assert score_expression(gt, written == 255) == {k: row[k] for k in ("j", "f", "jf")}
        assert {"j_shuffled", "f_shuffled", "jf_shuffled"} <= set(row)
    per_video = result.per_video()
    assert list(per_video) == sorted({e.video for e in expressions}) and len(per_video) == 2


def test_scores_per_expression_kind_of_the_generated_benchmark(bench):
    from bifit.eval.ytvos import YTVOSEvaluation
    from bifit.synthetic.ytvos import expression_kinds, load_scenes

    kinds = expression_kinds(bench, "valid")
    scenes = load_scenes(bench)["valid"]
    assert set(kinds) == {(v, e) for v, rec in scenes.items() for e in rec["expressions"]}
    assert set(kinds.values()) <= {"attribute", "motion", "position", "relation"}
    for (video, exp_id), kind in kinds.items():  # the kind follows the parsed description
        desc = scenes[video]["expressions"][exp_id]["description"]
        expected = ("relation" if desc.get("relation") else "position" if desc.get("extreme")
                    else "motion" if desc.get("motion") else "attribute")
        assert kind == expected
    assert expression_kinds(bench.parent, "valid") is None  # no sidecar: real data

    rows = [{"video": "a", "exp_id": "0", "jf": 0.2}, {"video": "a", "exp_id": "1", "jf": 0.6},
            {"video": "b", "exp_id": "0", "jf": 0.9}, {"video": "b", "exp_id": "1", "jf": 0.0}]
    groups = {("a", "0"): "motion", ("a", "1"): "motion", ("b", "0"): "attribute"}  # ("b", "1") has none
    assert YTVOSEvaluation(rows, 2).mean_by_group(groups, ("jf",)) == pytest.approx(
        {"jf_attribute": 0.9, "num_attribute": 1, "jf_motion": 0.4, "num_motion": 2})


def test_real_valid_split_writes_masks_only(bench, tmp_path):
    root = shutil.copytree(bench, tmp_path / "real")
    meta_path = root / "meta_expressions/valid/meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    for video in meta["videos"].values():  # the real valid meta has no obj_id
        for exp in video["expressions"].values():
            exp.pop("obj_id", None)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expressions without obj_id have no local ground truth"):
        evaluate_valid(tiny_model(seed=0).eval(), WordTokenizer(), root, seed=0, progress=False, **OPTIONS)
    n = len(inference_videos(root))
    with pytest.raises(ValueError, match=f"{n} valid videos after filtering, expected 202"):
        predict_valid(tiny_model(seed=0).eval(), WordTokenizer(), root, tmp_path / "pred", expected_videos=202,
                      **OPTIONS)
    metrics = predict_valid(tiny_model(seed=0).eval(), WordTokenizer(), root, tmp_path / "pred", expected_videos=n,
                            progress=False, **OPTIONS)
    expressions = inference_expressions(root, "valid")
    assert metrics == {"num_videos": n, "num_expressions": len(expressions), "scored_locally": 0}
    for e in expressions:
        assert set(np.unique(_written(tmp_path / "pred", e))) <= {0, 255}
