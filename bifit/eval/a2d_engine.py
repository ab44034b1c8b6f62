"""A2D-Sentences / JHMDB-Sentences inference and scoring, following the official protocol.

Batched centred-clip inference: each sample is a T-frame clip around its annotated frame with ``valid_indices``;
the model runs on the annotated frame alone (the official model keeps only its features after the per-frame
backbone). The official post-processing per sample: a score per query ``sigmoid(pred_logits[:, 0, :, 0])``; every
query's mask logits upsampled x4 bilinearly in the padded batch space, ``sigmoid > 0.5`` (hard-coded,
``eval.threshold`` does not apply), cropped to the resized size and resized to the original size with nearest
neighbour (:func:`bifit.models.postprocess.a2d_masks`). Inference runs on the model's device, batches pinned there
when it is a GPU; ``eval.amp`` runs the forward pass under bfloat16 autocast and the outputs are read in float32
(scores and masks are never decided in bfloat16).

Scoring is :mod:`bifit.eval.a2d`: the GT is the COCO GT JSON of the preprocess stage; P@K, overall and mean IoU
use the highest-scoring query; mAP comes in two protocols:

- ``mAP 0.5:0.95`` (and ``AP 0.5`` ...): every query of every sample submitted as a detection. This is the
  official procedure of the BIFIT/ReferFormer/MTTR code and the protocol of the paper's mAP numbers.
- ``best-query-only mAP 0.5:0.95`` (...): only the highest-scoring query submitted. NOT the paper's protocol;
  reported because users compare against papers that score this way.

Per sample only counts are kept (GT area, each query's area and intersection with the GT), so memory does not
grow with the masks; ``backend="pycocotools"`` additionally keeps the RLE of every query mask and runs the
official COCOeval calls on them (the default ``"fast"`` backend is bit-identical and faster).

Entry points for the pipeline: :func:`evaluate_a2d` and :func:`evaluate_jhmdb` (model, tokenizer, preprocess
output, config, output folder) -> metrics dict. They write ``metrics.json``, ``per_sample.csv``,
``skipped_samples.json`` and ``eval_info.json`` (protocol labels, settings, timings) to the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from tqdm import tqdm

from bifit.data.a2d import A2DDataset, CentredClipDataset, collate_skipping
from bifit.data.jhmdb import JHMDBDataset
from bifit.data.transforms import make_eval_transforms
from bifit.engine import batch_inputs
from bifit.eval.a2d import (
    AP_NAMES,
    encode_mask,
    fast_segm_stats,
    precision_and_iou,
    pycocotools_segm_stats,
    sample_iou,
    select_queries,
)
from bifit.inference import float32_outputs, inference_autocast, inference_settings, model_device, to_device
from bifit.models.postprocess import a2d_masks
from bifit.prepare.a2d import COCO_GT_JSON as A2D_COCO_GT_JSON
from bifit.prepare.jhmdb import COCO_GT_JSON as JHMDB_COCO_GT_JSON

log = logging.getLogger(__name__)

PROTOCOLS = {
    "mAP 0.5:0.95": "all queries of every sample submitted as detections: the official BIFIT/ReferFormer/MTTR "
                    "procedure and the protocol of the paper's mAP",
    "best-query-only mAP 0.5:0.95": "only the highest-scoring query of each sample submitted: NOT the paper's "
                                    "protocol, given for comparison with papers that score this way",
}
MASK_THRESHOLD = 0.5  # hard-coded in the reference A2D/JHMDB post-processing


@dataclass
class SampleCounts:
    """What scoring needs from one sample: scores [Q] float32 and pixel counts at the original size."""

    image_id: str
    scores: np.ndarray  # [Q] float32
    det_area: np.ndarray  # [Q] int64, foreground pixels of each query's mask
    det_inter: np.ndarray  # [Q] int64, intersection of each query's mask with the GT
    gt_area: int
    rles: list[dict] | None = field(default=None, repr=False)  # [Q] pycocotools RLEs (pycocotools backend)


# ----------------------------------------------------------------------------------------------------------------
# ground truth


def load_coco_gt(path: Path) -> dict:
    """The COCO GT JSON as {"images": {id: image}, "annotations": {image_id: annotation}, "dataset": raw}."""
    try:
        dataset = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing COCO GT; run the preprocess stage first") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    anns = {}
    for ann in dataset.get("annotations", []):
        if ann["image_id"] in anns:
            raise ValueError(f"{path}: image {ann['image_id']!r} has more than one annotation (expected one)")
        anns[ann["image_id"]] = ann
    images = {img["id"]: img for img in dataset.get("images", [])}
    missing = sorted(set(images) - set(anns))
    if missing:
        raise ValueError(f"{path}: {len(missing)} images without an annotation, e.g. {missing[:3]}")
    return {"images": images, "annotations": anns, "dataset": dataset}


def gt_mask(gt: dict, image_id: str) -> np.ndarray:
    """Decoded GT mask (H, W) bool of one image id."""
    ann = gt["annotations"].get(image_id)
    if ann is None:
        raise KeyError(f"image id {image_id!r} has no annotation in the COCO GT")
    rle = dict(ann["segmentation"])
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def coco_subset(gt: dict, image_ids: Sequence[str]) -> COCO:
    """A pycocotools COCO index holding only ``image_ids`` (the scored samples), built in memory."""
    keep = set(image_ids)
    data = dict(gt["dataset"])
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


# ----------------------------------------------------------------------------------------------------------------
# inference


def postprocess_batch(outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample (scores [Q] float32, masks [Q, H0, W0] bool at the original size), official A2D rules."""
    out = []
    for b, target in enumerate(targets):
        scores = outputs["pred_logits"][b, 0, :, 0].sigmoid().float()  # [Q] (T_eff = 1)
        masks = a2d_masks(outputs["pred_masks"][b, 0], tuple(target["size"].tolist()),
                          tuple(target["orig_size"].tolist()))
        out.append((scores, masks))
    return out


@torch.no_grad()
def run_inference(model, tokenizer, dataset: CentredClipDataset, gt: dict, batch_size: int = 2,
                  num_workers: int = 0, keep_rles: bool = False, progress: bool = True,
                  desc: str = "A2D inference", amp: bool = False) -> tuple[list[SampleCounts], list[dict]]:
    """Run the model over ``dataset`` in order and count pixels against the GT, on the model's device (``amp``:
    bfloat16 autocast). Returns (counts, skipped), the skipped samples (dataset with skip_bad_samples) as
    {"file", "id", "reason", "index"}."""
    device = model_device(model)
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    results, skipped = [], []
    with tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress) as bar:
        for batch, skipped_here in loader:
            skipped += skipped_here
            bar.update(len(skipped_here) + (len(batch.targets) if batch is not None else 0))
            if batch is None:
                continue
            # the clips first, asynchronously from pinned memory; batch_inputs then moves the rest
            batch = batch._replace(images=to_device(batch.images, device),
                                   image_mask=to_device(batch.image_mask, device))
            inputs, targets = batch_inputs(batch, tokenizer, device)
            with inference_autocast(device, amp):
                outputs = model(**inputs, with_aux=False)
            outputs = float32_outputs(outputs)
            for target, (scores, masks) in zip(targets, postprocess_batch(outputs, targets)):
                iid = target["image_id"]
                gt_m = torch.from_numpy(gt_mask(gt, iid)).to(masks.device)
                if gt_m.shape != masks.shape[1:]:
                    raise ValueError(f"{iid}: GT mask is {tuple(gt_m.shape)} but the sample's original size is "
                                     f"{tuple(masks.shape[1:])}")
                results.append(SampleCounts(
                    iid, scores.cpu().numpy().astype(np.float32),
                    masks.flatten(1).sum(1).cpu().numpy().astype(np.int64),
                    (masks & gt_m).flatten(1).sum(1).cpu().numpy().astype(np.int64),
                    int(gt_m.sum()),
                    [encode_mask(m) for m in masks.cpu().numpy()] if keep_rles else None))
    return results, skipped


# ----------------------------------------------------------------------------------------------------------------
# scoring


def score(counts: list[SampleCounts], gt: dict | None = None, backend: str = "fast") -> dict[str, float]:
    """Official metrics of :mod:`bifit.eval.a2d` from per-sample counts: the all-queries mAP (paper protocol),
    P@K, overall and mean IoU, then the ``best-query-only`` APs. Fractions in [0, 1]."""
    if not counts:
        raise ValueError("no samples to score")
    ids = [c.image_id for c in counts]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image ids among the scored samples")
    chosen = select_queries([c.scores for c in counts])
    gt_area = np.asarray([c.gt_area for c in counts], np.int64)
    det_image = np.concatenate([np.full(len(c.scores), i) for i, c in enumerate(counts)])
    det_score = np.concatenate([c.scores.astype(np.float64) for c in counts])
    det_area = np.concatenate([c.det_area for c in counts])
    det_inter = np.concatenate([c.det_inter for c in counts])
    top = np.concatenate([[0], np.cumsum([len(c.scores) for c in counts])[:-1]]) + chosen
    if backend == "fast":
        stats_all = fast_segm_stats(gt_area, det_image, det_score, det_area, det_inter, ids)
        stats_top = fast_segm_stats(gt_area, det_image[top], det_score[top], det_area[top], det_inter[top], ids)
    elif backend == "pycocotools":
        if gt is None or any(c.rles is None for c in counts):
            raise ValueError("backend 'pycocotools' needs the GT and the RLEs (run_inference(keep_rles=True))")
        coco_gt = coco_subset(gt, ids)
        preds = [{"image_id": c.image_id, "category_id": 1, "segmentation": rle, "score": float(s)}
                 for c in counts for rle, s in zip(c.rles, c.scores)]
        best = [{"image_id": c.image_id, "category_id": 1, "segmentation": c.rles[q], "score": float(c.scores[q])}
                for c, q in zip(counts, chosen)]
        stats_all, stats_top = pycocotools_segm_stats(coco_gt, preds), pycocotools_segm_stats(coco_gt, best)
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'fast' or 'pycocotools'")
    inter = det_inter[top]
    union = det_area[top] + gt_area - inter
    metrics = {k: float(v) for k, v in zip(AP_NAMES, stats_all[:6])}
    metrics.update(precision_and_iou(inter, union))
    metrics.update({f"best-query-only {k}": float(v) for k, v in zip(AP_NAMES, stats_top[:6])})
    return metrics


def write_outputs(out_dir: Path, metrics: dict, counts: list[SampleCounts], skipped: list[dict], info: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out_dir / "skipped_samples.json").write_text(json.dumps(skipped, indent=1) + "\n")
    (out_dir / "eval_info.json").write_text(json.dumps(info, indent=1) + "\n")
    chosen = select_queries([c.scores for c in counts]) if counts else []
    with (out_dir / "per_sample.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "query", "score", "intersection", "union", "iou"])
        for c, q in zip(counts, chosen):
            inter, union = int(c.det_inter[q]), int(c.det_area[q] + c.gt_area - c.det_inter[q])
            writer.writerow([c.image_id, int(q), f"{c.scores[q]:.6f}", inter, union,
                             f"{float(sample_iou(inter, union)):.6f}"])


def evaluate_dataset(model, tokenizer, dataset: CentredClipDataset, gt_json: Path, out_dir: Path | None,
                     batch_size: int = 2, num_workers: int = 0, backend: str = "fast", progress: bool = True,
                     name: str = "a2d", amp: bool = False) -> dict[str, float]:
    """Inference (on the model's device; ``amp``: bfloat16 autocast) + scoring of one prepared dataset; writes
    the outputs when ``out_dir`` is given."""
    start = time.perf_counter()
    gt = load_coco_gt(gt_json)
    unknown = [s["image_id"] for s in dataset.samples if s["image_id"] not in gt["annotations"]]
    if unknown:
        raise ValueError(f"{dataset.index_path}: {len(unknown)} samples have no GT in {gt_json}, e.g. {unknown[:3]}")
    counts, skipped = run_inference(model, tokenizer, dataset, gt, batch_size, num_workers,
                                    keep_rles=backend == "pycocotools", progress=progress,
                                    desc=f"{name} inference", amp=amp)
    inference_s = time.perf_counter() - start
    metrics = score(counts, gt, backend)
    metrics["num_samples"] = len(counts)
    metrics["num_skipped"] = len(skipped)
    if skipped:
        log.warning("%s: %d samples skipped and left out of the metrics (listed in skipped_samples.json)", name,
                    len(skipped))
    info = {"dataset": name, "protocols": PROTOCOLS, "metrics_scale": "fractions in [0, 1]", "backend": backend,
            "mask_threshold": MASK_THRESHOLD, "num_frames": dataset.num_frames, "batch_size": batch_size,
            **inference_settings(model, amp),
            "gt_json": str(gt_json), "gt_images": len(gt["images"]), "inference_seconds": round(inference_s, 3),
            "total_seconds": round(time.perf_counter() - start, 3)}
    if out_dir is not None:
        write_outputs(Path(out_dir), metrics, counts, skipped, info)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# pipeline entry points


def _settings(cfg):
    d = cfg.data
    return make_eval_transforms(d.eval_short_side, d.max_size), d.num_frames, d.skip_bad_samples


def evaluate_a2d(model, tokenizer, root, cfg, out_dir, *, backend: str = "fast", progress: bool = True):
    """A2D-Sentences test split of the preprocess output ``root``.

    Settings from ``cfg`` (a :class:`bifit.config.Config`): ``data.num_frames`` (T of the centred clip, the
    reference's ``--num_frames``), ``data.eval_short_side`` / ``data.max_size`` (RandomResize([360], 640) in the
    paper setting), ``data.skip_bad_samples``, ``data.num_workers``, ``train.batch_size`` (the reference
    evaluates with its ``--batch_size``) and ``eval.amp``; the model's device is where inference runs.
    """
    transforms, num_frames, skip = _settings(cfg)
    dataset = A2DDataset(root, "test", num_frames, transforms, skip_bad_samples=skip)
    return evaluate_dataset(model, tokenizer, dataset, Path(root) / A2D_COCO_GT_JSON, out_dir, cfg.train.batch_size,
                            cfg.data.num_workers, backend, progress, "a2d_sentences", cfg.eval.amp)


def evaluate_jhmdb(model, tokenizer, root, cfg, out_dir, *, backend: str = "fast", progress: bool = True):
    """JHMDB-Sentences (the A2D model zero-shot) from the preprocess output ``root``; settings as
    :func:`evaluate_a2d`."""
    transforms, num_frames, skip = _settings(cfg)
    dataset = JHMDBDataset(root, num_frames, transforms, skip_bad_samples=skip)
    return evaluate_dataset(model, tokenizer, dataset, Path(root) / JHMDB_COCO_GT_JSON, out_dir,
                            cfg.train.batch_size, cfg.data.num_workers, backend, progress, "jhmdb_sentences",
                            cfg.eval.amp)
