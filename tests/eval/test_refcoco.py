"""RefCOCO/+/g metrics on hand-computed cases, and the evaluation loop on the synthetic val split."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from bifit.eval.a2d_engine import SampleCounts
from bifit.eval.refcoco import METRIC_NAMES, evaluate_refcoco, mask_counts, refexp_metrics, score
from bifit.prepare.refcoco import convert_refcoco
from bifit.synthetic.refcoco import SyntheticRefCOCOConfig, generate_refcoco
from tests.eval.fakes import WordTokenizer

CFG = SyntheticRefCOCOConfig(seed=9, num_train_images=1, num_val_images=3, num_test_images=1,
                             datasets=("refcoco",))


def masks(h, w, *boxes) -> np.ndarray:
    out = np.zeros((h, w), dtype=bool)
    for y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = True
    return out


def test_hand_computed_iou_and_precision():
    gts = [masks(10, 10, (0, 4, 0, 4)),  # 16 px
           masks(10, 10, (0, 1, 0, 10)),  # 10 px
           masks(10, 10, (5, 7, 5, 9)),  # 8 px
           masks(10, 10)]  # empty
    preds = [gts[0].copy(),  # IoU 1
             masks(10, 10, (0, 1, 5, 10), (1, 2, 0, 5)),  # 5 of 10 right, 5 wrong: 5 / 15
             masks(10, 10),  # nothing: 0 / 8
             masks(10, 10)]  # empty on empty: (0 + eps) / (0 + eps) = 1
    m = refexp_metrics(preds, gts)
    assert set(m) == set(METRIC_NAMES)
    assert m["overall_iou"] == pytest.approx((16 + 5 + 0 + 0) / (16 + 15 + 8 + 0))
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4, rel=1e-6)
    assert m["P@0.5"] == m["P@0.9"] == 0.5  # the two IoU-1 samples
    assert mask_counts(preds[1], gts[1]) == (5, 15)


def test_precision_is_strictly_above_the_threshold():
    gt = masks(20, 10, (0, 8, 0, 10))  # 80 px
    exactly_half = masks(20, 10, (0, 4, 0, 10))  # 40 px inside: IoU 40 / 80 = 0.5 exactly
    above = masks(20, 10, (0, 6, 0, 10))  # 60 / 80 = 0.75
    m = refexp_metrics([exactly_half, above], [gt, gt])
    assert m["P@0.5"] == 0.5 and m["P@0.7"] == 0.5 and m["P@0.8"] == 0.0
    assert m["overall_iou"] == pytest.approx(100 / 160) and m["mean_iou"] == pytest.approx(0.625)
    # the official float32 (inter + 1e-6) / (union + 1e-6): with small counts the eps survives in the numerator
    # only, and an exact 20 / 40 passes "> 0.5"
    small = refexp_metrics([masks(10, 10, (0, 2, 0, 10))], [masks(10, 10, (0, 4, 0, 10))])
    assert small["P@0.5"] == 1.0 and small["overall_iou"] == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        refexp_metrics([masks(4, 4)], [masks(4, 5)])
    with pytest.raises(ValueError, match="no samples"):
        refexp_metrics([], [])


def test_score_takes_the_highest_scoring_query_and_the_later_one_on_ties():
    counts = [SampleCounts("a", np.float32([0.1, 0.9, 0.3]), np.int64([10, 20, 30]), np.int64([10, 5, 30]), 30),
              SampleCounts("b", np.float32([0.7, 0.2, 0.7]), np.int64([4, 4, 8]), np.int64([0, 4, 8]), 8)]
    m = score(counts)
    # a: query 1, inter 5, union 20 + 30 - 5 = 45; b: tie 0 vs 2 -> query 2, inter 8, union 8
    assert m["overall_iou"] == pytest.approx(13 / 53)
    assert m["mean_iou"] == pytest.approx((5 / 45 + 1) / 2, rel=1e-6)
    assert m["P@0.9"] == 0.5


class WholeImageModel(nn.Module):
    """Query 1 predicts the whole padded image (score sigmoid(2)), the others nothing (sigmoid(-2))."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, images, image_mask, input_ids, attention_mask, image_sizes, **kw):
        b, t, _, hp, wp = images.shape
        self.calls.append((b, t))
        logits = torch.full((b, t, 3, 1), -2.0)
        logits[:, :, 1] = 2.0
        out = torch.full((b, t, 3, hp // 4, wp // 4), -10.0)
        out[:, :, 1] = 10.0
        return {"pred_logits": logits, "pred_masks": out}


def test_evaluation_on_the_val_split_scores_each_sentence_as_a_one_frame_clip(tmp_path):
    generate_refcoco(CFG, tmp_path / "coco", progress=False)
    convert_refcoco(tmp_path / "coco", tmp_path / "converted", "refcoco")
    model = WholeImageModel()
    metrics = evaluate_refcoco(model, WordTokenizer(), tmp_path / "coco", "refcoco", ann_root=tmp_path / "converted",
                               short_side=64, max_size=128, batch_size=3, out_dir=tmp_path / "eval", progress=False)
    val = json.loads((tmp_path / "converted/refcoco/instances_refcoco_val.json").read_text())
    areas = np.asarray([a["area"] for a in val["annotations"]], dtype=np.float64)
    pixels = CFG.height * CFG.width
    assert metrics["num_samples"] == len(areas) and metrics["num_skipped"] == 0
    assert all(t == 1 for _, t in model.calls) and sum(b for b, _ in model.calls) == len(areas)
    # the whole image is predicted: IoU_i = |G_i| / (H W)
    assert metrics["overall_iou"] == pytest.approx(areas.sum() / (pixels * len(areas)), rel=1e-12)
    assert metrics["mean_iou"] == pytest.approx(np.mean(areas / pixels), rel=1e-6)
    assert all(metrics[f"P@{k}"] == 0.0 for k in (0.5, 0.6, 0.7, 0.8, 0.9))
    assert json.loads((tmp_path / "eval/metrics.json").read_text()) == metrics
    rows = list(csv.DictReader((tmp_path / "eval/per_sample.csv").open()))
    assert [r["image_id"] for r in rows] == [f"refcoco/val/{i}" for i in range(len(areas))]
    assert all(r["query"] == "1" for r in rows) and [int(r["intersection"]) for r in rows] == areas.tolist()
    info = json.loads((tmp_path / "eval/eval_info.json").read_text())
    assert info["split"] == "val" and info["sentences"] == len(areas) and info["device"] == "cpu"
