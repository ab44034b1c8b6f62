"""Video-level matcher: one query per referred object, chosen over all frames of the clip."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from bifit.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def pad_and_subsample_masks(masks: list[torch.Tensor], stride: int = 4, divisor: int = 32) -> torch.Tensor:
    """list of [t, h_i, w_i] -> [b, t, H/stride, W/stride]: zero-pad to a common multiple of `divisor`,
    then keep rows/columns stride//2, stride//2 + stride, ... (the grid of the predicted mask logits)."""
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = masks[0].new_zeros((len(masks), masks[0].shape[0], h, w))
    for i, m in enumerate(masks):
        out[i, :, : m.shape[-2], : m.shape[-1]] = m
    s = stride // 2
    return out[:, :, s::stride, s::stride]


def focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Pairwise focal cost: logits [n, p], targets [m, p] -> [n, m] (mean over p)."""
    n, m = logits.shape[0], targets.shape[0]
    x = logits[:, None].expand(-1, m, -1)
    y = targets[None].expand(n, -1, -1)
    prob = x.sigmoid()
    ce = nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = prob * y + (1 - prob) * (1 - y)
    cost = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        cost = (alpha * y + (1 - alpha) * (1 - y)) * cost
    return cost.mean(2)


def dice_coef(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [n, p], targets [m, p] -> dice coefficient [n, m] with +1 smoothing."""
    probs = logits.sigmoid()[:, None]
    tgt = targets[None]
    return (2 * (probs * tgt).sum(2) + 1) / (probs.sum(-1) + tgt.sum(-1) + 1)


class VideoMatcher(nn.Module):
    """Costs per query, averaged over frames; the query of minimum total cost is matched (Hungarian
    assignment with scipy when a clip has several objects)."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=2.0, cost_dice=5.0,
                 focal_alpha=0.25, mask_out_stride=4):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.alpha, self.stride = focal_alpha, mask_out_stride

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict], target_masks: torch.Tensor | None = None):
        """outputs: pred_logits [b, t, q, k], pred_boxes [b, t, q, 4], pred_masks [b, t, q, h, w].
        Returns a list of (query index [m], target index [m]) per clip."""
        if target_masks is None:
            target_masks = pad_and_subsample_masks([t["masks"] for t in targets], self.stride)
        target_masks = target_masks.to(outputs["pred_masks"])
        indices = []
        for i, tgt in enumerate(targets):
            prob = outputs["pred_logits"][i].sigmoid()[..., 0]  # [t, q] (binary: class 0)
            valid = tgt["valid"].bool()
            a, g = self.alpha, 2.0
            neg = (1 - a) * prob**g * (-(1 - prob + 1e-8).log())
            pos = a * (1 - prob) ** g * (-(prob + 1e-8).log())
            cost_class = (pos - neg)[valid].mean(0) if valid.any() else prob.new_zeros(prob.shape[1])
            boxes = outputs["pred_boxes"][i]  # [t, q, 4]
            tgt_boxes = tgt["boxes"].to(boxes)  # [t, 4]
            cost_bbox = (boxes - tgt_boxes[:, None]).abs().sum(-1).mean(0)  # [q]
            giou = torch.stack([
                generalized_box_iou(box_cxcywh_to_xyxy(boxes[f]), box_cxcywh_to_xyxy(tgt_boxes[f : f + 1]))[:, 0]
                for f in range(boxes.shape[0])
            ])
            cost_giou = -giou.mean(0)
            # masks [t, q, h, w] -> [q, (t h w)] against [1, (t h w)]
            pred = outputs["pred_masks"][i].transpose(0, 1).flatten(1)
            tgt_mask = target_masks[i].flatten()[None]
            cost_mask = focal_cost(pred, tgt_mask, self.alpha)[:, 0]
            cost_dice = -dice_coef(pred, tgt_mask)[:, 0]
            cost = (self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
                    + self.cost_mask * cost_mask + self.cost_dice * cost_dice)[:, None]  # [q, 1 object]
            if cost.shape[1] == 1:
                src = cost.argmin(0)
                dst = torch.zeros(1, dtype=torch.long)
            else:
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                src, dst = torch.as_tensor(rows), torch.as_tensor(cols)
            indices.append((src.long().cpu(), dst.long()))
        return indices
