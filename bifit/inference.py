"""Inference engines: whole-video referring segmentation (Ref-YouTube-VOS / Ref-DAVIS style).

A video is processed in windows of `window` frames (None: the whole video in one forward pass, the
official Ref-YouTube-VOS protocol); each window picks its own best query (the official Ref-DAVIS
behaviour with 24-frame clips), so long videos never need all frames in memory at once. The visual
features of a window are computed once and shared by all expressions of the video.

Device and precision (params.yaml `eval.device`, `eval.amp`): every inference function runs where the model's
parameters are (the caller moves the model once, to :func:`resolve_device`'s answer). With ``amp`` the forward
pass runs under bfloat16 autocast (:func:`inference_autocast`, on CPU as on CUDA) and the outputs are cast to
float32 (:func:`float32_outputs`) before any sigmoid, upsampling or threshold, so no mask is decided in bfloat16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bifit.config import ConfigError
from bifit.data.collate import tokenize
from bifit.models.postprocess import video_masks

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, key: str = "eval.device") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu. ``cuda`` without a visible GPU raises ConfigError
    naming ``key`` (call it before any work, so a missing GPU stops the run at once)."""
    if name not in DEVICES:
        raise ConfigError(f"{key}: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' asks for a GPU but torch sees none (torch.cuda.is_available() is false; "
                          f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); set {key} to "
                          "auto or cpu, or run on a machine with a visible GPU")
    return torch.device(name)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def inference_autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on ``device`` when ``amp``, else a context that changes nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def float32_outputs(outputs: dict) -> dict:
    """The model outputs with every floating tensor in float32: scores and masks are decided in float32."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy, asynchronous when the host tensor is pinned (safe: the device stream orders it)."""
    return x.to(device, non_blocking=x.device.type == "cpu" and x.is_pinned())


def inference_settings(model, amp: bool) -> dict:
    """How the numbers were computed, for the metrics files and MLflow: {"device": "cpu" | "cuda", "amp": ...}."""
    return {"device": model_device(model).type, "amp": bool(amp)}


@dataclass
class VideoPrediction:
    masks: torch.Tensor  # [t, H0, W0] bool at the original frame size
    queries: list[int]  # the chosen query per window
    scores: list[float]  # its mean score per window
    frame_scores: torch.Tensor | None = None  # [t] float32: the chosen query's score in each frame


@torch.no_grad()
def predict_video(model, tokenizer, frames: torch.Tensor, captions: list[str], orig_size: tuple[int, int],
                  window: int | None = None, threshold: float = 0.5, batch: int = 8,
                  amp: bool = False) -> list[VideoPrediction]:
    """frames [t, 3, h, w] (normalised, one size, unpadded) and n captions -> n predictions, computed on the
    model's device (``amp``: bfloat16 autocast, masks thresholded in float32); masks come back on the CPU."""
    device = model_device(model)
    t, _, h, w = frames.shape
    window = window or t
    per_caption = [([], [], [], []) for _ in captions]
    for start in range(0, t, window):
        clip = to_device(frames[start : start + window], device)[None]  # [1, t', 3, h, w], unpadded
        image_mask = torch.zeros((1, clip.shape[1], h, w), dtype=torch.bool, device=device)
        with inference_autocast(device, amp):
            visual = model.encode_visual(clip, image_mask)
        for first in range(0, len(captions), batch):
            chunk = captions[first : first + batch]
            input_ids, attention_mask = tokenize(tokenizer, chunk)
            with inference_autocast(device, amp):
                outputs = model(None, None, to_device(input_ids, device), to_device(attention_mask, device),
                                torch.tensor([[h, w]] * len(chunk), device=device), with_aux=False,
                                visual=visual.repeat(len(chunk)))
            outputs = float32_outputs(outputs)
            for k in range(len(chunk)):
                binary, _, best, score = video_masks(outputs, (h, w), orig_size, threshold, clip=k)
                masks, queries, scores, frame_scores = per_caption[first + k]
                masks.append(binary.cpu())
                queries.append(best)
                scores.append(score)
                # [t', q, classes] -> [t']: the chosen query's score per frame (its mean over frames is `score`)
                frame_scores.append(outputs["pred_logits"][k, :, best].sigmoid().amax(-1).cpu())
    return [VideoPrediction(torch.cat(m), q, s, torch.cat(f)) for m, q, s, f in per_caption]
