"""Ref-YouTube-VOS local proxy: the fixed held-out list, holding it out of training, and scoring."""

import random

import numpy as np
import pytest
from PIL import Image

from bifit.data.ytvos import YTVOSDataset, load_gt_masks
from bifit.eval.ytvos import score_expression
from bifit.eval.ytvos_proxy import (
    evaluate_proxy,
    proxy_count,
    proxy_expressions,
    proxy_rank,
    proxy_videos,
    read_video_list,
    select_proxy_videos,
    write_video_list,
)
from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.ytvos import generate_benchmark
from tests.conftest import tiny_model
from tests.eval.fakes import WordTokenizer


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy") / "ref-youtube-vos"
    generate_benchmark(SyntheticConfig(seed=4, num_train_videos=5, num_valid_videos=1, num_test_videos=1,
                                       frames_per_video=4, height=96, width=128), root, progress=False)
    return root


def test_selection_rule_is_fixed_and_documented():
    ids = [f"{i:010x}" for i in range(50)]
    chosen = select_proxy_videos(ids, 0.1)
    assert chosen == sorted(chosen) and len(chosen) == 5
    assert chosen == select_proxy_videos(list(reversed(ids)), 0.1)  # order of the input does not matter
    ranks = sorted(proxy_rank(v) for v in ids)
    assert max(proxy_rank(v) for v in chosen) == ranks[4]
    # the documented rule: the smallest sha1 of salt + id
    import hashlib

    assert proxy_rank("003234408d") == hashlib.sha1(b"bifit/ref-youtube-vos/proxy/v1/003234408d").hexdigest()
    assert proxy_count(3471, 0.1) == 347 and proxy_count(3, 0.1) == 1 and proxy_count(3, 0.9) == 2
    with pytest.raises(ValueError, match=r"expected a number in \(0, 1\)"):
        select_proxy_videos(ids, 1.0)
    with pytest.raises(ValueError, match="at least 2 training videos"):
        select_proxy_videos(ids[:1], 0.5)


def test_list_file_round_trip_and_held_out_of_the_training_dataset(bench, tmp_path):
    videos = proxy_videos(bench, 0.4)
    write_video_list(tmp_path / "list.txt", videos)
    assert read_video_list(tmp_path / "list.txt") == videos
    every = YTVOSDataset(bench, "train", 2, categories=SYNTHETIC_CATEGORIES, rng=random.Random(0))
    ds = YTVOSDataset(bench, "train", 2, categories=SYNTHETIC_CATEGORIES, rng=random.Random(0), exclude_videos=videos)
    assert ds.samples == [s for s in every.samples if s.video not in videos] and len(ds) < len(every)
    assert not {s.video for s in ds.samples} & set(videos)
    with pytest.raises(ValueError, match="no usable training samples once the 5 excluded videos are left out"):
        YTVOSDataset(bench, "train", 2, categories=SYNTHETIC_CATEGORIES, exclude_videos={s.video for s in every.samples})
    with pytest.raises(FileNotFoundError, match="run the preprocess stage"):
        read_video_list(tmp_path / "none.txt")


def test_score_expression_values():
    gt = np.zeros((2, 8, 8), bool)
    gt[:, 2:6, 2:6] = True
    assert score_expression(gt, gt) == {"j": 1.0, "f": 1.0, "jf": 1.0}
    s = score_expression(gt, np.zeros_like(gt))
    assert s["j"] == 0.0 and s["f"] == 0.0
    half = gt.copy()
    half[:, 2:6, 4:6] = False
    assert score_expression(gt, half)["j"] == pytest.approx(0.5)


def test_tiny_model_proxy_run_scores_the_written_masks(bench, tmp_path):
    videos = proxy_videos(bench, 0.4)
    metrics, result = evaluate_proxy(tiny_model(seed=0).eval(), WordTokenizer(), bench, videos, short_side=64,
                                     batch=4, out_dir=tmp_path, progress=False)
    exps = proxy_expressions(bench, videos)
    assert metrics["num_videos"] == 2 and metrics["num_expressions"] == len(exps) == len(result.rows)
    assert 0 <= metrics["jf"] <= 1 and metrics["jf"] == pytest.approx((metrics["j"] + metrics["f"]) / 2)
    assert list(result.per_video()) == videos
    for e, row in zip(exps, result.rows):
        pred = np.stack([np.array(Image.open(tmp_path / e.video / e.exp_id / f"{f}.png")) for f in e.frames])
        assert set(np.unique(pred)) <= {0, 255}
        gt = load_gt_masks(bench, e.video, e.frames, e.obj_id, "train").numpy()
        assert score_expression(gt, pred == 255)["jf"] == pytest.approx(row["jf"], abs=1e-12)


def test_missing_annotation_is_named_or_skipped(bench, tmp_path):
    import json
    import shutil

    from bifit.data.ytvos import SampleError
    from tests.eval.fakes import BackgroundModel

    root = shutil.copytree(bench, tmp_path / "copy")
    videos = proxy_videos(root, 0.4)
    missing = sorted((root / "train/Annotations" / videos[0]).iterdir())[1]
    missing.unlink()
    with pytest.raises(SampleError, match="missing annotation PNG"):
        evaluate_proxy(BackgroundModel(), WordTokenizer(), root, videos, short_side=64, progress=False)
    metrics, result = evaluate_proxy(BackgroundModel(), WordTokenizer(), root, videos, short_side=64,
                                     out_dir=tmp_path / "out", skip_bad_samples=True, progress=False)
    assert metrics["num_skipped_videos"] == 1 and metrics["num_videos"] == 1
    assert {r["video"] for r in result.rows} == {videos[1]}
    skipped = json.loads((tmp_path / "out/skipped_samples.json").read_text())
    assert skipped[0]["file"] == str(missing) and videos[0] in skipped[0]["id"]
