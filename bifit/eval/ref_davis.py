"""Ref-DAVIS17 inference engine and evaluation, following the official protocol.

Per sequence and per annotator column a (``anno_<a>``), every object k is segmented with its expression 4k + a:

1. the sequence is cut into consecutive clips of ``clip_length`` frames (24 in BIFIT, the last one shorter);
2. each clip is run once through the visual encoder; all expressions of the sequence share those features
   and are decoded ``batch`` at a time; the query is chosen per clip (mean score over the clip's frames);
3. the chosen query's mask logits are upsampled bilinearly to the original size and turned into probabilities;
4. merging: probabilities below 0.5 are set to 0, a constant background plane of 0.1 is put first and the argmax
   over [background, object 1, ..., object K] is the label map. It is computed as a running maximum over the
   objects in order (a later object wins only when strictly larger), which is the argmax's first-maximum rule,
   so only one label map and one maximum per annotator are kept in memory, never K probability stacks.

Evaluation is the toolkit's unsupervised protocol run once per annotator on the sequence list, each run reduced
to the toolkit's global table, and the four tables averaged (:func:`bifit.eval.davis.global_table`); that mean is
the reported Ref-DAVIS17 number. Results are always recomputed (the toolkit reuses its CSVs when they exist,
reporting stale numbers; ours are written for reference but never read). There is no per-expression score: the GT
is the *unsupervised* annotation set, whose object ids are not the objects the expressions refer to, so "label
k + 1 against GT id obj_id" would score unrelated objects on the real data.

Each expression reaches the tokenizer as written in the meta (the official inference does not normalise).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bifit.data.collate import tokenize
from bifit.data.davis import load_frames, load_gt_labels, ref_davis_videos
from bifit.data.ytvos import SampleError
from bifit.eval.davis import (
    GLOBAL_MEASURES,
    UnsupervisedResult,
    evaluate_unsupervised,
    global_table,
)
from bifit.inference import float32_outputs, inference_autocast, model_device, to_device
from bifit.models.postprocess import video_masks
from bifit.prepare.davis import NUM_ANNOTATORS
from bifit.synthetic.ytvos import PALETTE

log = logging.getLogger(__name__)

BACKGROUND_PROB = 0.1
FOREGROUND_MIN_PROB = 0.5
CLIP_LENGTH = 24  # BIFIT (ReferFormer: 36)


def merge_into(best: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, label: int) -> None:
    """Fold object ``label``'s probabilities [t, H, W] into the running (best [t, H, W], labels [t, H, W])."""
    kept = torch.where(probs >= FOREGROUND_MIN_PROB, probs, torch.zeros_like(probs))
    wins = kept > best
    best[wins] = kept[wins]
    labels[wins] = label


def merge_probabilities(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference merge of K probability stacks [t, H, W] -> label map [t, H, W] uint8 (argmax with background)."""
    planes = torch.stack([torch.full_like(probs[0], BACKGROUND_PROB)]
                         + [torch.where(p < FOREGROUND_MIN_PROB, torch.zeros_like(p), p) for p in probs])
    return planes.argmax(0).to(torch.uint8)


@torch.no_grad()
def predict_label_maps(model, tokenizer, frames: torch.Tensor, captions: Sequence[Sequence[str]],
                       orig_size: tuple[int, int], clip_length: int = CLIP_LENGTH, batch: int = 8,
                       amp: bool = False) -> np.ndarray:
    """frames [T, 3, h, w] (normalised, unpadded), captions [object k][annotator a] -> labels [A, T, H, W] uint8.

    Runs and merges on the model's device (``amp``: bfloat16 autocast, probabilities in float32); only each
    clip's label maps come back to the CPU."""
    device = model_device(model)
    t, _, h, w = frames.shape
    n_ann = len(captions[0]) if captions else NUM_ANNOTATORS
    out = np.zeros((n_ann, t, *orig_size), dtype=np.uint8)
    if not captions:
        return out
    flat = [(k, a, c) for k, row in enumerate(captions) for a, c in enumerate(row)]  # objects in order per a
    for start in range(0, t, clip_length):
        clip = to_device(frames[start : start + clip_length], device)[None]  # [1, t', 3, h, w]
        n = clip.shape[1]
        image_mask = torch.zeros((1, n, h, w), dtype=torch.bool, device=device)
        with inference_autocast(device, amp):
            visual = model.encode_visual(clip, image_mask)
        best = torch.full((n_ann, n, *orig_size), BACKGROUND_PROB, device=device)
        labels = torch.zeros((n_ann, n, *orig_size), dtype=torch.uint8, device=device)
        for first in range(0, len(flat), batch):
            chunk = flat[first : first + batch]
            input_ids, attention_mask = tokenize(tokenizer, [c for _, _, c in chunk])
            with inference_autocast(device, amp):
                outputs = model(None, None, to_device(input_ids, device), to_device(attention_mask, device),
                                torch.tensor([[h, w]] * len(chunk), device=device), with_aux=False,
                                visual=visual.repeat(len(chunk)))
            outputs = float32_outputs(outputs)
            for j, (k, a, _) in enumerate(chunk):
                _, probs, _, _ = video_masks(outputs, (h, w), orig_size, FOREGROUND_MIN_PROB, clip=j)
                merge_into(best[a], labels[a], probs.float(), k + 1)
        out[:, start : start + n] = labels.cpu().numpy()
    return out


def save_label_maps(folder: Path, frames: Sequence[str], labels: np.ndarray) -> None:
    """Palette PNGs ``<folder>/<frame>.png`` (index = object, 0 background), as the reference writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lab in zip(frames, labels):
        img = Image.fromarray(lab, mode="P")
        img.putpalette(PALETTE)
        img.save(folder / f"{name}.png")


@dataclass
class RefDavisEvaluation:
    per_annotator: np.ndarray  # (A, 7) toolkit global rows, columns GLOBAL_MEASURES
    final: np.ndarray  # (7,) mean over annotators: the reported numbers
    sequences: dict[str, list[UnsupervisedResult]]
    num_expressions: int = 0  # expressions segmented (a count, not a score)
    skipped: list[dict] = field(default_factory=list)  # {"file", "id", "reason"} of sequences left out

    def metrics(self) -> dict:
        g = dict(zip(GLOBAL_MEASURES, self.final.tolist()))
        out = {"jf": g["J&F-Mean"], "j": g["J-Mean"], "f": g["F-Mean"], "j_recall": g["J-Recall"],
               "j_decay": g["J-Decay"], "f_recall": g["F-Recall"], "f_decay": g["F-Decay"]}
        for a, row in enumerate(self.per_annotator):
            out[f"anno_{a}_jf"], out[f"anno_{a}_j"], out[f"anno_{a}_f"] = float(row[0]), float(row[1]), float(row[4])
        out["num_sequences"] = len(self.sequences)
        out["num_objects"] = int(sum(r[0].n_objects for r in self.sequences.values()))
        out["num_expressions"] = self.num_expressions
        out["num_skipped_sequences"] = len(self.skipped)
        return out

    def per_sequence(self) -> dict[str, float]:
        """J&F per sequence: the mean over its GT objects and the annotator runs."""
        return {seq: float(np.mean([(r.JM.mean() + r.FM.mean()) / 2 if r.n_objects else np.nan for r in res]))
                for seq, res in self.sequences.items()}


def write_toolkit_csvs(folder: Path, row: np.ndarray, results: dict[str, UnsupervisedResult]) -> None:
    """``global_results-val.csv`` and ``per-sequence_results-val.csv`` in the toolkit's layout (for reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "global_results-val.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(GLOBAL_MEASURES)
        w.writerow([f"{v:.6f}" for v in row])
    with (folder / "per-sequence_results-val.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Sequence", "J-Mean", "F-Mean"])
        for seq, res in results.items():
            for i in range(res.n_objects):
                w.writerow([f"{seq}_{i + 1}", f"{res.JM[i]:.6f}", f"{res.FM[i]:.6f}"])


def evaluate_ref_davis_model(model, tokenizer, prepared_root, out_dir: Path | None = None, *,
                             short_side: int = 360, clip_length: int = CLIP_LENGTH, batch: int = 8,
                             max_videos: int | None = None, skip_bad_samples: bool = False,
                             progress: bool = True, amp: bool = False) -> RefDavisEvaluation:
    """Run the model on the val sequences, save ``anno_<a>/<seq>/<frame>.png`` under ``out_dir`` (optional) and
    score them with the Ref-DAVIS17 protocol. Inference runs on the model's device; ``amp``: bfloat16 autocast
    (:func:`predict_label_maps`).

    A sequence with a missing or corrupt frame or annotation raises :class:`~bifit.data.ytvos.SampleError`
    (file and sequence named); with ``skip_bad_samples`` it is left out of the scores, recorded in ``skipped``
    and, with ``out_dir``, listed in ``<out_dir>/skipped_samples.json`` (the numbers then cover fewer sequences
    than the official set, and ``num_skipped_sequences`` says so)."""
    videos = ref_davis_videos(prepared_root, "valid")[:max_videos]
    if not videos:
        raise ValueError(f"{prepared_root}: no Ref-DAVIS17 val sequences to evaluate")
    per_seq: dict[str, list[UnsupervisedResult]] = {}
    num_expressions = 0
    n_ann = NUM_ANNOTATORS
    skipped: list[dict] = []
    for video in tqdm(videos, desc="Ref-DAVIS17", unit="video", disable=not progress):
        try:
            frames, orig_size = load_frames(prepared_root, video, short_side)
            gt = load_gt_labels(prepared_root, video)
        except SampleError as err:
            if not skip_bad_samples:
                raise
            log.warning("skipping Ref-DAVIS17 sequence %s: %s", video.name, err)
            skipped.append(err.record())
            continue
        pred = predict_label_maps(model, tokenizer, frames, video.captions, orig_size, clip_length, batch, amp)
        per_seq[video.name] = [evaluate_unsupervised(gt, pred[a], name=f"{video.name} (anno_{a})")
                               for a in range(n_ann)]
        num_expressions += n_ann * video.num_objects
        for a in range(n_ann):
            if out_dir is not None:
                save_label_maps(Path(out_dir) / f"anno_{a}" / video.name, video.frames, pred[a])
    if not per_seq:
        raise ValueError(f"{prepared_root}: every Ref-DAVIS17 val sequence was skipped: {skipped}")
    rows = np.stack([global_table(res[a] for res in per_seq.values()) for a in range(n_ann)])
    if out_dir is not None:
        for a in range(n_ann):
            write_toolkit_csvs(Path(out_dir) / f"anno_{a}", rows[a], {s: r[a] for s, r in per_seq.items()})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "skipped_samples.json").write_text(json.dumps(skipped, indent=1) + "\n")
    return RefDavisEvaluation(rows, rows.mean(axis=0), per_seq, num_expressions, skipped)
