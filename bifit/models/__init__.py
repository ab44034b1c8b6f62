"""Model construction from a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from bifit.models.bifit import BIFIT
from bifit.models.text_encoder import build_hf_text_encoder


def build_model(cfg, text_encoder: nn.Module | None = None) -> BIFIT:
    """cfg: `bifit.config.ModelConfig`. The text encoder is loaded from `cfg.text_encoder` unless given."""
    from ops import ms_deform_attn as msda

    msda.set_backend(cfg.msda_backend)
    if text_encoder is None:
        text_encoder = build_hf_text_encoder(cfg.text_encoder)
    return BIFIT(cfg, text_encoder)


__all__ = ["BIFIT", "build_model"]
