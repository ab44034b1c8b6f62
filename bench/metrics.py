"""Metric speed: ours vs a faithful re-statement of the official evaluation code, side by side in one run.

    python bench/metrics.py [--runs 5] [--threads 1]

Setups (``ANCHORS_S`` holds the official implementation's figures measured on a 2-core CPU machine like ours):
- DAVIS J and F for one object, 50 frames at 480x854 (a smooth blob that moves and deforms; the prediction
  is the blob seen through low-frequency noise, so it has a ragged boundary and the odd false-positive speck).
  Reference arm: davis2017 ``db_eval_iou`` on the stack and ``db_eval_boundary`` (per-frame ``f_measure`` with
  ``_seg2bmap`` written with the toolkit's shifts and a disk dilation), restated below. scipy's
  ``binary_dilation`` with ``disk(r)`` stands in for ``cv2.dilate`` (no OpenCV here); it is slower than
  cv2, so the official anchors are printed too.
- A2D metrics block: 1000 samples at 320x320, 5 queries, from binary masks. Reference arm: the official
  procedure, i.e. RLE-encode every query mask (post-processor), ``COCO(gt.json)``, ``loadRes``, ``COCOeval``
  segm with useCats=0, then ``calculate_precision_at_k_and_iou_metrics`` (per-sample decode and torch float32
  IoU). The GT JSON is built before timing (it is a file in the official pipeline). Also timed: the
  reference without the prediction encoding ("from RLE"), the anchor's other row.

Prints medians of ours and the reference with the speedup (reference / ours), checks that both arms give
identical values, and writes the numbers to bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bifit.eval import a2d, davis  # noqa: E402

ANCHORS_S = {"davis_J": 0.0458, "davis_F": 0.165, "davis_JF": 0.218, "a2d_from_rle": 0.52, "a2d_from_masks": 0.94}
REQUIRED_SPEEDUP = {"davis_JF": 10.0, "a2d_from_masks": 3.0}


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def _noise(rng, h, w, cell=8, sigma=2.0):
    small = ndi.gaussian_filter(rng.standard_normal((h // cell + 2, w // cell + 2)), sigma)
    return ndi.zoom(small, cell, order=1)[:h, :w]


def davis_clip(t=50, h=480, w=854, seed=0):
    """(gt, pred) bool (T, H, W): one deforming, moving blob and a noisy prediction of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gt, pred = np.zeros((t, h, w), bool), np.zeros((t, h, w), bool)
    for i in range(t):
        cy, cx = h * (0.45 + 0.1 * np.sin(i / 7)), w * (0.3 + 0.4 * i / t)
        ang = np.arctan2(yy - cy, xx - cx)
        rad = np.hypot((yy - cy) / 110, (xx - cx) / 150)
        wob = 1 + 0.15 * np.sin(3 * ang + i / 5) + 0.08 * np.sin(5 * ang - i / 3)
        gt[i] = rad < wob
        pred[i] = rad + 0.6 * _noise(rng, h, w) < wob * 1.02
    return gt, pred


def a2d_samples(n=1000, q=5, h=320, w=320, seed=0):
    """n GT masks (H, W), n query stacks (Q, H, W), n float32 score vectors and string image ids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gts, preds, scores, ids = [], [], [], []
    for i in range(n):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
        rad = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        g = rad < 1
        p = np.zeros((q, h, w), bool)
        good = rng.integers(q)
        for k in range(q):
            kind = rng.random()
            if k == good:
                p[k] = rad + rng.uniform(0.1, 0.5) * _noise(rng, h, w, cell=16, sigma=1.0) < 1
            elif kind < 0.15:
                continue  # empty query
            else:
                oy, ox = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
                p[k] = np.hypot((yy - oy) / ry, (xx - ox) / rx) < rng.uniform(0.6, 1.4)
        s = rng.random(q).astype(np.float32)
        s[good] = max(s[good], np.float32(rng.uniform(0.3, 1.0)))
        gts.append(g)
        preds.append(p)
        scores.append(s)
        ids.append(f"v_{i:05d}bench_f_{rng.integers(1, 200)}_i_{rng.integers(0, 6)}")
    return gts, preds, scores, ids


# ----------------------------------------------------------------------------------------------------------------
# reference arm: the davis2017 toolkit, restated (np.bool -> bool; cv2.dilate -> scipy binary_dilation)
# ----------------------------------------------------------------------------------------------------------------


def ref_db_eval_iou(annotation, segmentation, void_pixels=None):
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    void_pixels = np.zeros_like(segmentation) if void_pixels is None else void_pixels.astype(bool)
    inters = np.sum((segmentation & annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    union = np.sum((segmentation | annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    j = inters / union
    if j.ndim == 0:
        j = 1 if np.isclose(union, 0) else j
    else:
        j[np.isclose(union, 0)] = 1
    return j


def ref_seg2bmap(seg):
    seg = seg.astype(bool)
    seg[seg > 0] = 1
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def ref_disk(radius):
    offs = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offs, offs)
    return np.array((x**2 + y**2) <= radius**2, dtype=np.uint8)


def ref_f_measure(foreground_mask, gt_mask, void_pixels=None, bound_th=0.008):
    void_pixels = np.zeros_like(foreground_mask).astype(bool) if void_pixels is None else void_pixels.astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = ref_seg2bmap(foreground_mask * np.logical_not(void_pixels))
    gt_boundary = ref_seg2bmap(gt_mask * np.logical_not(void_pixels))
    selem = ref_disk(int(bound_pix)).astype(bool)
    fg_dil = ndi.binary_dilation(fg_boundary, structure=selem).astype(np.uint8)  # cv2.dilate stand-in
    gt_dil = ndi.binary_dilation(gt_boundary, structure=selem).astype(np.uint8)
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg = np.sum(fg_boundary)
    n_gt = np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision = np.sum(fg_match) / float(n_fg)
        recall = np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        return 0
    return 2 * precision * recall / (precision + recall)


def ref_db_eval_boundary(annotation, segmentation, void_pixels=None, bound_th=0.008):
    f_res = np.zeros(annotation.shape[0])
    for i in range(annotation.shape[0]):
        v = None if void_pixels is None else void_pixels[i]
        f_res[i] = ref_f_measure(segmentation[i], annotation[i], v, bound_th=bound_th)
    return f_res


# ----------------------------------------------------------------------------------------------------------------
# reference arm: the official A2D block (engine.evaluate_a2d + a2d_eval.py)
# ----------------------------------------------------------------------------------------------------------------


def ref_compute_iou(outputs: torch.Tensor, labels: torch.Tensor, eps=1e-6):
    outputs = outputs.int()
    intersection = (outputs & labels).float().sum((1, 2))
    union = (outputs | labels).float().sum((1, 2))
    iou = (intersection + eps) / (union + eps)
    return iou, intersection, union


def ref_precision_at_k_and_iou(coco_gt: COCO, coco_pred: COCO):
    counters_by_iou = {iou: 0 for iou in [0.5, 0.6, 0.7, 0.8, 0.9]}
    total_intersection_area = 0
    total_union_area = 0
    ious_list = []
    for instance in coco_gt.imgs.keys():
        gt_annot = coco_gt.imgToAnns[instance][0]
        gt_mask = mask_utils.decode(gt_annot["segmentation"])
        pred_annots = coco_pred.imgToAnns[instance]
        pred_annot = sorted(pred_annots, key=lambda a: a["score"])[-1]
        pred_mask = mask_utils.decode(pred_annot["segmentation"])
        iou, intersection, union = ref_compute_iou(torch.tensor(pred_mask).unsqueeze(0),
                                                   torch.tensor(gt_mask).unsqueeze(0))
        iou, intersection, union = iou.item(), intersection.item(), union.item()
        for iou_threshold in counters_by_iou.keys():
            if iou > iou_threshold:
                counters_by_iou[iou_threshold] += 1
        total_intersection_area += intersection
        total_union_area += union
        ious_list.append(iou)
    num_samples = len(ious_list)
    precision_at_k = np.array(list(counters_by_iou.values())) / num_samples
    overall_iou = total_intersection_area / total_union_area
    mean_iou = np.mean(ious_list)
    return precision_at_k, overall_iou, mean_iou


def ref_encode_predictions(preds, scores, ids):
    """The post-processor's output: per query an RLE and a float score (A2DSentencesPostProcess + engine)."""
    out = []
    for p, s, image_id in zip(preds, scores, ids):
        rles = [mask_utils.encode(np.array(m[:, :, None], dtype=np.uint8, order="F"))[0] for m in p]
        for score, rle in zip(torch.from_numpy(s), rles):
            out.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score.item()})
    return out


def ref_evaluate_a2d(predictions, gt_json):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_json)
        coco_pred = coco_gt.loadRes(predictions)
        coco_eval = COCOeval(coco_gt, coco_pred, iouType="segm")
        coco_eval.params.useCats = 0
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    ap_labels = ["mAP 0.5:0.95", "AP 0.5", "AP 0.75", "AP 0.5:0.95 S", "AP 0.5:0.95 M", "AP 0.5:0.95 L"]
    eval_metrics = {lab: m for lab, m in zip(ap_labels, coco_eval.stats[:6])}
    precision_at_k, overall_iou, mean_iou = ref_precision_at_k_and_iou(coco_gt, coco_pred)
    eval_metrics.update({f"P@{k}": m for k, m in zip([0.5, 0.6, 0.7, 0.8, 0.9], precision_at_k)})
    eval_metrics.update({"overall_iou": overall_iou, "mean_iou": mean_iou})
    return eval_metrics


# ----------------------------------------------------------------------------------------------------------------


def timed(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def entry(ours, ref, anchor, required=None, ours_runs=(), ref_runs=()):
    out = {"ours_s": ours, "reference_s": ref, "speedup": ref / ours, "official_anchor_s": anchor,
           "speedup_vs_official_anchor": anchor / ours, "ours_runs": list(ours_runs), "reference_runs": list(ref_runs)}
    if required is not None:
        out["required_speedup"] = required
        out["meets_requirement"] = bool(ref / ours >= required)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "metrics.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}

    # ---------------- DAVIS J & F ----------------
    gt, pred = davis_clip()
    j_ours, f_ours = davis.region_similarity(gt, pred), davis.boundary_measure(gt, pred)
    j_ref, f_ref = ref_db_eval_iou(gt, pred), ref_db_eval_boundary(gt, pred)
    davis_diff = {"J": float(np.abs(j_ours - j_ref).max()), "F": float(np.abs(f_ours - f_ref).max())}
    davis_identical = bool(np.array_equal(j_ours, j_ref) and np.array_equal(f_ours, f_ref))
    runs = args.runs
    jo, jo_all = timed(lambda: davis.region_similarity(gt, pred), runs)
    jr, jr_all = timed(lambda: ref_db_eval_iou(gt, pred), runs)
    fo, fo_all = timed(lambda: davis.boundary_measure(gt, pred), runs)
    fr, fr_all = timed(lambda: ref_db_eval_boundary(gt, pred), max(1, runs // 2))
    bo, bo_all = timed(lambda: (davis.region_similarity(gt, pred), davis.boundary_measure(gt, pred)), runs)
    results["davis_J"] = entry(jo, jr, ANCHORS_S["davis_J"], None, jo_all, jr_all)
    results["davis_F"] = entry(fo, fr, ANCHORS_S["davis_F"], None, fo_all, fr_all)
    results["davis_JF"] = entry(bo, jr + fr, ANCHORS_S["davis_JF"], REQUIRED_SPEEDUP["davis_JF"], bo_all)
    results["davis_JF"]["reference_s_note"] = "reference J median + reference F median"

    # ---------------- A2D block ----------------
    gts, preds, scores, ids = a2d_samples()
    with tempfile.TemporaryDirectory() as tmp:
        gt_json = str(Path(tmp) / "gt.json")
        a2d.build_coco_gt(gts, ids, gt_json)  # MTTR-style GT JSON on disk, as the official run reads it
        rle_preds = ref_encode_predictions(preds, scores, ids)

        def ref_from_masks():
            return ref_evaluate_a2d(ref_encode_predictions(preds, scores, ids), gt_json)

        def ref_from_rle():
            return ref_evaluate_a2d([dict(p) for p in rle_preds], gt_json)

        def ours():
            return a2d.evaluate(gts, preds, scores, ids)

        ref_metrics = ref_from_masks()
        ours_eval = ours()
        a2d_diff = {k: abs(float(ours_eval.metrics[k]) - float(ref_metrics[k])) for k in a2d.METRIC_NAMES}
        a2d_identical = all(float(ours_eval.metrics[k]) == float(ref_metrics[k]) for k in a2d.METRIC_NAMES)
        ao, ao_all = timed(ours, runs)
        ar, ar_all = timed(ref_from_masks, max(1, runs // 2))
        arr, arr_all = timed(ref_from_rle, max(1, runs // 2))
    results["a2d_from_masks"] = entry(ao, ar, ANCHORS_S["a2d_from_masks"], REQUIRED_SPEEDUP["a2d_from_masks"],
                                      ao_all, ar_all)
    results["a2d_from_rle"] = entry(ao, arr, ANCHORS_S["a2d_from_rle"], None, ao_all, arr_all)
    results["a2d_from_rle"]["note"] = "ours still starts from binary masks; the reference skips the RLE encoding"

    results["meta"] = {
        "threads": args.threads, "runs": runs, "torch": torch.__version__, "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "davis_setup": "1 object, 50 frames 480x854, disk radius 8",
        "a2d_setup": "1000 samples 320x320, 5 queries, binary masks in",
        "davis_identical_values": davis_identical, "davis_max_abs_diff": davis_diff,
        "davis_JF_mean_ours": [float(j_ours.mean()), float(f_ours.mean())],
        "a2d_identical_values": a2d_identical, "a2d_max_abs_diff": max(a2d_diff.values()),
        "a2d_metrics_ours": ours_eval.metrics,
    }

    print(f"{'setup':<16}{'ours (ms)':>11}{'reference (ms)':>16}{'speedup':>9}{'required':>10}"
          f"{'official anchor (ms)':>22}{'vs anchor':>11}")
    for name in ("davis_J", "davis_F", "davis_JF", "a2d_from_masks", "a2d_from_rle"):
        r = results[name]
        req = f"{r['required_speedup']:.0f}x" if "required_speedup" in r else "-"
        print(f"{name:<16}{r['ours_s'] * 1e3:>11.1f}{r['reference_s'] * 1e3:>16.1f}{r['speedup']:>8.1f}x{req:>10}"
              f"{r['official_anchor_s'] * 1e3:>22.1f}{r['speedup_vs_official_anchor']:>10.1f}x")
    print(f"DAVIS values identical: {davis_identical} (max |diff| {davis_diff}); "
          f"A2D values identical: {a2d_identical} (max |diff| {max(a2d_diff.values()):.1e})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    ok = davis_identical and a2d_identical and all(results[k]["meets_requirement"] for k in REQUIRED_SPEEDUP)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
