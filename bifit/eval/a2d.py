"""A2D-Sentences / JHMDB-Sentences metrics, value-for-value as the official code computes them.

The official procedure (BIFIT ``engine.evaluate_a2d`` + ``datasets/a2d_eval.py``, GT JSON from MTTR's
``create_gt_in_coco_format.py``):

- one GT image and one GT annotation per sample, ``image_id`` a string, ``category_id`` 1;
- every query of every sample is submitted as a COCO detection (RLE of the binary mask, score = float(float32));
- mAP: pycocotools ``COCOeval(iouType='segm')`` with ``params.useCats = 0`` and defaults otherwise;
  ``mAP 0.5:0.95`` .. ``AP 0.5:0.95 L`` are ``stats[:6]``;
- P@K / IoU: per GT image the prediction ``sorted(preds, key=score)[-1]`` (score ties -> the later query), IoU in
  torch float32 as (inter + 1e-6) / (union + 1e-6), ``P@K = mean(iou > K)`` (strict), ``overall_iou =
  sum(inter) / sum(union)`` (no eps), ``mean_iou = mean(iou)``.

Two mAP protocols are reported: ``all queries`` (the official one, the number papers report) and
``best query only`` (only the query that P@K selects is submitted; not official, given for comparison).

mAP backends: ``"fast"`` (default) is an exact re-statement of ``COCOeval.evaluate/accumulate/summarize`` for
this setting (one GT per image, useCats=0), working on mask counts instead of RLEs: pycocotools' segm IoU of
a detection and a GT is i/u in float64 when they intersect and 0 otherwise (its bounding-box pre-check zeroes
every pair with an empty mask), matching is "first detection in score order with IoU >= t", and the accumulation
uses the same stable sorts and float64 expressions, so the stats are bit-identical. ``"pycocotools"`` runs the
official calls on RLE-encoded masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

__all__ = [
    "AP_NAMES",
    "PRECISION_THRESHOLDS",
    "METRIC_NAMES",
    "COCO_STATS_LABELS",
    "A2DEvaluation",
    "parse_image_id",
    "encode_mask",
    "build_coco_gt_dataset",
    "build_coco_gt",
    "build_coco_predictions",
    "pycocotools_segm_stats",
    "select_queries",
    "sample_iou",
    "precision_and_iou",
    "fast_segm_stats",
    "evaluate",
]

AP_NAMES = ("mAP 0.5:0.95", "AP 0.5", "AP 0.75", "AP 0.5:0.95 S", "AP 0.5:0.95 M", "AP 0.5:0.95 L")
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_NAMES = AP_NAMES + tuple(f"P@{k}" for k in PRECISION_THRESHOLDS) + ("overall_iou", "mean_iou")
COCO_STATS_LABELS = (
    "AP@[.5:.95] all maxDets=100", "AP@.5 all 100", "AP@.75 all 100", "AP@[.5:.95] small 100",
    "AP@[.5:.95] medium 100", "AP@[.5:.95] large 100", "AR@[.5:.95] all maxDets=1", "AR all 10", "AR all 100",
    "AR small 100", "AR medium 100", "AR large 100",
)
_EPS32 = np.float32(1e-6)  # a2d_eval's EPS, as torch applies it to a float32 tensor
_IMAGE_ID = re.compile(r"^v_(?P<video>.+)_f_(?P<frame>\d+)_i_(?P<instance>\d+)$")


def parse_image_id(image_id: str) -> tuple[str, int, int]:
    """Split an A2D-style image id ``v_<video>_f_<frame>_i_<instance>`` into (video, frame, instance)."""
    m = _IMAGE_ID.match(image_id)
    if m is None:
        raise ValueError(f"not an A2D image id (v_<video>_f_<frame>_i_<instance>): {image_id!r}")
    return m["video"], int(m["frame"]), int(m["instance"])


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Samples:
    gt: list[np.ndarray]  # (H, W) bool
    pred: list[np.ndarray]  # (Q, H, W) bool
    scores: list[np.ndarray]  # (Q,) float32
    image_ids: list[str]


def _check_samples(gt_masks, pred_masks, scores, image_ids) -> _Samples:
    n = len(gt_masks)
    for what, seq in (("pred_masks", pred_masks), ("scores", scores), ("image_ids", image_ids)):
        if len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries but gt_masks has {n}")
    if n == 0:
        raise ValueError("no samples to evaluate")
    ids = [str(i) for i in image_ids]
    if len(set(ids)) != n:
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"image ids must be unique (one GT per image id); duplicated: {dup}")
    out = _Samples([], [], [], ids)
    for i in range(n):
        g = np.asarray(gt_masks[i]).astype(bool, copy=False)
        p = np.asarray(pred_masks[i]).astype(bool, copy=False)
        s = np.asarray(scores[i])
        if g.ndim != 2:
            raise ValueError(f"gt mask of sample {i} ({ids[i]}) must be (H, W), got shape {g.shape}")
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[1:] != g.shape:
            raise ValueError(
                f"shape mismatch of gt {g.shape} and pred {p.shape} (expected (Q, H, W)) for sample {i} ({ids[i]})"
            )
        if p.shape[0] == 0:
            raise ValueError(f"sample {i} ({ids[i]}) has no prediction; every GT image needs at least one")
        s = s.reshape(-1)
        if s.shape[0] != p.shape[0]:
            raise ValueError(f"sample {i} ({ids[i]}) has {p.shape[0]} query masks but {s.shape[0]} scores")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"sample {i} ({ids[i]}) has non-finite scores {s.tolist()}")
        if g.size >= 1 << 24:
            raise ValueError(f"sample {i} ({ids[i]}) has {g.size} pixels: float32 counts are exact only below 2^24")
        out.gt.append(g)
        out.pred.append(p)
        out.scores.append(s.astype(np.float32))
    return out


# ----------------------------------------------------------------------------------------------------------------
# COCO format (the official procedure)
# ----------------------------------------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> dict:
    """RLE of one (H, W) binary mask as the postprocessor makes it: ``encode(uint8 (H, W, 1), order F)[0]``."""
    m = np.asarray(mask).astype(bool, copy=False)
    return mask_utils.encode(np.array(m[:, :, None], dtype=np.uint8, order="F"))[0]


def build_coco_gt_dataset(gt_masks: Sequence[np.ndarray], image_ids: Sequence[str]) -> dict:
    """The GT JSON content as MTTR's ``create_gt_in_coco_format.py`` writes it (one image, one annotation each).

    gt_masks: N masks (H_i, W_i); image_ids: N unique string ids. ``bbox`` is ``toBbox(rle)`` (segm ignores it).
    """
    if len(gt_masks) != len(image_ids):
        raise ValueError(f"{len(gt_masks)} GT masks but {len(image_ids)} image ids")
    images, annotations = [], []
    for k, (g, image_id) in enumerate(zip(gt_masks, image_ids)):
        g = np.asarray(g).astype(bool, copy=False)
        if g.ndim != 2:
            raise ValueError(f"gt mask of {image_id!r} must be (H, W), got shape {g.shape}")
        rle = mask_utils.encode(np.asfortranarray(g.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        images.append({"id": str(image_id), "height": int(g.shape[0]), "width": int(g.shape[1])})
        annotations.append({
            "id": k + 1, "image_id": str(image_id), "category_id": 1, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0,
        })
    return {"categories": [{"id": 1, "name": "dummy_class"}], "images": images, "annotations": annotations}


def build_coco_gt(gt_masks: Sequence[np.ndarray], image_ids: Sequence[str], path: str | Path | None = None) -> COCO:
    """COCO GT object. With ``path`` the JSON is written there and read back with ``COCO(path)`` (as officially);
    without, the same dict is indexed in memory (identical content: JSON round-trips every field unchanged)."""
    dataset = build_coco_gt_dataset(gt_masks, image_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress lines
        if path is not None:
            Path(path).write_text(json.dumps(dataset))
            return COCO(str(path))
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def build_coco_predictions(pred_masks, scores, image_ids, queries: Sequence[int] | None = None) -> list[dict]:
    """Detections as ``evaluate_a2d`` submits them: every query of every sample, in query order.

    With ``queries`` (one index per sample) only that query is submitted (the best-query-only protocol).
    """
    preds = []
    for i, image_id in enumerate(image_ids):
        masks = np.asarray(pred_masks[i])
        masks = masks[None] if masks.ndim == 2 else masks
        sc = np.asarray(scores[i], dtype=np.float32).reshape(-1)
        qs = range(masks.shape[0]) if queries is None else [int(queries[i])]
        for q in qs:
            preds.append({"image_id": str(image_id), "category_id": 1, "segmentation": encode_mask(masks[q]),
                          "score": float(sc[q])})
    return preds


def pycocotools_segm_stats(coco_gt: COCO, predictions: list[dict], *, quiet: bool = True) -> np.ndarray:
    """``COCOeval(coco_gt, coco_gt.loadRes(predictions), 'segm')`` with useCats = 0: the 12 ``stats``.

    ``predictions`` is deep-copied first (loadRes and COCOeval modify the dicts in place).
    """
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        coco_pred = coco_gt.loadRes(copy.deepcopy(predictions))
        ev = COCOeval(coco_gt, coco_pred, iouType="segm")
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# P@K and IoU (a2d_eval.calculate_precision_at_k_and_iou_metrics)
# ----------------------------------------------------------------------------------------------------------------


def select_queries(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Index of the query the official P@K loop picks per sample: ``sorted(preds, key=score)[-1]``, i.e. the
    highest score and, among equal scores, the later query. scores: N arrays (Q_i,). Returns int64 (N,)."""
    out = np.empty(len(scores), np.int64)
    for i, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float32).reshape(-1)
        out[i] = s.shape[0] - 1 - int(np.argmax(s[::-1]))
    return out


def sample_iou(intersection, union) -> np.ndarray:
    """``compute_iou`` in torch float32: (inter + 1e-6) / (union + 1e-6), every step rounded to float32.

    For counts >= 32 the eps vanishes, so an exact k/10 IoU becomes float32(k/10): 0.6 and 0.8 round up (and
    pass ``> K``), 0.5, 0.7 and 0.9 do not. Empty prediction on empty GT gives 1.
    """
    i32 = np.asarray(intersection, dtype=np.float32)
    u32 = np.asarray(union, dtype=np.float32)
    return (i32 + _EPS32) / (u32 + _EPS32)


def precision_and_iou(intersection, union) -> dict[str, float]:
    """P@K, overall IoU and mean IoU from the selected queries' integer counts (N,), as the official loop.

    ``iou.item()`` makes float64 copies of the float32 IoUs; ``P@K = count(iou > K) / N``; overall IoU is the
    float64 ratio of the summed counts (NaN where the summed union is 0, where the official code raises).
    """
    inter = np.asarray(intersection, dtype=np.int64)
    uni = np.asarray(union, dtype=np.int64)
    iou = sample_iou(inter, uni).astype(np.float64)
    n = iou.shape[0]
    out = {f"P@{k}": float(np.count_nonzero(iou > k) / n) for k in PRECISION_THRESHOLDS}
    total_u = float(uni.sum())
    out["overall_iou"] = float(inter.sum()) / total_u if total_u else float("nan")
    out["mean_iou"] = float(np.mean(iou))
    return out


# ----------------------------------------------------------------------------------------------------------------
# exact fast COCOeval (segm, useCats=0, one GT per image)
# ----------------------------------------------------------------------------------------------------------------


def fast_segm_stats(gt_area, det_image, det_score, det_area, det_inter, image_ids) -> np.ndarray:
    """COCOeval(segm, useCats=0).stats for one GT per image, from counts; bit-identical to pycocotools.

    gt_area: (N,) GT pixel counts, image n has id image_ids[n]. Detections (D,): det_image (index into the N
    images), det_score (float64 of the float32 score), det_area (pixel count), det_inter (pixel count of the
    intersection with the image's GT); detections of an image must appear in submission order.
    """
    p = Params(iouType="segm")
    gt_area = np.asarray(gt_area, dtype=np.int64)
    det_image = np.asarray(det_image, dtype=np.int64)
    det_score = np.asarray(det_score, dtype=np.float64)
    det_area = np.asarray(det_area, dtype=np.int64)
    det_inter = np.asarray(det_inter, dtype=np.int64)
    n_img = gt_area.shape[0]
    # pycocotools' mask IoU: i / u in float64 when the masks intersect, else 0
    union = det_area + gt_area[det_image] - det_inter
    iou = np.where(det_inter > 0, det_inter / np.maximum(union, 1), 0.0)

    # COCOeval visits images in np.unique (sorted string) order; per image, dets sorted by -score (mergesort)
    # and truncated to maxDets[-1]
    img_rank = np.empty(n_img, np.int64)
    img_rank[np.argsort(np.asarray([str(i) for i in image_ids]), kind="stable")] = np.arange(n_img)
    order = np.lexsort((np.arange(det_image.shape[0]), -det_score, img_rank[det_image]))
    d_img = img_rank[det_image[order]]  # sorted image position of each det, dets grouped by image
    d_score, d_area, d_iou = det_score[order], det_area[order], iou[order]
    starts = np.searchsorted(d_img, np.arange(n_img))
    rank = np.arange(d_img.shape[0]) - starts[d_img]
    keep = rank < p.maxDets[-1]
    d_img, d_score, d_area, d_iou, rank = d_img[keep], d_score[keep], d_area[keep], d_iou[keep], rank[keep]
    g_area = gt_area[np.argsort(img_rank)]  # GT area per sorted image position

    # matching (evaluateImg, maxDet = 100): the single GT goes to the first det, in score order, with
    # IoU >= min(t, 1 - 1e-10)
    thr = np.minimum(p.iouThrs, 1 - 1e-10)
    ok = d_iou[None, :] >= thr[:, None]  # (T, D)
    cum = np.cumsum(ok, axis=1)
    group_start = np.searchsorted(d_img, d_img, side="left")  # first det of the same image
    before = cum[:, group_start] - ok[:, group_start]  # hits in the image's earlier dets
    matched = ok & (cum - before == 1)  # (T, D)

    n_t, n_r, n_a, n_m = len(p.iouThrs), len(p.recThrs), len(p.areaRng), len(p.maxDets)
    precision = -np.ones((n_t, n_r, 1, n_a, n_m))
    recall = -np.ones((n_t, 1, n_a, n_m))
    for a, (lo, hi) in enumerate(p.areaRng):
        gt_ig = (g_area < lo) | (g_area > hi)
        npig = np.count_nonzero(~gt_ig)
        det_out = (d_area < lo) | (d_area > hi)
        dt_ig = np.where(matched, gt_ig[d_img][None, :], det_out[None, :])
        for m, max_det in enumerate(p.maxDets):
            if npig == 0:
                continue
            sel = rank < max_det
            scores = d_score[sel]
            inds = np.argsort(-scores, kind="mergesort")
            dtm = matched[:, sel][:, inds]
            dtig = dt_ig[:, sel][:, inds]
            tps = np.logical_and(dtm, np.logical_not(dtig))
            fps = np.logical_and(np.logical_not(dtm), np.logical_not(dtig))
            tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
            fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
            nd = tp_sum.shape[1]
            rc = tp_sum / npig
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            recall[:, 0, a, m] = rc[:, -1] if nd else 0
            if nd == 0:
                precision[:, :, 0, a, m] = 0
                continue
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            for t in range(n_t):
                idx = np.searchsorted(rc[t], p.recThrs, side="left")
                precision[t, :, 0, a, m] = np.where(idx < nd, pr[t, np.minimum(idx, nd - 1)], 0.0)
    return _summarize(precision, recall, p)


def _summarize(precision: np.ndarray, recall: np.ndarray, p: Params) -> np.ndarray:
    """``COCOeval.summarize()._summarizeDets`` on given precision (T,R,K,A,M) and recall (T,K,A,M) arrays."""

    def one(ap, iou_thr=None, area_rng="all", max_dets=100):
        aind = [i for i, a in enumerate(p.areaRngLbl) if a == area_rng]
        mind = [i for i, m in enumerate(p.maxDets) if m == max_dets]
        if ap == 1:
            s = precision
            if iou_thr is not None:
                s = s[np.where(iou_thr == p.iouThrs)[0]]
            s = s[:, :, :, aind, mind]
        else:
            s = recall
            if iou_thr is not None:
                s = s[np.where(iou_thr == p.iouThrs)[0]]
            s = s[:, :, aind, mind]
        return -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])

    md = p.maxDets
    return np.array([
        one(1), one(1, iou_thr=0.5, max_dets=md[2]), one(1, iou_thr=0.75, max_dets=md[2]),
        one(1, area_rng="small", max_dets=md[2]), one(1, area_rng="medium", max_dets=md[2]),
        one(1, area_rng="large", max_dets=md[2]),
        one(0, max_dets=md[0]), one(0, max_dets=md[1]), one(0, max_dets=md[2]),
        one(0, area_rng="small", max_dets=md[2]), one(0, area_rng="medium", max_dets=md[2]),
        one(0, area_rng="large", max_dets=md[2]),
    ], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# the metrics block
# ----------------------------------------------------------------------------------------------------------------


def _foreground_rows(mask: np.ndarray) -> slice:
    """Rows from the first to the last row holding foreground (an empty slice for an empty mask)."""
    flat = mask.reshape(-1)
    k = int(np.argmax(flat))
    if not flat[k]:
        return slice(0, 0)
    y0 = k // mask.shape[1]
    return slice(y0, y0 + int(np.flatnonzero(mask[y0:].any(axis=1))[-1]) + 1)


@dataclass
class A2DEvaluation:
    """Everything the A2D/JHMDB evaluation produces.

    ``metrics`` holds the official dict of ``engine.evaluate_a2d`` (keys ``METRIC_NAMES``: the all-queries
    mAP protocol, P@K, overall and mean IoU, fractions). ``best_query_only`` holds the six AP values when only
    the P@K-selected query of each sample is submitted: NOT the official protocol.
    """

    metrics: dict[str, float]
    best_query_only: dict[str, float]
    coco_stats_all_queries: np.ndarray  # (12,) COCOeval.stats, official protocol
    coco_stats_best_query_only: np.ndarray  # (12,)
    per_sample_iou: np.ndarray = field(repr=False)  # (N,) float32 IoU of the selected query
    per_sample_intersection: np.ndarray = field(repr=False)  # (N,) int64
    per_sample_union: np.ndarray = field(repr=False)  # (N,) int64
    selected_query: np.ndarray = field(repr=False)  # (N,) int64

    def as_dict(self) -> dict[str, float]:
        """Flat dict for logging: the official keys, then ``best-query-only <AP name>`` (non-official)."""
        out = dict(self.metrics)
        out.update({f"best-query-only {k}": v for k, v in self.best_query_only.items()})
        return out


def evaluate(gt_masks, pred_masks, scores, image_ids, *, backend: str = "fast",
             gt_json_path: str | Path | None = None) -> A2DEvaluation:
    """The A2D/JHMDB metrics block from binary masks.

    gt_masks: N bool masks (H_i, W_i); pred_masks: N bool stacks (Q_i, H_i, W_i), the thresholded query masks;
    scores: N float arrays (Q_i,) (used as float32, like the model's outputs); image_ids: N unique string ids.
    backend: ``"fast"`` (exact count-based COCOeval) or ``"pycocotools"`` (official calls on RLEs; then
    ``gt_json_path`` optionally writes the GT JSON and reads it back like the official run).
    """
    s = _check_samples(gt_masks, pred_masks, scores, image_ids)
    n = len(s.gt)
    gt_area = np.array([np.count_nonzero(g) for g in s.gt], np.int64)
    det_image, det_score, det_area, det_inter = [], [], [], []
    for i in range(n):
        g, p = s.gt[i], s.pred[i]
        q = p.shape[0]
        rows = _foreground_rows(g)  # intersections can only lie in the GT's rows
        det_image.append(np.full(q, i))
        det_score.append(s.scores[i].astype(np.float64))
        det_area.append([np.count_nonzero(p[k]) for k in range(q)])
        det_inter.append([np.count_nonzero(p[k, rows] & g[rows]) for k in range(q)])
    det_image = np.concatenate(det_image)
    det_score = np.concatenate(det_score)
    det_area = np.concatenate([np.asarray(a, np.int64) for a in det_area])
    det_inter = np.concatenate([np.asarray(a, np.int64) for a in det_inter])

    chosen = select_queries(s.scores)
    offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in s.pred])[:-1]])
    top = offsets + chosen
    inter, union = det_inter[top], det_area[top] + gt_area - det_inter[top]

    if backend == "fast":
        stats_all = fast_segm_stats(gt_area, det_image, det_score, det_area, det_inter, s.image_ids)
        stats_top = fast_segm_stats(gt_area, det_image[top], det_score[top], det_area[top], det_inter[top],
                                    s.image_ids)
    elif backend == "pycocotools":
        coco_gt = build_coco_gt(s.gt, s.image_ids, gt_json_path)
        stats_all = pycocotools_segm_stats(coco_gt, build_coco_predictions(s.pred, s.scores, s.image_ids))
        stats_top = pycocotools_segm_stats(coco_gt, build_coco_predictions(s.pred, s.scores, s.image_ids, chosen))
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'fast' or 'pycocotools'")

    metrics = {k: float(v) for k, v in zip(AP_NAMES, stats_all[:6])}
    metrics.update(precision_and_iou(inter, union))
    return A2DEvaluation(
        metrics=metrics,
        best_query_only={k: float(v) for k, v in zip(AP_NAMES, stats_top[:6])},
        coco_stats_all_queries=stats_all,
        coco_stats_best_query_only=stats_top,
        per_sample_iou=sample_iou(inter, union),
        per_sample_intersection=inter,
        per_sample_union=union,
        selected_query=chosen,
    )
