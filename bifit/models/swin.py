"""Swin Transformer backbone (`swin_{t,s,b,l}_p4w7`, the detection-style body of the official code).

4x4 patch embedding with LayerNorm, four stages of window attention (7x7 windows, every second block shifted by
3 with the cross-region mask, relative position bias), patch merging between stages, and a LayerNorm `norm{i}`
on each stage's output. Inputs are padded to multiples of the patch and window sizes (padded tokens are zeros
after `norm1` and take part in attention, as in the official body). No absolute position embedding.

The window machinery is written for any number of grid axes: `bifit/models/video_swin.py` uses it with 3-D
(t h w) windows. Module and parameter names are those of the official state dict (`patch_embed.proj`,
`layers.{i}.blocks.{j}.attn.relative_position_bias_table`, `layers.{i}.downsample.reduction`, `norm{i}`, ...),
so ImageNet releases and official BIFIT/ReferFormer checkpoints load by name.

Notation (einops): n images, c channels, (h w) token grid, g = grid axes, nw windows, k window tokens.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

# embed_dim, depths, num_heads of the ImageNet-pretrained releases (patch 4, window 7)
SWIN_VARIANTS = {
    "swin_t_p4w7": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_s_p4w7": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_b_p4w7": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_l_p4w7": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
STRIDES = (4, 8, 16, 32)


def window_partition(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """[b, *g, c] (each grid axis a multiple of its window) -> [(b nw), k, c], windows in row-major grid order."""
    b, *grid, c = x.shape
    n = len(window)
    x = x.view(b, *[s for g, w in zip(grid, window) for s in (g // w, w)], c)
    x = x.permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)  # b (g0/w0) .. w0 .. c
    return x.reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """[(b nw), k, c] -> [b, *g, c] (inverse of window_partition)."""
    n = len(window)
    x = windows.view(-1, *[g // w for g, w in zip(grid, window)], *window, windows.shape[-1])
    x = x.permute(0, *[a for i in range(n) for a in (1 + i, 1 + n + i)], 2 * n + 1)
    return x.reshape(x.shape[0], *grid, -1)


def relative_position_index(window: tuple[int, ...]) -> torch.Tensor:
    """[k, k] int64: row-major index of the relative offset (each axis shifted to >= 0) into the bias table."""
    return _relative_position_index(tuple(window)).to(torch.get_default_device(), copy=True)


@functools.lru_cache(maxsize=8)
def _relative_position_index(window: tuple[int, ...]) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device="cpu") for w in window], indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # [g, k, k]
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device="cpu")
    for i, w in enumerate(window):
        index += (rel[i] + w - 1) * math.prod(2 * v - 1 for v in window[i + 1:])
    return index


def shifted_window_mask(grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device,
                        dtype) -> torch.Tensor:
    """[nw, k, k] additive mask (0 or -100) of a cyclically shifted, padded grid: along each shifted axis the
    positions [0, g-w), [g-w, g-s), [g-s, g) are separate regions, and tokens of different regions do not mix."""
    region = torch.zeros(grid, dtype=torch.long, device=device)
    for axis, (g, w, s) in enumerate(zip(grid, window, shift)):
        label = torch.zeros(g, dtype=torch.long, device=device)
        if s > 0:
            label[g - w:g - s], label[g - s:] = 1, 2
        region += label.view([-1 if a == axis else 1 for a in range(len(grid))]) * 3 ** axis
    ids = window_partition(region[None, ..., None], window)[..., 0]  # [nw, k]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill_(diff != 0, -100.0)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, window: tuple[int, ...], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in window), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "relative_position_index"
        if key in state_dict and state_dict[key].shape == self.relative_position_index.shape \
                and not torch.equal(state_dict[key].to(self.relative_position_index), self.relative_position_index):
            raise ValueError(f"{key}: the file's index differs from the one this window size gives")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [(b nw), k, c]; mask [nw, k, k] or None -> [(b nw), k, c]. A window smaller than the configured one
        (a short clip) uses the first k rows and columns of the index, as the official body does."""
        bw, k, c = x.shape
        q, kk, v = self.qkv(x).view(bw, k, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index[:k, :k].reshape(-1)
        bias = self.relative_position_bias_table[index].view(k, k, -1).permute(2, 0, 1).to(q.dtype)  # [heads, k, k]
        if mask is not None:  # (b nw) heads k d -> b nw heads k d, bias per window
            nw = mask.shape[0]
            bias = bias[None] + mask[:, None].to(q.dtype)  # [nw, heads, k, k]
            q, kk, v = (t.view(bw // nw, nw, *t.shape[1:]) for t in (q, kk, v))
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.reshape(bw, self.num_heads, k, -1).transpose(1, 2).reshape(bw, k, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual: [b, *g, c] -> [b, *g, c]."""

    def __init__(self, dim, num_heads, window, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, window, shift, mask):
        grid, axes = x.shape[1:-1], tuple(range(1, x.dim() - 1))
        y = self.norm1(x)
        pad = [(-g) % w for g, w in zip(grid, window)]
        if any(pad):  # zeros after the norm, at the end of every axis
            y = F.pad(y, [0, 0] + [p for d in reversed(pad) for p in (0, d)])
        padded = y.shape[1:-1]
        if any(shift):
            y = torch.roll(y, [-s for s in shift], axes)
        y = window_reverse(self.attn(window_partition(y, window), mask if any(shift) else None), window, padded)
        if any(shift):
            y = torch.roll(y, list(shift), axes)
        if any(pad):
            y = y[(slice(None), *[slice(0, g) for g in grid])]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (odd h/w padded), LayerNorm, Linear 4c -> 2c: [b, .., h, w, c] ->
    [b, .., h/2, w/2, 2c]."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        h, w = x.shape[-3:-1]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks, every odd one shifted by half a window. shrink_window (Video-Swin): along an axis no
    longer than the window, the window is the axis and the shift 0. downsample: a PatchMerging kept in the
    stage (`layers.{i}.downsample`, run by the caller after the stage output is taken)."""

    def __init__(self, dim, depth, num_heads, window, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_paths,
                 downsample: bool, shrink_window: bool):
        super().__init__()
        self.window, self.shrink_window = tuple(window), shrink_window
        self.shift = tuple(w // 2 for w in self.window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, self.window, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):  # [b, *g, c] -> [b, *g, c]
        grid = tuple(x.shape[1:-1])
        window, shift = self.window, self.shift
        if self.shrink_window:
            window = tuple(min(g, w) for g, w in zip(grid, window))
            shift = tuple(0 if g <= w else s for g, w, s in zip(grid, self.window, shift))
        padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, window))
        mask = shifted_window_mask(padded, window, shift, x.device, x.dtype) if any(shift) else None
        no_shift = (0,) * len(window)
        for i, blk in enumerate(self.blocks):
            x = blk(x, window, shift if i % 2 else no_shift, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patches (input padded to a multiple of the patch) -> Linear (as a conv) -> LayerNorm:
    [n, 3, *g_in] -> [n, *g, c]. patch: (ph, pw) (Conv2d) or (pt, ph, pw) (Conv3d)."""

    def __init__(self, patch: tuple[int, ...], embed_dim: int, norm: bool = True, in_ch: int = 3):
        super().__init__()
        self.patch = tuple(patch)
        conv = nn.Conv2d if len(self.patch) == 2 else nn.Conv3d
        self.proj = conv(in_ch, embed_dim, self.patch, self.patch)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x):
        pad = [(-g) % p for g, p in zip(x.shape[2:], self.patch)]
        if any(pad):
            x = F.pad(x, [p for d in reversed(pad) for p in (0, d)])
        x = self.proj(x).movedim(1, -1)  # n c *g -> n *g c
        return self.norm(x) if self.norm is not None else x


def init_swin_weights(module: nn.Module) -> None:
    """Linear weights ~ truncated N(0, 0.02), biases 0; LayerNorm 1 and 0 (the official initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Stochastic-depth rate rising linearly from 0 to `rate` over all blocks, split per stage."""
    n = sum(depths)
    dpr = [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    return [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


class SwinTransformer(nn.Module):
    """[n, 3, H, W] -> per stage i in out_indices: norm{i}(stage output) as [n, c_i, H/4/2^i, W/4/2^i]
    (c_i = embed_dim * 2^i; H, W rounded up)."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=4,
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2,
                 patch_norm=True, out_indices=(0, 1, 2, 3)):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed((patch_size, patch_size), embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dprs = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, depths[i], num_heads[i], (window_size, window_size), mlp_ratio, qkv_bias,
                      qk_scale, drop_rate, attn_drop_rate, dprs[i], downsample=i < len(depths) - 1,
                      shrink_window=False)
            for i in range(len(depths)))
        self.num_channels = [embed_dim * 2 ** i for i in self.out_indices]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2 ** i))
        init_swin_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pos_drop(self.patch_embed(x))  # n h w c
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:  # n h w c -> n c h w
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs
