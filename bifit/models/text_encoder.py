"""Text side: any Hugging Face encoder (hub id or local directory) plus the feature resizer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig


def build_hf_text_encoder(name_or_path: str | None = None, config: PretrainedConfig | dict | None = None) -> nn.Module:
    """`AutoModel.from_pretrained(name_or_path)`, or a randomly initialised model from a config."""
    if config is not None:
        if isinstance(config, dict):
            config = dict(config)
            model_type = config.pop("model_type", "roberta")
            add_pool = config.pop("add_pooling_layer", True)
            attn = config.pop("attn_implementation", None)
            config = AutoConfig.for_model(model_type, **config)
            if attn:
                config._attn_implementation = attn
            return AutoModel.from_config(config, add_pooling_layer=add_pool)
        return AutoModel.from_config(config)
    if not name_or_path:
        raise ValueError("model.text_encoder: expected a Hugging Face hub id or a local directory, got nothing")
    try:
        return AutoModel.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"model.text_encoder: could not load {name_or_path!r} ({err}). Use a local directory written with "
            "save_pretrained, or pre-cache the hub model (HF_HOME) on machines without internet."
        ) from err


class FeatureResizer(nn.Module):
    """Linear -> LayerNorm(eps 1e-12) -> Dropout: text width (encoder's hidden size) -> model width."""

    def __init__(self, input_dim: int, output_dim: int, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim)
        self.layer_norm = nn.LayerNorm(output_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.fc(x)))


def text_hidden_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    for attr in ("hidden_size", "d_model", "dim"):
        if hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise ValueError(f"model.text_encoder: cannot find the hidden size in {type(cfg).__name__}")
