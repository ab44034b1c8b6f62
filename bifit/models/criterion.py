"""Set criterion for referring segmentation: focal classification, L1 + GIoU boxes, focal + dice masks,
with auxiliary losses for every earlier decoder layer (suffix `_i`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bifit.models.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from bifit.models.matcher import pad_and_subsample_masks
from bifit.models.referent_map import referent_map_loss


def sigmoid_focal_loss(logits, targets, num_boxes, alpha: float = 0.25, gamma: float = 2.0):
    """[n, p, ...] -> scalar: focal loss, mean over dim 1, summed, divided by num_boxes."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits, targets, num_boxes):
    """[n, p] -> scalar: 1 - dice (+1 smoothing), summed, divided by num_boxes."""
    probs = logits.sigmoid().flatten(1)
    num = 2 * (probs * targets).sum(1)
    den = probs.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_boxes


def token_category_loss(logits: torch.Tensor, targets: list[dict], target_masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the token-category head on the tokens the referent's mask covers (at least half of the
    token), against the referent's category; mean over those tokens.

    logits [b, t, h, w, k] (finest encoder level); targets: b dicts, `category` a 0-d long tensor in [0, k) (targets
    without one, e.g. the RefCOCO stills whose COCO categories are not the video categories, contribute nothing);
    target_masks [b, t, H, W]. No host sync; a batch with no labelled token gives 0 (the head stays in the graph).
    """
    b, t, h, w, k = logits.shape
    has = [i for i, tgt in enumerate(targets) if "category" in tgt]
    if not has:
        return logits.sum() * 0.0
    categories = torch.stack([targets[i]["category"] for i in has]).to(logits.device)  # [n]
    cover = F.adaptive_avg_pool2d(target_masks[has].flatten(0, 1).float(), (h, w)).view(len(has), t, h, w)
    labelled = (cover >= 0.5).float()  # [n, t, h, w]
    log_prob = logits[has].float().log_softmax(-1)  # [n, t, h, w, k]
    index = categories.view(-1, 1, 1, 1, 1).expand(-1, t, h, w, 1)
    nll = -log_prob.gather(-1, index).squeeze(-1)  # [n, t, h, w]
    return (nll * labelled).sum() / labelled.sum().clamp(min=1.0)


class SetCriterion(nn.Module):
    def __init__(self, matcher, weight_dict: dict[str, float], focal_alpha=0.25):
        super().__init__()
        self.matcher, self.weight_dict = matcher, weight_dict
        self.focal_alpha = focal_alpha

    def loss_labels(self, out, targets, matched, num_boxes):
        logits = out["pred_logits"]  # [b, t, q, k]
        b, t, q, k = logits.shape
        valid = torch.stack([tgt["valid"] for tgt in targets]).to(logits)  # [b, t]
        # binary referring: class 0 is positive on the matched query's valid frames
        target = torch.zeros_like(logits)
        target[..., 0] = valid[:, :, None] * F.one_hot(matched, q).to(logits)[:, None, :]
        # [b, t, q, k] -> [b, (t q), k]
        loss = sigmoid_focal_loss(logits.flatten(1, 2), target.flatten(1, 2), num_boxes, self.focal_alpha)
        return {"loss_ce": loss * (t * q)}

    @staticmethod
    def matched_query(tensor: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        """[b, t, q, ...] -> the matched query's [b, t, ...]."""
        return tensor[torch.arange(tensor.shape[0], device=tensor.device), :, matched]

    def loss_boxes(self, out, targets, matched, num_boxes):
        # the matched query's boxes in every frame (invalid frames included: their target is zeros)
        src = self.matched_query(out["pred_boxes"], matched).flatten(0, 1)  # [(b t), 4]
        tgt = torch.cat([t["boxes"] for t in targets]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, out, targets, matched, num_boxes, target_masks):
        src = self.matched_query(out["pred_masks"], matched)  # [b, t, h, w]
        src, tgt = src.flatten(1), target_masks.to(src).flatten(1)
        return {"loss_mask": sigmoid_focal_loss(src, tgt, num_boxes, self.focal_alpha),
                "loss_dice": dice_loss(src, tgt, num_boxes)}

    @staticmethod
    def num_boxes(targets, device) -> torch.Tensor:
        """Valid frames in the batch, averaged over ranks, at least 1: a 0-d tensor (no host sync)."""
        n = torch.stack([t["valid"].sum() for t in targets]).sum().to(device=device, dtype=torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            n = n / torch.distributed.get_world_size()
        return n.clamp(min=1.0)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms; `weighted_total(losses)` combines them."""
        target_masks = pad_and_subsample_masks([t["masks"] for t in targets])
        target_masks = target_masks.to(outputs["pred_masks"])
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = {}
        levels = [(outputs, "")] + [(aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for out, suffix in levels:
            matched = self.matcher(out, targets, target_masks)  # [b]
            terms = {**self.loss_labels(out, targets, matched, num_boxes),
                     **self.loss_boxes(out, targets, matched, num_boxes),
                     **self.loss_masks(out, targets, matched, num_boxes, target_masks)}
            losses.update({k + suffix: v for k, v in terms.items()})
        if "referent_map" in outputs and "loss_referent_map" in self.weight_dict:
            losses["loss_referent_map"] = referent_map_loss(outputs["referent_map"], target_masks, num_boxes)
        if "token_category_logits" in outputs and "loss_token_category" in self.weight_dict:
            losses["loss_token_category"] = token_category_loss(outputs["token_category_logits"], targets,
                                                                target_masks)
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_criterion(cfg) -> SetCriterion:
    """cfg: `bifit.config.Config` (uses its model, matcher and loss sections)."""
    from bifit.models.matcher import VideoMatcher

    m = cfg.matcher
    matcher = VideoMatcher(m.cost_class, m.cost_bbox, m.cost_giou, m.cost_mask, m.cost_dice, cfg.loss.focal_alpha)
    weights = cfg.loss.weight_dict(cfg.model.dec_layers, cfg.model.aux_loss)
    return SetCriterion(matcher, weights, cfg.loss.focal_alpha)
