"""Ref-YouTube-VOS inference on a GPU, float32 and bfloat16 autocast, against the CPU float32 run; runs only where a
GPU is visible (eval.device: cuda / eval.amp)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bifit.inference import predict_video, resolve_device
from tests.conftest import tiny_model
from tests.eval.fakes import WordTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CAPTIONS = ["red square left", "blue circle", "the big one"]


@pytest.fixture(scope="module")
def cpu_run():
    torch.manual_seed(1)
    frames = torch.randn(3, 3, 64, 96)
    model = tiny_model(seed=1).eval()  # seed 1: masks neither empty nor full, so agreement is informative
    return model, frames, predict_video(model, WordTokenizer(), frames, CAPTIONS, (64, 96), batch=2)


# (amp, least fraction of equal pixels): cuDNN convolutions use TF32 by default, bfloat16 keeps 8 mantissa bits;
# an untrained model's logits sit near the threshold, so a few pixels flip
@pytest.mark.parametrize("amp, agreement", [(False, 0.995), (True, 0.97)], ids=["float32", "bfloat16"])
def test_cuda_masks_match_the_cpu_run(cpu_run, amp, agreement):
    model, frames, reference = cpu_run
    device = resolve_device("cuda")
    gpu_model = copy.deepcopy(model).to(device)
    preds = predict_video(gpu_model, WordTokenizer(), frames, CAPTIONS, (64, 96), batch=2, amp=amp)
    assert next(gpu_model.parameters()).device.type == "cuda"
    for ref, pred in zip(reference, preds):
        assert pred.masks.device.type == "cpu" and pred.masks.dtype == torch.bool  # brought back for metrics
        assert pred.masks.shape == ref.masks.shape
        assert np.mean((pred.masks == ref.masks).numpy()) >= agreement
        assert pred.queries == ref.queries
        assert pred.scores == pytest.approx(ref.scores, abs=2e-3)
