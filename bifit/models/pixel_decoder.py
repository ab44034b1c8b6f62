"""Cross-modal FPN pixel decoder: top-down FPN whose every level attends to the text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNorm(nn.Conv2d):
    """Conv (no bias) -> GroupNorm(8) -> optional ReLU; keys `weight`, `norm.weight`, `norm.bias`."""

    def __init__(self, in_ch, out_ch, kernel_size, relu: bool):
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(8, out_ch)
        self.relu = relu

    def forward(self, x):
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


def map_to_seq(x: torch.Tensor, t: int) -> torch.Tensor:
    """[(b t), c, h, w] -> [(t h w), b, c] (a view when x is channels-last and b = 1)."""
    bt, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(bt // t, t * h * w, c).transpose(0, 1)


def seq_to_map(x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """[(t h w), b, c] -> [(b t), c, h, w] (channels-last strides; a view when b = 1)."""
    b, c = x.shape[1], x.shape[2]
    return x.reshape(t, h, w, b, c).permute(3, 0, 4, 1, 2).reshape(b * t, c, h, w)


class VisionLanguageBlock(nn.Module):
    """Post-norm: (spatially reduced) self-attention over the clip, cross-attention to text, FFN."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, sr_ratio=1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.sr_ratio = sr_ratio

    def forward(self, x, x_mask, x_pos, text, text_mask, text_pos, t, h, w):
        """x, x_pos [(t h w), b, c]; x_mask [b, (t h w)]; text, text_pos [l, b, c]; text_mask [b, l]."""
        b = x.shape[1]
        qk = x + x_pos
        if self.sr_ratio > 1:
            size = (int(h / self.sr_ratio), int(w / self.sr_ratio))
            q = map_to_seq(F.interpolate(seq_to_map(qk, t, h, w), size=size, mode="nearest"), t)
            v = map_to_seq(F.interpolate(seq_to_map(x, t, h, w), size=size, mode="nearest"), t)
            mask = F.interpolate(x_mask.reshape(b * t, h, w)[None].float(), size=size, mode="nearest").bool()[0]
            attn = self.self_attn(q, q, v, key_padding_mask=mask.reshape(b, -1), need_weights=False)[0]
            attn = map_to_seq(F.interpolate(seq_to_map(attn, t, *size), size=(h, w), mode="bilinear", align_corners=False), t)
        else:
            attn = self.self_attn(qk, qk, x, key_padding_mask=x_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attn))
        attn = self.multihead_attn(x + x_pos, text + text_pos, text, key_padding_mask=text_mask, need_weights=False)[0]
        x = self.norm2(x + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x), inplace=True)))
        return self.norm3(x + self.dropout3(ffn))


class CrossModalFPNDecoder(nn.Module):
    SR_RATIOS = (8, 4, 2, 1)  # blocks 1..4 (strides 4, 8, 16, 32)

    def __init__(self, res2_channels: int, conv_dim: int = 256, dim_feedforward: int = 2048, nhead: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        in_channels = (res2_channels, conv_dim, conv_dim, conv_dim)
        for stage, (in_ch, sr) in enumerate(zip(in_channels, self.SR_RATIOS), start=1):
            self.add_module(f"adapter_{stage}", ConvNorm(in_ch, conv_dim, 1, relu=False))
            self.add_module(f"layer_{stage}", ConvNorm(conv_dim, conv_dim, 3, relu=True))
            self.add_module(
                f"cross_attn_{stage}",
                VisionLanguageBlock(conv_dim, nhead, dim_feedforward, dropout=dropout, sr_ratio=sr),
            )
        self.mask_features = nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1)  # mask_dim = hidden_dim

    def forward(self, res2, memory, masks, poses, text, text_mask, text_pos, num_frames):
        """res2 [(b t), c2, H/4, W/4]; memory: [8x, 16x, 32x] maps; masks/poses: the backbone levels 4x..32x.

        Returns mask features [(b t), conv_dim, H/4, W/4].
        """
        inputs = [res2, *memory]  # strides 4, 8, 16, 32
        y = None
        for stage in (4, 3, 2, 1):
            i = stage - 1
            x = getattr(self, f"adapter_{stage}")(inputs[i])
            h, w = x.shape[-2:]
            x_mask = masks[i].reshape(-1, num_frames * h * w)  # [(b t), h, w] -> [b, (t h w)]
            x = getattr(self, f"cross_attn_{stage}")(
                map_to_seq(x, num_frames), x_mask, map_to_seq(poses[i], num_frames), text, text_mask, text_pos,
                num_frames, h, w,
            )
            x = seq_to_map(x, num_frames, h, w)
            if y is not None:
                x = x + F.interpolate(y, size=(h, w), mode="nearest")
            y = getattr(self, f"layer_{stage}")(x)
        return self.mask_features(y)
