"""A2D/JHMDB inference engine: a tiny random model end to end, hand-computable cases, skipped samples."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bifit.config import Config
from bifit.data.a2d import read_video_frames
from bifit.eval import a2d as a2d_metrics
from bifit.eval.a2d_engine import (
    PROTOCOLS,
    SampleCounts,
    evaluate_a2d,
    evaluate_jhmdb,
    gt_mask,
    load_coco_gt,
    score,
)
from bifit.prepare.a2d import COCO_GT_JSON, TEST_JSON
from bifit.prepare.a2d import preprocess as preprocess_a2d
from bifit.prepare.jhmdb import preprocess as preprocess_jhmdb
from bifit.synthetic import a2d as synthetic_a2d
from bifit.synthetic import jhmdb as synthetic_jhmdb
from tests.conftest import tiny_model

A2D = synthetic_a2d.SyntheticA2DConfig(seed=3, num_train_videos=1, num_test_videos=2, frames_per_video=8,
                                       annotated_frames=2)
JHMDB = synthetic_jhmdb.SyntheticJHMDBConfig(seed=3, num_videos=2, frames_per_video=8)
METRIC_KEYS = set(a2d_metrics.METRIC_NAMES) | {f"best-query-only {k}" for k in a2d_metrics.AP_NAMES} | {
    "num_samples", "num_skipped"}


class CharTokenizer:
    """Stand-in tokenizer: one id per character (< 100, the tiny text encoder's vocabulary)."""

    model_max_length = 28  # the tiny encoder has 32 positions, RoBERTa offsets them by 2

    def __call__(self, texts, padding=None, truncation=None, max_length=None, return_tensors=None):
        ids = [[0] + [3 + ord(c) % 90 for c in t][: self.model_max_length - 2] + [2] for t in texts]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [1] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


class ConstantModel(nn.Module):
    """Query ``full`` predicts the whole padded image with score sigmoid(2); the others predict nothing with
    score sigmoid(-2). Checks that every call gets ``valid_indices``."""

    def __init__(self, num_queries: int = 3, full: int = 1):
        super().__init__()
        self.q, self.full = num_queries, full
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images, image_mask, input_ids, attention_mask, image_sizes, valid_indices=None, **kw):
        assert valid_indices is not None and valid_indices.shape == (images.shape[0],)
        b, _, _, hp, wp = images.shape
        logits = torch.full((b, 1, self.q, 1), -2.0)
        logits[:, :, self.full] = 2.0
        masks = torch.full((b, 1, self.q, hp // 4, wp // 4), -10.0)
        masks[:, :, self.full] = 10.0
        return {"pred_logits": logits, "pred_masks": masks}


@pytest.fixture(scope="module")
def a2d_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("a2d_engine")
    synthetic_a2d.generate_a2d(A2D, base / "raw", progress=False)
    preprocess_a2d(base / "raw", base / "prepared", progress=False)
    return base / "prepared"


@pytest.fixture(scope="module")
def jhmdb_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("jhmdb_engine")
    synthetic_jhmdb.generate_jhmdb(JHMDB, base / "raw", progress=False)
    preprocess_jhmdb(base / "raw", base / "prepared", progress=False)
    return base / "prepared"


def small_cfg(num_frames: int = 2, batch_size: int = 2) -> Config:
    cfg = Config()
    cfg.data.num_frames, cfg.data.eval_short_side, cfg.data.max_size = num_frames, 96, 160
    cfg.train.batch_size = batch_size
    return cfg


def check_ranges(metrics: dict) -> None:
    assert set(metrics) == METRIC_KEYS
    for k, v in metrics.items():
        if k.startswith("num_"):
            continue
        if " S" in k or " M" in k or " L" in k:  # COCO reports -1 for an area range without GT
            assert v == -1.0 or 0.0 <= v <= 1.0, (k, v)
        else:
            assert 0.0 <= v <= 1.0, (k, v)


# ----------------------------------------------------------------------------------------------------------------


def test_tiny_random_model_end_to_end(a2d_root, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model(seed=0).eval()
    out = tmp_path / "eval"
    metrics = evaluate_a2d(model, CharTokenizer(), a2d_root, small_cfg(), out, progress=False)
    n = len(json.loads((a2d_root / "index_test.json").read_text())["samples"])
    check_ranges(metrics)
    assert metrics["num_samples"] == n and metrics["num_skipped"] == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    info = json.loads((out / "eval_info.json").read_text())
    assert info["protocols"] == PROTOCOLS and "paper" in PROTOCOLS["mAP 0.5:0.95"]
    assert "NOT the paper" in PROTOCOLS["best-query-only mAP 0.5:0.95"]
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == n
    ious = np.array([float(r["iou"]) for r in rows])
    assert abs(ious.mean() - metrics["mean_iou"]) < 1e-5
    inter, union = sum(int(r["intersection"]) for r in rows), sum(int(r["union"]) for r in rows)
    assert metrics["overall_iou"] == pytest.approx(inter / union)
    # the official pycocotools calls on RLEs give the same numbers as the count-based scoring
    slow = evaluate_a2d(model, CharTokenizer(), a2d_root, small_cfg(), None, backend="pycocotools", progress=False)
    assert slow == metrics


def test_hand_computable_whole_image_prediction(a2d_root):
    """The highest-scoring query covers the whole frame: IoU_i = |G_i| / (H W) for every sample."""
    metrics = evaluate_a2d(ConstantModel(full=1), CharTokenizer(), a2d_root, small_cfg(batch_size=3), None,
                           progress=False)
    gt = load_coco_gt(a2d_root / COCO_GT_JSON)
    areas = np.array([gt_mask(gt, iid).sum() for iid in gt["images"]], dtype=np.float64)
    pixels = A2D.height * A2D.width
    assert metrics["num_samples"] == len(areas)
    assert metrics["overall_iou"] == pytest.approx(areas.sum() / (pixels * len(areas)), rel=1e-12)
    assert metrics["mean_iou"] == pytest.approx(np.mean(areas / pixels), rel=1e-6)
    for k in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert metrics[f"P@{k}"] == pytest.approx(np.mean(areas / pixels > k))
    # every GT covers well under half the frame: the whole-frame detection never reaches IoU 0.5 and the
    # empty ones have IoU 0, so no detection is a true positive
    assert areas.max() / pixels < 0.5
    assert metrics["mAP 0.5:0.95"] == 0.0 and metrics["best-query-only mAP 0.5:0.95"] == 0.0


class BFloat16ConstantModel(ConstantModel):
    """ConstantModel with bfloat16 outputs, as the real model's under autocast; records whether each call ran
    under CPU bfloat16 autocast."""

    def __init__(self):
        super().__init__(full=1)
        self.autocast = []

    def forward(self, *args, **kwargs):
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return {k: v.to(torch.bfloat16) for k, v in super().forward(*args, **kwargs).items()}


@pytest.mark.parametrize("amp", [False, True])
def test_eval_amp_autocasts_the_forward_pass_and_scores_in_float32(a2d_root, tmp_path, monkeypatch, amp):
    import bifit.eval.a2d_engine as engine

    dtypes, postprocess = [], engine.postprocess_batch

    def spy(outputs, targets):
        dtypes.append((outputs["pred_logits"].dtype, outputs["pred_masks"].dtype))
        return postprocess(outputs, targets)

    monkeypatch.setattr(engine, "postprocess_batch", spy)
    cfg = small_cfg(batch_size=3)
    cfg.eval.amp = amp
    model = BFloat16ConstantModel()
    metrics = evaluate_a2d(model, CharTokenizer(), a2d_root, cfg, tmp_path, progress=False)
    assert model.autocast and set(model.autocast) == {amp}
    assert set(dtypes) == {(torch.float32, torch.float32)}
    assert metrics == evaluate_a2d(ConstantModel(full=1), CharTokenizer(), a2d_root, small_cfg(batch_size=3), None,
                                   progress=False)
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert (info["device"], info["amp"]) == ("cpu", amp)


def test_score_hand_computable_map_both_protocols():
    """Two samples, two queries each. A: q0 (0.9) is the GT. B: q0 (0.8) misses, q1 (0.1) is the GT.

    All queries: detections by score TP, FP, TP -> interpolated precision 1 up to recall 0.5 (51 of the 101 recall
    points), 2/3 above (50 points), at every IoU threshold. Best query only: TP, FP -> 1 up to recall 0.5, 0 above.
    """
    counts = [
        SampleCounts("v_a_f_1_i_0", np.float32([0.9, 0.05]), np.int64([100, 0]), np.int64([100, 0]), 100),
        SampleCounts("v_b_f_1_i_0", np.float32([0.8, 0.1]), np.int64([80, 50]), np.int64([0, 50]), 50),
    ]
    metrics = score(counts)
    assert metrics["mAP 0.5:0.95"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert metrics["AP 0.5"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert metrics["best-query-only mAP 0.5:0.95"] == pytest.approx(51 / 101, abs=1e-12)
    assert all(metrics[f"P@{k}"] == 0.5 for k in (0.5, 0.6, 0.7, 0.8, 0.9))
    assert metrics["overall_iou"] == pytest.approx(100 / (100 + 130))
    assert metrics["mean_iou"] == pytest.approx(0.5, abs=1e-6)

    # the same samples as masks through bifit.eval.a2d with the official pycocotools calls
    gt_a, gt_b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    gt_a[:10, :10] = True
    gt_b[10:15, :10] = True
    miss_b = np.zeros((20, 20), bool)
    miss_b[:8, 10:] = True
    official = a2d_metrics.evaluate([gt_a, gt_b], [np.stack([gt_a, np.zeros_like(gt_a)]), np.stack([miss_b, gt_b])],
                                    [counts[0].scores, counts[1].scores], [c.image_id for c in counts],
                                    backend="pycocotools")
    assert {k: official.as_dict()[k] for k in metrics if k in official.as_dict()} == {
        k: metrics[k] for k in metrics if k in official.as_dict()}


def test_jhmdb_end_to_end_and_skipped_sample_is_reported(jhmdb_root, tmp_path):
    metrics = evaluate_jhmdb(ConstantModel(full=0), CharTokenizer(), jhmdb_root, small_cfg(num_frames=3), None,
                             progress=False)
    check_ranges(metrics)
    assert metrics["num_samples"] == 3 * JHMDB.num_videos

    index = json.loads((jhmdb_root / "index.json").read_text())
    bad = jhmdb_root / index["samples"][0]["mask"]
    data = bad.read_bytes()
    bad.unlink()
    try:
        cfg = small_cfg(num_frames=3)
        with pytest.raises(Exception, match="missing mask PNG"):
            evaluate_jhmdb(ConstantModel(), CharTokenizer(), jhmdb_root, cfg, None, progress=False)
        cfg.data.skip_bad_samples = True
        out = tmp_path / "eval"
        skipped_metrics = evaluate_jhmdb(ConstantModel(), CharTokenizer(), jhmdb_root, cfg, out, progress=False)
    finally:
        bad.write_bytes(data)
    assert skipped_metrics["num_skipped"] == 1 and skipped_metrics["num_samples"] == 3 * JHMDB.num_videos - 1
    skipped = json.loads((out / "skipped_samples.json").read_text())
    assert [(r["id"], r["file"], r["index"]) for r in skipped] == [(index["samples"][0]["image_id"], str(bad), 0)]


def test_a2d_masks_smaller_than_frames_are_scored_on_the_gt_grid_and_counted_in_mlflow(tmp_path, monkeypatch):
    """The loader resizes a mask to its frames (as the official transforms do) instead of failing; predictions go
    back to the GT's size, and the evaluation stage counts such samples in its metrics JSON and MLflow run."""
    from mlflow.tracking import MlflowClient

    from bifit.loading import LoadedModel
    from pipeline import evaluate_dataset
    from pipeline.config import load_pipeline_config, resolve
    from tests.pipeline.test_datasets import _dataset_params

    raw = tmp_path / "raw"
    synthetic_a2d.generate_a2d(A2D, raw, progress=False)
    video = json.loads((raw / TEST_JSON).read_text())[0][1]
    video_path = raw / "Release" / "clips320H" / f"{video}.mp4"
    frames = np.stack(read_video_frames(video_path, "x"))
    synthetic_a2d.write_mp4(video_path, frames.repeat(2, axis=1).repeat(2, axis=2), A2D.fps)  # 2x the masks
    cfg = load_pipeline_config(_dataset_params(tmp_path))
    summary = preprocess_a2d(raw, resolve(cfg.datasets.prepared) / "a2d", progress=False)
    assert summary["test_size_mismatches"] >= 1
    monkeypatch.setattr(evaluate_dataset, "load_eval_model", lambda cfg, path, device=None: LoadedModel(
        ConstantModel(full=1), cfg.model, CharTokenizer(), {}, official=False))

    metrics = evaluate_dataset.evaluate_dataset(cfg, "a2d")
    assert metrics["size_mismatches"] == summary["test_size_mismatches"]
    assert json.loads((resolve(cfg.paths.metrics) / "a2d.json").read_text())["size_mismatches"] == metrics["size_mismatches"]
    # the whole-frame query on the GT grid: IoU_i = |G_i| / (H W), the resized samples included
    gt = load_coco_gt(resolve(cfg.datasets.prepared) / "a2d" / COCO_GT_JSON)
    areas = np.array([gt_mask(gt, iid).sum() for iid in gt["images"]], dtype=np.float64)
    assert metrics["num_samples"] == len(areas) and metrics["num_skipped"] == 0
    assert metrics["mean_iou"] == pytest.approx(np.mean(areas / (A2D.height * A2D.width)), rel=1e-6)
    client = MlflowClient(cfg.mlflow.resolved_uri())
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'evaluate-a2d'")
    assert [r.data.metrics["a2d_size_mismatches"] for r in runs] == [metrics["size_mismatches"]]
