"""Inter-frame interaction: self-attention over all (time x queries) of a clip after each decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InterFrameLayer(nn.Module):
    """Post-norm transformer encoder layer without positional embedding or mask."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [(t q), b, c]
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x), inplace=True)))
        return self.norm2(x + self.dropout2(ffn))


class InterFrameInteraction(nn.Module):
    """The same stack of `num_layers` layers runs after every decoder layer (0 layers: identity)."""

    def __init__(self, num_layers, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.layers = nn.ModuleList(
            InterFrameLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )

    def forward(self, queries: torch.Tensor, num_frames: int) -> torch.Tensor:
        if not len(self.layers):
            return queries
        bt, q, c = queries.shape
        b = bt // num_frames
        # [(b t), q, c] -> [(t q), b, c]
        x = queries.view(b, num_frames * q, c).transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1).reshape(bt, q, c)
