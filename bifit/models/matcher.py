"""Video-level matcher: one query per referred object, chosen over all frames of the clip."""

from __future__ import annotations

import torch
from torch import nn

from bifit.models.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

MASK_OUT_STRIDE = 4  # masks are predicted at 1/4 of the input size (the official --mask_out_stride)


def pad_and_subsample_masks(masks: list[torch.Tensor], divisor: int = 32) -> torch.Tensor:
    """list of [t, h_i, w_i] -> [b, t, H/stride, W/stride] for stride = MASK_OUT_STRIDE: zero-pad to a common
    multiple of `divisor`, then keep rows/columns stride//2, stride//2 + stride, ... (the grid of the predicted
    mask logits)."""
    stride = MASK_OUT_STRIDE
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = masks[0].new_zeros((len(masks), masks[0].shape[0], h, w))
    for i, m in enumerate(masks):
        out[i, :, : m.shape[-2], : m.shape[-1]] = m
    s = stride // 2
    return out[:, :, s::stride, s::stride]


def focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Focal cost, mean over the last dimension: logits [..., p], targets broadcastable to them -> [...]."""
    prob = logits.sigmoid()
    targets = targets.expand_as(logits)
    ce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    cost = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        cost = (alpha * targets + (1 - alpha) * (1 - targets)) * cost
    return cost.mean(-1)


def dice_coef(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice coefficient with +1 smoothing over the last dimension: [..., p], broadcastable [..., p] -> [...]."""
    probs = logits.sigmoid()
    return (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


class VideoMatcher(nn.Module):
    """Costs per query, averaged over frames; each clip's referred object is matched to the query of minimum
    total cost. Every clip is costed at once and the result stays on the device (no host sync)."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=2.0, cost_dice=5.0,
                 focal_alpha=0.25):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.alpha = focal_alpha

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict], target_masks: torch.Tensor | None = None) -> torch.Tensor:
        """outputs: pred_logits [b, t, q, k], pred_boxes [b, t, q, 4], pred_masks [b, t, q, h, w]; one referred
        object per clip. Returns the matched query of every clip: [b] long, on the outputs' device."""
        if target_masks is None:
            target_masks = pad_and_subsample_masks([t["masks"] for t in targets])
        prob = outputs["pred_logits"][..., 0].sigmoid()  # [b, t, q] (binary: class 0)
        valid = torch.stack([t["valid"] for t in targets]).to(prob)[..., None]  # [b, t, 1]
        a, g = self.alpha, 2.0
        neg = (1 - a) * prob**g * (-(1 - prob + 1e-8).log())
        pos = a * (1 - prob) ** g * (-(prob + 1e-8).log())
        # mean over the valid frames; 0 for a clip without any
        cost_class = ((pos - neg) * valid).sum(1) / valid.sum(1).clamp(min=1)  # [b, q]
        boxes = outputs["pred_boxes"]  # [b, t, q, 4]
        tgt_boxes = torch.stack([t["boxes"] for t in targets]).to(boxes)[:, :, None].expand_as(boxes)
        cost_bbox = (boxes - tgt_boxes).abs().sum(-1).mean(1)  # [b, q]
        cost_giou = -paired_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)).mean(1)
        pred = outputs["pred_masks"].transpose(1, 2).flatten(2)  # [b, t, q, h, w] -> [b, q, (t h w)]
        tgt = target_masks.to(pred).flatten(1)[:, None]  # [b, 1, (t h w)]
        cost_mask = focal_cost(pred, tgt, self.alpha)
        cost_dice = -dice_coef(pred, tgt)
        cost = (self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
                + self.cost_mask * cost_mask + self.cost_dice * cost_dice)  # [b, q]
        return cost.argmin(1)
