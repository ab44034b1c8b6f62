"""Batching of video clips and text tokenisation, as the official code does them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

SIZE_DIVISIBILITY = 32


class VideoBatch(NamedTuple):
    images: torch.Tensor  # [B, T, 3, Hp, Wp] float, zero padding bottom/right
    image_mask: torch.Tensor  # [B, T, Hp, Wp] bool, True on padded pixels
    captions: list[str]
    targets: list[dict]


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace (split on any whitespace, re-join with single spaces)."""
    return " ".join(text.lower().split())


def padded_size(sizes: Sequence[tuple[int, int]], divisibility: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    """Largest (H, W) over ``sizes``, each rounded up to a multiple of ``divisibility``."""
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    return math.ceil(max_h / divisibility) * divisibility, math.ceil(max_w / divisibility) * divisibility


def pad_clips(clips: Sequence[torch.Tensor], divisibility: int = SIZE_DIVISIBILITY):
    """Pad clips [T, 3, H_i, W_i] (same T) into images [B, T, 3, Hp, Wp] and a padding mask [B, T, Hp, Wp]."""
    lengths = {c.shape[0] for c in clips}
    if len(lengths) != 1:
        raise ValueError(f"pad_clips: expected every clip to have the same number of frames T, got {sorted(lengths)}")
    hp, wp = padded_size([tuple(c.shape[-2:]) for c in clips], divisibility)
    b, t, ch = len(clips), clips[0].shape[0], clips[0].shape[1]
    images = clips[0].new_zeros((b, t, ch, hp, wp))
    mask = torch.ones((b, t, hp, wp), dtype=torch.bool)
    for i, clip in enumerate(clips):
        h, w = clip.shape[-2:]
        images[i, :, :, :h, :w] = clip
        mask[i, :, :h, :w] = False
    return images, mask


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict | list[dict]]]) -> VideoBatch:
    """DataLoader collate for ``(imgs [T, 3, H, W], target)`` samples; captions come from the targets.

    Samples whose target is a list of k targets (k expressions sharing one clip) give ``images [B, ...]`` and
    ``B * k`` targets and captions in expression-major order: entry ``i * B + b`` is expression i of clip b (the
    order in which the model repeats a clip's visual features)."""
    clips, targets = zip(*batch)
    images, image_mask = pad_clips(clips)
    if isinstance(targets[0], list):
        counts = {len(t) for t in targets}
        if len(counts) != 1:
            raise ValueError(f"collate_fn: every clip needs the same number of expressions, got {sorted(counts)}")
        targets = [group[i] for i in range(counts.pop()) for group in targets]
    return VideoBatch(images, image_mask, [t["caption"] for t in targets], list(targets))


def tokenize(tokenizer, captions: Sequence[str], max_length: int | None = None):
    """Tokenise captions exactly as given, padded to the longest one.

    Normalising is the caller's choice: the training loaders (and A2D/JHMDB) give :func:`normalize_text` output,
    Ref-YouTube-VOS and Ref-DAVIS17 inference give the expression as written in the metadata, as the official
    inference does (the released checkpoints were evaluated on those tokens).
    Returns ``(input_ids [B, L] long, attention_mask [B, L] long)`` with the HuggingFace convention (1 on tokens,
    0 on padding); the model's text padding mask (True on padding) is ``attention_mask == 0``. Captions longer
    than ``max_length`` (default: the tokenizer's ``model_max_length`` when it is a real limit) are truncated.
    """
    if max_length is None and getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 100_000:
        max_length = int(tokenizer.model_max_length)
    enc = tokenizer(
        list(captions),
        padding="longest",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]
