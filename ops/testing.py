"""Random deformable-attention cases and a gradient runner, shared by tests/ops and bench/ms_deform_attn.py."""

from __future__ import annotations

import torch

from ops.reference import ms_deform_attn_pytorch

# name -> (n, q, m, d, spatial shapes (h, w) per level, points): odd sizes, 1-pixel levels, d not a
# multiple of 4, the model's layout (8 heads of 32 channels, 4 levels, 4 points)
CASES = {
    "odd": (2, 7, 2, 5, [(7, 3), (1, 1), (5, 9)], 3),
    "model-like": (2, 30, 8, 32, [(9, 13), (5, 7), (3, 4), (2, 2)], 4),
    "wide-d": (1, 9, 3, 64, [(4, 6), (2, 3)], 2),
}


def random_case(n, q, m, d, shapes, p, dtype=torch.float64, device="cpu", seed=0, margin=0.1):
    """value [n, s, m, d], spatial_shapes [l, 2], level_start_index [l], locations [n, q, m, l, p, 2]
    uniform in [-margin, 1 + margin] (some points fall outside), weights [n, q, m, l, p] (softmax over l p)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels, s = len(shapes), int(sizes.sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    locations = torch.rand(n, q, m, levels, p, 2, generator=g, dtype=torch.float64) * (1 + 2 * margin) - margin
    weights = torch.rand(n, q, m, levels * p, generator=g, dtype=torch.float64).softmax(-1).view(n, q, m, levels, p)
    grad_out = torch.randn(n, q, m * d, generator=g, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), spatial_shapes.to(device), level_start_index.to(device), locations.to(**to),
            weights.to(**to), grad_out.to(**to))


def run_with_grads(fn, case):
    """fn(value, shapes, starts, locations, weights) -> (output, grad value, grad locations, grad weights)."""
    value, shapes, starts, locations, weights, grad_out = case
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(grad_out.to(out.dtype))
    return (out.detach(), *(t.grad for t in leaves))


def reference(value, shapes, starts, locations, weights):
    return ms_deform_attn_pytorch(value, shapes, locations, weights)
