"""The one entry point the model calls for multi-scale deformable attention.

Compiled CPU/CUDA kernels (issue 4) plug in behind `ms_deform_attn`; until a backend is
selected and built, the pure-PyTorch reference runs.
"""

from __future__ import annotations

import torch

from ops.reference import ms_deform_attn_pytorch


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [n, s, m, d], locations [n, q, m, l, p, 2], weights [n, q, m, l, p] -> [n, q, (m d)]."""
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
