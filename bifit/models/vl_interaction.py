"""Bidirectional vision-language interaction, run per feature level before the transformer.

Per level: the text attends to the visual tokens of the whole clip and is updated
multiplicatively (level by level); the visual tokens attend to the *original* text and are
updated multiplicatively. The sentence feature is pooled from the fused first token.
With `bidirectional=False` only the vision update runs (ReferFormer).
"""

from __future__ import annotations

import torch
from torch import nn

from bifit.models.pixel_decoder import map_to_seq, seq_to_map


class MultiplicativeCrossAttention(nn.Module):
    """x * MHA(query=x, key=memory + pos, value=memory) (no residual, no norm, dropout 0)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)

    def forward(self, x, memory, memory_key_padding_mask, memory_pos):
        # x [lx, b, c], memory [lm, b, c], memory_key_padding_mask [b, lm]
        attended = self.multihead_attn(
            x, memory + memory_pos, memory, key_padding_mask=memory_key_padding_mask, need_weights=False
        )[0]
        return x * attended


class SentencePooler(nn.Module):
    """tanh(Linear(first token)): [b, l, c] -> [b, c]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))


class VisionLanguageInteraction(nn.Module):
    def __init__(self, d_model: int, nhead: int, bidirectional: bool = True):
        super().__init__()
        self.bidirectional = bidirectional
        self.text_to_vision = MultiplicativeCrossAttention(d_model, nhead)
        if bidirectional:
            self.vision_to_text = MultiplicativeCrossAttention(d_model, nhead)
            self.sentence_pool = SentencePooler(d_model)

    def forward(self, srcs, masks, poses, text, text_mask, text_pos, num_frames: int, record=None):
        """Fuse every level.

        srcs/poses: list of [(b t), c, h, w]; masks: list of [(b t), h, w];
        text, text_pos: [l, b, c]; text_mask: [b, l].
        Returns the fused srcs (same shapes) and the fused text [l, b, c].
        """
        text0, fused = text, []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, poses)):
            bt, c, h, w = src.shape
            b = bt // num_frames
            seq, seq_pos = map_to_seq(src, num_frames), map_to_seq(pos, num_frames)  # [(t h w), b, c]
            seq_mask = mask.reshape(b, num_frames * h * w)  # [b, (t h w)]
            if self.bidirectional:
                text = self.vision_to_text(text, seq, seq_mask, seq_pos)
            seq = self.text_to_vision(seq, text0, text_mask, text_pos)
            if record is not None:
                record[f"text_fusion_module.{level}"] = text
                record[f"fusion_module.{level}"] = seq
            fused.append(seq_to_map(seq, num_frames, h, w))  # [(b t), c, h, w]
        return fused, text
