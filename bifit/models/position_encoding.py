"""Sine position encodings: 2-D for visual feature maps, 1-D for text tokens.

Both are computed in float32 (like the official code) and cast to the requested dtype.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi


def _interleave_sin_cos(v: torch.Tensor) -> torch.Tensor:
    """[..., f] -> [..., f]: sin of the even features, cos of the odd ones, interleaved."""
    return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=-1).flatten(-2)


def _inv_freq(num_feats: int, temperature: float, device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def sine_position_2d(
    mask: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0, dtype=torch.float32
) -> torch.Tensor:
    """mask [n, h, w] (True = padding) -> pos [n, (2 f), h, w], the y block first, then x.

    Normalised with the -0.5 offset: (cumsum - 0.5) / (last + 1e-6) * 2 pi.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * TWO_PI
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * TWO_PI
    inv = _inv_freq(num_feats, temperature, mask.device)
    pos_y = _interleave_sin_cos(y[..., None] / inv)
    pos_x = _interleave_sin_cos(x[..., None] / inv)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2).to(dtype)


def sine_position_1d(
    mask: torch.Tensor, num_feats: int = 256, temperature: float = 10000.0, dtype=torch.float32
) -> torch.Tensor:
    """mask [b, l] (True = padding) -> pos [l, b, f] (sequence first), cumsum / (last + 1e-6) * 2 pi."""
    x = (~mask).cumsum(1, dtype=torch.float32)
    x = x / (x[:, -1:] + 1e-6) * TWO_PI
    pos = _interleave_sin_cos(x[..., None] / _inv_freq(num_feats, temperature, mask.device))
    return pos.transpose(0, 1).to(dtype)
