"""Shared test helpers: the golden folder, a guard against reading outside the repository's reference
material, and a tiny model configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"  # reference inputs and outputs of the official code (tests/golden/README.md)
# The developers' reference folder beside the checkout: a user's clone has none, so no test may read it.
_OUTSIDE_REFERENCE = os.path.join(str(REPO.parent), "shared") + os.sep


def _refuse_outside_reference(event: str, args: tuple) -> None:
    if event != "open" or not args or isinstance(args[0], int):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if path.startswith(_OUTSIDE_REFERENCE):
        raise PermissionError(f"{path}: tests must not read the folder beside the checkout (a user's clone has "
                              f"none); copy what they need into tests/golden/")


sys.addaudithook(_refuse_outside_reference)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


def tiny_text_config(hidden: int = 48) -> dict:
    return dict(vocab_size=100, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=32, type_vocab_size=1, pad_token_id=1,
                bos_token_id=0, eos_token_id=2, model_type="roberta")


def tiny_model_config(**overrides):
    from bifit.config import ModelConfig

    base = dict(backbone="resnet18", text_encoder="<tiny>", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2,
                dim_feedforward=64, num_queries=3, msda_backend="pytorch")
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    from bifit.models import BIFIT
    from bifit.models.text_encoder import build_hf_text_encoder

    torch.manual_seed(seed)
    return BIFIT(tiny_model_config(**overrides), build_hf_text_encoder(config=tiny_text_config()))


def tiny_batch(b: int = 1, t: int = 2, h: int = 64, w: int = 96, seed: int = 0, pad_last: bool = False):
    """Random clip(s), token ids and single-object targets of the loss format."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, t, 3, h, w, generator=g)
    mask = torch.zeros(b, t, h, w, dtype=torch.bool)
    sizes = torch.tensor([[h, w]] * b)
    if pad_last and b > 1:
        mask[-1, :, h - 32 :, :] = True
        images[-1, :, :, h - 32 :, :] = 0
        sizes[-1, 0] = h - 32
    ids = torch.randint(3, 100, (b, 6), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    attn = torch.ones_like(ids)
    targets = []
    for i in range(b):
        hh, ww = int(sizes[i, 0]), int(sizes[i, 1])
        m = torch.zeros(t, hh, ww)
        m[:, hh // 4 : hh // 2, ww // 4 : ww // 2] = 1
        boxes = torch.tensor([[0.375, 0.375, 0.25, 0.25]]).repeat(t, 1)
        targets.append(dict(labels=torch.zeros(t, dtype=torch.long), boxes=boxes, masks=m,
                            valid=torch.ones(t, dtype=torch.long), size=sizes[i]))
    return images, mask, ids, attn, sizes, targets
