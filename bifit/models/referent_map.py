"""Text-guided start point of the decoder queries (`model.query_reference: text_guided`).

Not part of the official BIFIT: there every query starts from a learned point, `sigmoid(Linear(query_pos))`,
the same for every expression and every video, and must find the referent by deformable sampling around it,
which DETR-style decoders learn slowly. This lever of the small default starts the queries from the
expectation of a referent map instead: the sentence feature scored against every token of the finest
encoder level, a softmax over each frame's unpadded tokens, and the soft-argmax of the token centres.
`loss.referent_map_coef` supervises the map with the ground-truth mask (`referent_map_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def token_centres(h: int, w: int, valid_ratio: torch.Tensor) -> torch.Tensor:
    """Centres of an h x w token grid, normalised by the unpadded region: valid_ratio [n, 2] (w, h) ->
    [n, (h w), 2] (x, y); padded tokens lie beyond 1."""
    ys = torch.arange(h, dtype=torch.float32, device=valid_ratio.device).add_(0.5) / h
    xs = torch.arange(w, dtype=torch.float32, device=valid_ratio.device).add_(0.5) / w
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, h * w, 2)  # [1, (h w), 2] (x, y)
    return grid / valid_ratio.float()[:, None]


class ReferentMap(nn.Module):
    """sentence [n, c] x tokens [n, s, c] -> start point [n, 2] (x, y in [0, 1]) and map logits [n, s]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.token_proj = nn.Linear(d_model, d_model)
        self.sentence_proj = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(d_model)

    def forward(self, tokens, sentence, padding_mask, centres):
        # tokens [n, s, c]; sentence [n, c]; padding_mask [n, s] (True = pad); centres [n, s, 2]
        logits = torch.einsum("nsc,nc->ns", self.token_proj(tokens), self.sentence_proj(sentence)) * self.scale
        # a finite floor, not -inf: the loss multiplies padded log-probabilities by a zero target
        logits = logits.masked_fill(padding_mask, torch.finfo(logits.dtype).min)
        prob = logits.softmax(-1)
        point = torch.einsum("ns,nsk->nk", prob, centres.to(prob.dtype))  # [n, 2]
        return point.clamp(0.0, 1.0), logits


def referent_map_loss(logits: torch.Tensor, target_masks: torch.Tensor, num_boxes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the map and the ground-truth mask taken as a distribution over the tokens.

    logits [b, t, h, w] (finest encoder level); target_masks [b, t, H, W] (the mask-loss grid, at least as fine).
    Frames without the referent contribute nothing; the sum is divided by `num_boxes` like the other terms.
    """
    b, t, h, w = logits.shape
    target = F.adaptive_avg_pool2d(target_masks.flatten(0, 1).to(logits.dtype), (h, w)).flatten(1)  # [(b t), (h w)]
    mass = target.sum(-1, keepdim=True)
    present = mass.squeeze(-1) > 0
    target = target / mass.clamp(min=1e-6)
    log_prob = logits.flatten(0, 1).flatten(1).float().log_softmax(-1)
    per_frame = -(target * log_prob).sum(-1)  # [(b t)]
    return (per_frame * present).sum() / num_boxes
