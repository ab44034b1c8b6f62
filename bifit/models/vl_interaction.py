"""Bidirectional vision-language interaction, run per feature level before the transformer.

Per level: the text attends to the visual tokens of the whole clip and is updated
multiplicatively (level by level); the visual tokens attend to the *original* text and are
updated multiplicatively. The module also owns the sentence feature that seeds the decoder
queries. With `bidirectional=False` only the vision update runs and the sentence is the text
encoder's pooled output (ReferFormer).

Per-level intermediates are the outputs of `vision_to_text` (fused text) and `text_to_vision`
(fused visual tokens), one call per level: see `bifit.models.diagnostics.capture`.
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


SENTENCE_SOURCES = ("fused_text", "text", "text_mean", "encoder")


class SentenceFeature(nn.Module):
    """The sentence feature [b, c] that seeds the decoder queries.

    source: "fused_text" / "text": tanh(Linear(first token)) of the text after / before the
    vision-to-text fusion; "text_mean": the same over the mean of the unpadded text tokens;
    "encoder": the text encoder's pooled output as given (no parameters here).
    """

    def __init__(self, d_model: int, source: str):
        super().__init__()
        if source not in SENTENCE_SOURCES:
            raise ValueError(f"sentence source {source!r}: expected one of {SENTENCE_SOURCES}")
        self.source = source
        if source != "encoder":
            self.dense = nn.Linear(d_model, d_model)

    def forward(self, text, text_mask, fused_text, encoder_sentence=None) -> torch.Tensor:
        # text, fused_text [l, b, c]; text_mask [b, l] (True = pad); encoder_sentence [b, c] or None
        if self.source == "encoder":
            if encoder_sentence is None:
                raise ValueError("sentence source 'encoder' needs the text encoder's pooled output")
            return encoder_sentence
        if self.source == "text_mean":
            tokens = text.transpose(0, 1)  # [b, l, c]
            keep = (~text_mask).to(tokens.dtype)[..., None]  # [b, l, 1]
            first = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)  # [b, c]
        else:
            first = (fused_text if self.source == "fused_text" else text)[0]  # [b, c]
        return torch.tanh(self.dense(first))


class VisionLanguageInteraction(nn.Module):
    def __init__(self, d_model: int, nhead: int, bidirectional: bool, sentence_source: str):
        """sentence_source: see `SentenceFeature`; without the vision-to-text update there is no fused
        text, so "fused_text" needs `bidirectional`."""
        super().__init__()
        if sentence_source == "fused_text" and not bidirectional:
            raise ValueError("sentence source 'fused_text' needs the bidirectional interaction")
        self.bidirectional = bidirectional
        self.text_to_vision = MultiplicativeCrossAttention(d_model, nhead)
        if bidirectional:
            self.vision_to_text = MultiplicativeCrossAttention(d_model, nhead)
        # named for the checkpoint keys (`vl_interaction.sentence_pool.dense.*`)
        self.sentence_pool = SentenceFeature(d_model, sentence_source)

    @property
    def needs_encoder_sentence(self) -> bool:
        """Whether `forward` needs the text encoder's pooled sentence."""
        return self.sentence_pool.source == "encoder"

    def forward(self, srcs, masks, poses, text, text_mask, text_pos, num_frames: int, encoder_sentence=None):
        """Fuse every level, then build the sentence feature.

        srcs/poses: list of [(b t), c, h, w]; masks: list of [(b t), h, w];
        text, text_pos: [l, b, c]; text_mask: [b, l]; encoder_sentence: [b, c] or None.
        Returns the fused srcs (same shapes) and the sentence feature [b, c].
        """
        text0, fused = text, []
        for src, mask, pos in zip(srcs, masks, poses):
            bt, c, h, w = src.shape
            b = bt // num_frames
            seq, seq_pos = map_to_seq(src, num_frames), map_to_seq(pos, num_frames)  # [(t h w), b, c]
            seq_mask = mask.reshape(b, num_frames * h * w)  # [b, (t h w)]
            if self.bidirectional:
                text = self.vision_to_text(text, seq, seq_mask, seq_pos)
            seq = self.text_to_vision(seq, text0, text_mask, text_pos)
            fused.append(seq_to_map(seq, num_frames, h, w))  # [(b t), c, h, w]
        return fused, self.sentence_pool(text0, text_mask, text, encoder_sentence)
