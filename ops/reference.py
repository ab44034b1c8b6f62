"""Pure-PyTorch multi-scale deformable attention core (the reference every kernel must match).

Shapes (einops notation):
    value               [n, s, m, d]        s = sum over levels of h_l * w_l
    spatial_shapes      [l, 2]              (h_l, w_l), int64
    sampling_locations  [n, q, m, l, p, 2]  (x, y) normalised to [0, 1] of each level
    attention_weights   [n, q, m, l, p]     softmax over (l p) per head
    output              [n, q, (m d)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # [n, (h w), m, d] -> [(n m), d, h, w]
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [n, q, m, p, 2] -> [(n m), q, p, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [(n m), d, q, p]
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [n, q, m, l, p] -> [(n m), 1, q, (l p)]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels * p)
    # [(n m), d, q, (l p)] -> [n, (m d), q]
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2).contiguous()
