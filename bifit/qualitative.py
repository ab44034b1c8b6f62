"""What the model did on one video and one expression: masks, per-frame query scores, reference points.

The whole video goes through the model in one pass (the Ref-YouTube-VOS protocol), with the official
post-processing (`bifit.models.postprocess.video_masks`), so the masks equal those of the evaluate stage. Load
the model with `bifit.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bifit.data.collate import tokenize
from bifit.inference import float32_outputs, inference_autocast, model_device, to_device
from bifit.models.postprocess import video_masks


@dataclass
class VideoDetails:
    caption: str
    masks: np.ndarray  # [t, H0, W0] bool, the chosen query at the original size
    probabilities: np.ndarray  # [t, H0, W0] float, sigmoid of the chosen query's mask logits
    scores: np.ndarray  # [t, q] sigmoid class score of every query in every frame
    best_query: int  # the query with the highest score averaged over frames
    reference_points: np.ndarray | None  # [t, q, 2] normalised (x, y) of the last decoder layer's input
    boxes: np.ndarray  # [t, q, 4] normalised (cx, cy, w, h)
    # [t, h, w] where the queries start (model.query_reference: text_guided): the referent map's probabilities on
    # the finest encoder level, each frame summing to 1; None for the learned start point
    referent_map: np.ndarray | None = None


@torch.no_grad()
def describe_video(model, tokenizer, frames: torch.Tensor, caption: str, orig_size: tuple[int, int],
                   threshold: float = 0.5, amp: bool = False) -> VideoDetails:
    """frames [t, 3, h, w] normalised and unpadded (as `bifit.data.load_video` returns them); runs on the
    model's device (``amp``: bfloat16 autocast, outputs read in float32), results as NumPy arrays."""
    model.eval()
    device = model_device(model)
    t, _, h, w = frames.shape
    clip = to_device(frames, device)[None]  # [1, t, 3, h, w]
    image_mask = torch.zeros((1, t, h, w), dtype=torch.bool, device=device)
    input_ids, attention_mask = tokenize(tokenizer, [caption])
    with inference_autocast(device, amp):
        outputs = model(clip, image_mask, to_device(input_ids, device), to_device(attention_mask, device),
                        torch.tensor([[h, w]], device=device), with_aux=False)
    outputs = float32_outputs(outputs)
    masks, probs, best, _ = video_masks(outputs, (h, w), orig_size, threshold)
    scores = outputs["pred_logits"][0].sigmoid().amax(-1)  # [t, q]
    refs = outputs.get("reference_points")
    ref_map = outputs.get("referent_map")  # [1, t, h, w] logits
    if ref_map is not None:
        ref_map = ref_map[0].flatten(1).softmax(-1).view_as(ref_map[0]).cpu().numpy()
    return VideoDetails(
        caption=caption, masks=masks.cpu().numpy(), probabilities=probs.float().cpu().numpy(),
        scores=scores.float().cpu().numpy(), best_query=best,
        reference_points=None if refs is None else refs[0].float().cpu().numpy(),
        boxes=outputs["pred_boxes"][0].float().cpu().numpy(), referent_map=ref_map)

