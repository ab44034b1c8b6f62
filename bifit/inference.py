"""Inference engines: whole-video referring segmentation (Ref-YouTube-VOS / Ref-DAVIS style).

A video is processed in windows of `window` frames (None: the whole video in one forward pass, the
official Ref-YouTube-VOS protocol); each window picks its own best query (the official Ref-DAVIS
behaviour with 24-frame clips), so long videos never need all frames in memory at once. The visual
features of a window are computed once and shared by all expressions of the video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bifit.data.collate import tokenize
from bifit.models.postprocess import video_masks


@dataclass
class VideoPrediction:
    masks: torch.Tensor  # [t, H0, W0] bool at the original frame size
    queries: list[int]  # the chosen query per window
    scores: list[float]  # its mean score per window


@torch.no_grad()
def predict_video(model, tokenizer, frames: torch.Tensor, captions: list[str], orig_size: tuple[int, int],
                  window: int | None = None, threshold: float = 0.5, batch: int = 8) -> list[VideoPrediction]:
    """frames [t, 3, h, w] (normalised, one size, unpadded) and n captions -> n predictions."""
    device = next(model.parameters()).device
    t, _, h, w = frames.shape
    window = window or t
    per_caption = [([], [], []) for _ in captions]
    for start in range(0, t, window):
        clip = frames[start : start + window].to(device)[None]  # [1, t', 3, h, w], unpadded like the reference
        image_mask = torch.zeros((1, clip.shape[1], h, w), dtype=torch.bool, device=device)
        visual = model.encode_visual(clip, image_mask)
        for first in range(0, len(captions), batch):
            chunk = captions[first : first + batch]
            input_ids, attention_mask = tokenize(tokenizer, chunk)
            outputs = model(None, None, input_ids.to(device), attention_mask.to(device),
                            torch.tensor([[h, w]] * len(chunk), device=device), with_aux=False,
                            visual=visual.repeat(len(chunk)))
            for k in range(len(chunk)):
                binary, _, best, score = video_masks(outputs, (h, w), orig_size, threshold, clip=k)
                masks, queries, scores = per_caption[first + k]
                masks.append(binary.cpu())
                queries.append(best)
                scores.append(score)
    return [VideoPrediction(torch.cat(m), q, s) for m, q, s in per_caption]
