"""RefCOCO / RefCOCO+ / RefCOCOg evaluation: mask IoU (overall and mean) and precision at IoU thresholds, on the
val split by default.

Every sentence of the split is one sample: the image alone as a 1-frame clip (:class:`bifit.data.refcoco.
RefCOCODataset` with ``train=False``), resized like the A2D/JHMDB evaluation (shorter side 360, longer side at
most 640, then normalised). The model's per-query scores and masks are post-processed as for A2D
(:func:`bifit.eval.a2d_engine.postprocess_batch`: x4 bilinear upsampling in padded space, ``sigmoid > 0.5``, crop,
nearest resize to the original image size), and the highest-scoring query is the prediction (ties to the later
query). The metrics are the referring-segmentation ones A2D-Sentences also reports, computed by the same functions
(:mod:`bifit.eval.a2d`): per-sample IoU ``(|P ∩ G| + 1e-6) / (|P ∪ G| + 1e-6)`` in float32, **overall IoU** =
cumulative intersection / cumulative union, **mean IoU** = the mean of the per-sample IoUs, **P@K** for K in
0.5 ... 0.9 = the fraction of samples with IoU > K (strict), the mask metrics referring-expression segmentation
reports; no box or COCO mAP metric is computed here.

Entry point: :func:`evaluate_refcoco` (model, tokenizer, data root, dataset name) -> metrics dict; with
``out_dir`` it writes ``metrics.json``, ``per_sample.csv``, ``skipped_samples.json`` and ``eval_info.json`` like
the A2D evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bifit.data.refcoco import RefCOCODataset
from bifit.data.transforms import make_eval_transforms
from bifit.eval.a2d import PRECISION_THRESHOLDS, precision_and_iou, select_queries
from bifit.eval.a2d_engine import MASK_THRESHOLD, SampleCounts, run_inference, write_outputs
from bifit.inference import inference_settings
from bifit.prepare.a2d import coco_rle

log = logging.getLogger(__name__)

METRIC_NAMES = tuple(f"P@{k}" for k in PRECISION_THRESHOLDS) + ("overall_iou", "mean_iou")
PROTOCOL = ("highest-scoring query per sentence; mask IoU overall (cumulative) and mean, P@K with IoU > K "
            "(as for A2D-Sentences)")


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two (H, W) binary masks."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    inter = int(np.count_nonzero(pred & gt))
    return inter, int(np.count_nonzero(pred)) + int(np.count_nonzero(gt)) - inter


def refexp_metrics(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> dict[str, float]:
    """The metrics from one binary prediction per sample (already the chosen query): P@K, overall and mean IoU."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predictions but {len(gt_masks)} ground-truth masks")
    if not gt_masks:
        raise ValueError("no samples to evaluate")
    inter, union = zip(*(mask_counts(p, g) for p, g in zip(pred_masks, gt_masks)))
    return precision_and_iou(np.asarray(inter), np.asarray(union))


def score(counts: Sequence[SampleCounts]) -> dict[str, float]:
    """The metrics from per-sample counts of every query (the highest-scoring one is the prediction)."""
    if not counts:
        raise ValueError("no samples to score")
    chosen = select_queries([c.scores for c in counts])
    inter = np.asarray([c.det_inter[q] for c, q in zip(counts, chosen)], dtype=np.int64)
    area = np.asarray([c.det_area[q] for c, q in zip(counts, chosen)], dtype=np.int64)
    gt_area = np.asarray([c.gt_area for c in counts], dtype=np.int64)
    return precision_and_iou(inter, area + gt_area - inter)


class _GroundTruthView(Mapping):
    """The evaluation dataset's ground truth as the A2D inference loop reads it (``gt["annotations"][image_id]
    ["segmentation"]``, an RLE), decoded one sample at a time."""

    def __init__(self, dataset: RefCOCODataset):
        self.dataset = dataset
        self.ids = [dataset.sample_id(e) for e in dataset.entries]

    def __getitem__(self, image_id):
        rle = coco_rle(self.dataset.gt_mask(image_id))
        rle["counts"] = rle["counts"].encode("ascii")
        return {"image_id": image_id, "segmentation": rle}

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def evaluate_refcoco(model, tokenizer, root, dataset: str = "refcoco", split: str = "val", *, ann_root=None,
                     image_root=None, short_side: int = 360, max_size: int | None = 640, batch_size: int = 2,
                     num_workers: int = 0, skip_bad_samples: bool = False, amp: bool = False, out_dir=None,
                     progress: bool = True) -> dict[str, float]:
    """Score ``model`` on one split of a converted RefCOCO/+/g (default: val), on the model's device (``amp``:
    bfloat16 autocast, masks decided in float32). Returns the metrics (fractions in [0, 1]) with ``num_samples``
    and ``num_skipped``; writes the outputs to ``out_dir`` when given."""
    start = time.perf_counter()
    data = RefCOCODataset(root, dataset, split, transforms=make_eval_transforms(short_side, max_size), train=False,
                          ann_root=ann_root, image_root=image_root, skip_bad_samples=skip_bad_samples)
    counts, skipped = run_inference(model, tokenizer, data, {"annotations": _GroundTruthView(data)}, batch_size,
                                    num_workers, progress=progress, desc=f"{dataset} {split} inference", amp=amp)
    inference_s = time.perf_counter() - start
    if not counts:
        raise ValueError(f"{data.ann_path}: every sample was skipped; nothing to score")
    metrics = score(counts)
    metrics["num_samples"] = len(counts)
    metrics["num_skipped"] = len(skipped)
    if skipped:
        log.warning("%s %s: %d samples skipped and left out of the metrics", dataset, split, len(skipped))
    if out_dir is not None:
        info = {"dataset": dataset, "split": split, "protocol": PROTOCOL, "metrics_scale": "fractions in [0, 1]",
                "mask_threshold": MASK_THRESHOLD, "eval_short_side": short_side, "max_size": max_size,
                "batch_size": batch_size, **inference_settings(model, amp), "annotations": str(data.ann_path),
                "sentences": len(data), "inference_seconds": round(inference_s, 3),
                "total_seconds": round(time.perf_counter() - start, 3)}
        write_outputs(Path(out_dir), metrics, counts, skipped, info)
    return metrics
