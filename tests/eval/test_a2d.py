"""A2D / JHMDB metrics: float32 IoU gotchas, query selection, hand-computed mAP, both mAP backends, goldens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bifit.eval import a2d

# ----------------------------------------------------------------------------------------------------------------
# P@K and IoU
# ----------------------------------------------------------------------------------------------------------------


def official_iou(inter: int, union: int) -> float:
    """a2d_eval.compute_iou's arithmetic on float32 tensors, as the official loop runs it."""
    i, u = torch.tensor([float(inter)]), torch.tensor([float(union)])
    return ((i + 1e-6) / (u + 1e-6)).item()


def test_sample_iou_float32_exact_tenths():
    inter = np.array([1000, 1200, 1400, 1600, 1800])
    union = np.full(5, 2000)
    iou = a2d.sample_iou(inter, union)
    assert iou.dtype == np.float32
    np.testing.assert_array_equal(iou.astype(np.float64),
                                  [0.5, 0.6000000238418579, 0.699999988079071, 0.800000011920929, 0.8999999761581421])
    out = a2d.precision_and_iou(inter, union)
    # float32 k/10 against float64 K with a strict '>': 0.6 and 0.8 pass their own threshold, 0.5/0.7/0.9 do not
    assert out["P@0.5"] == 4 / 5
    assert out["P@0.6"] == 4 / 5
    assert out["P@0.7"] == 2 / 5
    assert out["P@0.8"] == 2 / 5
    assert out["P@0.9"] == 0.0
    assert out["overall_iou"] == 0.7
    assert out["mean_iou"] == np.mean(iou.astype(np.float64))


def test_sample_iou_empty_cases_and_torch_agreement():
    assert a2d.sample_iou(0, 0) == 1.0  # empty prediction on an empty GT
    assert float(a2d.sample_iou(0, 1140)) == 8.771929849160642e-10  # all queries empty: ~1e-6 / |G|
    rng = np.random.default_rng(0)
    inter = np.concatenate([rng.integers(0, 40, 300), rng.integers(0, 200000, 300)])
    union = inter + np.concatenate([rng.integers(0, 40, 300), rng.integers(0, 200000, 300)])
    ours = a2d.sample_iou(inter, union).astype(np.float64)
    np.testing.assert_array_equal(ours, [official_iou(i, u) for i, u in zip(inter, union)])


def test_overall_iou_has_no_eps_and_empty_union_is_nan():
    out = a2d.precision_and_iou([0, 0], [0, 0])
    assert out["mean_iou"] == 1.0 and out["P@0.9"] == 1.0
    assert np.isnan(out["overall_iou"])


def test_select_queries_ties_go_to_the_later_query():
    scores = [np.array([0.3, 0.875, 0.875, 0.1], np.float32), np.array([0.9, 0.2], np.float32),
              np.array([0.5], np.float32)]
    np.testing.assert_array_equal(a2d.select_queries(scores), [2, 0, 0])


# ----------------------------------------------------------------------------------------------------------------
# mAP
# ----------------------------------------------------------------------------------------------------------------


def square(h, w, y0, x0, side):
    m = np.zeros((h, w), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


@pytest.mark.parametrize("backend", ["fast", "pycocotools"])
def test_perfect_predictions(backend):
    h, w = 128, 128
    gts = [square(h, w, 5, 5, 10), square(h, w, 20, 20, 45), square(h, w, 10, 10, 110)]  # small, medium, large
    preds = [np.stack([g, np.zeros_like(g)]) for g in gts]
    scores = [np.array([0.9, 0.1], np.float32)] * 3
    res = a2d.evaluate(gts, preds, scores, ["c", "a", "b"], backend=backend)
    for k in a2d.METRIC_NAMES:
        assert res.metrics[k] == pytest.approx(1.0), k
    assert res.coco_stats_all_queries[6:].tolist() == pytest.approx([1.0] * 6)


@pytest.mark.parametrize("backend", ["fast", "pycocotools"])
def test_hand_computed_ap_both_protocols(backend):
    h, w = 64, 64
    g_a, g_b = square(h, w, 5, 5, 20), square(h, w, 30, 30, 20)  # both small (400 px)
    wrong = square(h, w, 40, 0, 10)
    preds = [np.stack([wrong, g_a]), np.stack([g_b, wrong])]
    scores = [np.array([0.9, 0.5], np.float32), np.array([0.8, 0.1], np.float32)]
    res = a2d.evaluate([g_a, g_b], preds, scores, ["A", "B"], backend=backend)
    # all queries, by score: A.q0 (FP), B.q0 (TP), A.q1 (TP), B.q1 (FP): precision envelope 2/3 up to recall 1
    assert res.metrics["mAP 0.5:0.95"] == pytest.approx(2 / 3)
    assert res.coco_stats_all_queries[4] == -1  # no medium GT
    assert res.metrics["AP 0.5:0.95 S"] == pytest.approx(2 / 3)
    # best query only: A.q0 (FP), B.q0 (TP): precision 1/2 up to recall 1/2, 51 of the 101 recall points
    assert res.best_query_only["mAP 0.5:0.95"] == pytest.approx(0.5 * 51 / 101)
    assert res.selected_query.tolist() == [0, 0]
    assert res.metrics["P@0.5"] == 0.5 and res.metrics["overall_iou"] == pytest.approx(400 / (400 + 100 + 400))


@pytest.mark.parametrize("backend", ["fast", "pycocotools"])
def test_area_exactly_1024_is_small_and_medium(backend):
    g = square(64, 64, 10, 10, 32)
    res = a2d.evaluate([g], [g[None]], [np.array([0.7], np.float32)], ["x"], backend=backend)
    s = res.coco_stats_all_queries
    assert s[3] == pytest.approx(1.0) and s[4] == pytest.approx(1.0)  # small and medium both include 1024
    assert s[5] == -1


@pytest.mark.parametrize("backend", ["fast", "pycocotools"])
def test_empty_gt(backend):
    g = np.zeros((32, 32), bool)
    res = a2d.evaluate([g], [np.zeros((2, 32, 32), bool)], [np.array([0.4, 0.6], np.float32)], ["e"],
                       backend=backend)
    assert res.metrics["mean_iou"] == 1.0 and res.metrics["P@0.9"] == 1.0  # IoU 1 with the eps
    assert res.metrics["mAP 0.5:0.95"] == 0.0  # pycocotools: IoU 0 for empty masks, the GT stays unmatched


def random_case(rng, n, q):
    gts, preds, scores, ids = [], [], [], []
    for i in range(n):
        h, w = [(24, 32), (40, 40), (64, 48)][rng.integers(3)]
        g = np.zeros((h, w), bool)
        if rng.random() > 0.1:
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            g[y0 : y0 + rng.integers(1, h // 2 + 1), x0 : x0 + rng.integers(1, w // 2 + 1)] = True
        p = np.zeros((q, h, w), bool)
        for k in range(q):
            kind = rng.integers(5)
            if kind == 1:
                p[k] = g
            elif kind >= 2:
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                p[k, y0 : y0 + rng.integers(1, h // 2 + 1), x0 : x0 + rng.integers(1, w // 2 + 1)] = True
                if kind == 3:
                    p[k] |= g
        tied = rng.random() < 0.5
        s = (rng.choice([0.25, 0.5, 0.75], q) if tied else rng.random(q)).astype(np.float32)
        gts.append(g)
        preds.append(p)
        scores.append(s)
        ids.append(f"v_{rng.integers(100):02d}_f_{i}_i_0")
    return gts, preds, scores, ids


def test_fast_backend_equals_pycocotools_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(12):
        case = random_case(rng, int(rng.integers(1, 25)), int(rng.integers(1, 6)))
        if len(set(case[3])) < len(case[3]):
            continue
        fast = a2d.evaluate(*case, backend="fast")
        ref = a2d.evaluate(*case, backend="pycocotools")
        np.testing.assert_array_equal(fast.coco_stats_all_queries, ref.coco_stats_all_queries)
        np.testing.assert_array_equal(fast.coco_stats_best_query_only, ref.coco_stats_best_query_only)
        assert fast.metrics == ref.metrics


def test_gt_json_round_trip(tmp_path):
    case = random_case(np.random.default_rng(1), 6, 3)
    from_file = a2d.evaluate(*case, backend="pycocotools", gt_json_path=tmp_path / "gt.json")
    in_memory = a2d.evaluate(*case, backend="pycocotools")
    np.testing.assert_array_equal(from_file.coco_stats_all_queries, in_memory.coco_stats_all_queries)
    dataset = a2d.build_coco_gt_dataset(case[0], case[3])
    ann = dataset["annotations"][0]
    assert dataset["categories"] == [{"id": 1, "name": "dummy_class"}]
    assert ann["id"] == 1 and ann["category_id"] == 1 and ann["iscrowd"] == 0
    assert isinstance(ann["segmentation"]["counts"], str) and ann["area"] == float(case[0][0].sum())


def test_input_errors_name_the_sample():
    g = np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match=r"shape mismatch.*sample 1 \(b\)"):
        a2d.evaluate([g, g], [g[None], np.zeros((1, 8, 9), bool)], [[0.5], [0.5]], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        a2d.evaluate([g, g], [g[None], g[None]], [[0.5], [0.5]], ["a", "a"])
    with pytest.raises(ValueError, match="2 query masks but 1 scores"):
        a2d.evaluate([g], [np.stack([g, g])], [[0.5]], ["a"])
    with pytest.raises(ValueError, match="backend"):
        a2d.evaluate([g], [g[None]], [[0.5]], ["a"], backend="nope")
    assert a2d.parse_image_id("v_aB_c-1_f_97_i_3") == ("aB_c-1", 97, 3)


# ----------------------------------------------------------------------------------------------------------------
# golden file (official evaluate_a2d outputs)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fast", "pycocotools"])
def test_golden(golden_dir, backend):
    with np.load(golden_dir / "a2d_metrics_public.npz", allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    n = int(d["num_samples"])
    keys = [f"s{i:03d}" for i in range(n)]
    res = a2d.evaluate([d[f"{k}__gt"] for k in keys], [d[f"{k}__pred"] for k in keys],
                       [d[f"{k}__scores"] for k in keys], [str(i) for i in d["image_ids"]], backend=backend)
    assert tuple(d["metric_names"]) == a2d.METRIC_NAMES
    np.testing.assert_allclose([res.metrics[k] for k in a2d.METRIC_NAMES], d["metric_values"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.coco_stats_all_queries, d["coco_stats_all_queries"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.coco_stats_best_query_only, d["coco_stats_top1"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.per_sample_iou.astype(np.float64), d["per_sample_iou"])
    np.testing.assert_array_equal(res.per_sample_intersection, d["per_sample_intersection"])
    np.testing.assert_array_equal(res.per_sample_union, d["per_sample_union"])
    np.testing.assert_array_equal(res.selected_query, d["per_sample_selected_query"])
    tags = list(d["case_tags"])
    assert res.selected_query[tags.index("tied_top_scores_later_query_wins")] == 2
    flat = res.as_dict()
    assert list(flat)[:13] == list(a2d.METRIC_NAMES) and "best-query-only mAP 0.5:0.95" in flat
