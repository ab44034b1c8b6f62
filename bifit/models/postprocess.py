"""Inference post-processing: pick the referred query and turn its mask logits into binary masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_best_query(pred_logits: torch.Tensor) -> torch.Tensor:
    """pred_logits [b, t, q, k] -> [b]: the query with the highest score averaged over frames."""
    scores = pred_logits.sigmoid().mean(1)  # [b, q, k]
    return scores.max(-1).values.argmax(-1)


def video_masks(outputs: dict, image_size: tuple[int, int], orig_size: tuple[int, int], threshold: float = 0.5,
                clip: int = 0):
    """Ref-YouTube-VOS / Ref-DAVIS: the best query's masks of one clip, bilinearly upsampled to the original
    frame size, thresholded `sigmoid > threshold`.

    image_size: the unpadded (h, w) fed to the model; orig_size: the (h, w) of the original frames.
    Returns (masks [t, H0, W0] bool, probabilities [t, H0, W0], the query index, its mean score).
    """
    logits = outputs["pred_logits"][clip : clip + 1]
    best = int(select_best_query(logits)[0])
    score = float(logits[0, :, best].sigmoid().mean(0).max())
    masks = outputs["pred_masks"][clip, :, best]  # [t, h/4, w/4] (padded size / 4)
    h, w = -(-image_size[0] // 4), -(-image_size[1] // 4)
    masks = masks[:, :h, :w]
    probs = F.interpolate(masks[None], size=tuple(orig_size), mode="bilinear", align_corners=False)[0].sigmoid()
    return probs > threshold, probs, best, score


def a2d_masks(pred_masks: torch.Tensor, image_size: tuple[int, int], orig_size: tuple[int, int]):
    """A2D/JHMDB: per-query masks [q, h/4, w/4] of the annotated frame: x4 bilinear upsampling in padded space,
    `sigmoid > 0.5`, crop to the unpadded size, nearest resize to the original size -> [q, H0, W0] bool."""
    up = F.interpolate(pred_masks[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    binary = (up.sigmoid() > 0.5)[:, : image_size[0], : image_size[1]]
    return F.interpolate(binary[None].float(), size=tuple(orig_size), mode="nearest")[0].bool()
