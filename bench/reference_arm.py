"""The reference arm of the model benchmark: our model switched to the official formulations.

The parts where our implementation computes the same function differently are swapped back to
the official way of computing them, so one process can time both and check the outputs agree:
- deformable attention: the official path for the tensors' device: on CPU the pure-PyTorch
  grid_sample core (the official CPU path); on CUDA the classic Deformable-DETR kernels (one thread
  per output element, float32; `ops.ms_deform_attn.run_kernels(..., classic=True)`), or the
  pure-PyTorch core when the CUDA kernels cannot be built (`counts["msda_cuda_pytorch_fallback"]`);
- frozen batch norm: a multiply-add over every activation after each conv (not folded);
- attention: nn.MultiheadAttention with need_weights=True (the official call; no fused kernel);
- dynamic mask head: mask features repeated per query + relative coordinates concatenated, then
  grouped 1x1 convolutions (CondInst-style), for every decoder level (aux masks included).

`reference_formulations()` yields a dict counting the calls of each swapped formulation, so a
benchmark can check that the swap was exercised (a refactor that stops calling a swapped function
would otherwise leave the reference arm silently computing ours).
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import bifit.models.resnet as resnet
from bifit.models.mask_head import DynamicMaskHead


def _reference_conv_bn(x, conv, bn):
    return bn(conv(x))


def _reference_dynamic_mask(self, hs, centres, mask_features, image_sizes, num_frames):
    bt, q, _ = hs.shape
    b, t = bt // num_frames, num_frames
    _, c, h, w = mask_features.shape
    device = mask_features.device
    params = self.controller(hs).view(b, t * q, -1)  # [b, (t q), p]
    refs = centres.reshape(b, t * q, 2) * image_sizes.to(device).flip(-1)[:, None, :].to(hs.dtype)
    s = self.feat_stride
    shifts_x = torch.arange(0, w * s, s, dtype=torch.float32, device=device)
    shifts_y = torch.arange(0, h * s, s, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    locations = torch.stack((xx.reshape(-1), yy.reshape(-1)), 1) + s // 2  # [(h w), 2]
    rel = refs.reshape(b, t, q, 1, 1, 2) - locations.reshape(1, 1, 1, h, w, 2).to(hs.dtype)
    rel = rel.permute(0, 1, 2, 5, 3, 4)  # [b, t, q, 2, h, w]
    feats = mask_features.view(b, t, 1, c, h, w).repeat(1, 1, q, 1, 1, 1)
    feats = torch.cat([feats, rel.to(feats.dtype)], dim=3)  # [b, t, q, c+2, h, w]
    n = b * t * q
    weights, biases = self.split_params(params.flatten(0, 1))
    x = feats.reshape(1, -1, h, w)
    for i, (wt, bs) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, wt.reshape(-1, wt.shape[-1], 1, 1), bs.reshape(-1), groups=n)
        if i < len(weights) - 1:
            x = F.relu(x)
    return x.view(b, t, q, h, w)


def _reference_msda(counts):
    """The official deformable-attention core for the tensors' device (see the module docstring)."""
    from ops.build import BuildError, load_kernels
    from ops.ms_deform_attn import run_kernels
    from ops.reference import ms_deform_attn_pytorch

    def msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        if value.device.type == "cuda":
            try:
                kernels = load_kernels("cuda")
            except BuildError:
                kernels = None
            if kernels is not None:
                counts["msda_cuda_classic"] += 1
                dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
                # the classic kernels take float32/float64 only: the official MSDeformAttnFunction runs in float32
                with torch.autocast("cuda", enabled=False):
                    return run_kernels(kernels, value.to(dtype), spatial_shapes, level_start_index,
                                       sampling_locations.to(dtype), attention_weights.to(dtype), classic=True)
            counts["msda_cuda_pytorch_fallback"] += 1
        else:
            counts["msda_pytorch"] += 1
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)

    return msda


@contextlib.contextmanager
def reference_formulations():
    """Within the block, every BIFIT model computes the official way. Yields a Counter of the calls of each
    swapped formulation (conv_bn, dynamic_mask, mha, msda_*)."""
    from ops import ms_deform_attn as msda

    counts: Counter = Counter()
    saved_conv_bn, saved_mask = resnet.conv_bn, DynamicMaskHead.forward
    saved_mha = nn.MultiheadAttention.forward
    saved_backend = msda.get_backend() if hasattr(msda, "get_backend") else None
    ours_msda, ref_msda = msda.ms_deform_attn, _reference_msda(counts)
    # every module of the library that bound the core by name (`from ops.ms_deform_attn import ms_deform_attn`)
    bound = [(m, k) for name, m in list(sys.modules.items()) if m is not None and name.split(".")[0] in ("bifit", "ops")
             for k, v in list(vars(m).items()) if v is ours_msda]

    def conv_bn(x, conv, bn):
        counts["conv_bn"] += 1
        return _reference_conv_bn(x, conv, bn)

    def dynamic_mask(self, *args, **kwargs):
        counts["dynamic_mask"] += 1
        return _reference_dynamic_mask(self, *args, **kwargs)

    def mha_with_weights(self, *args, **kwargs):
        counts["mha"] += 1
        kwargs["need_weights"] = True
        return saved_mha(self, *args, **kwargs)

    resnet.conv_bn = conv_bn
    DynamicMaskHead.forward = dynamic_mask
    nn.MultiheadAttention.forward = mha_with_weights
    for module, key in bound:
        setattr(module, key, ref_msda)
    if hasattr(msda, "set_backend"):  # any path that still reaches our entry point runs the pure-PyTorch core
        msda.set_backend("pytorch")
    try:
        yield counts
    finally:
        resnet.conv_bn, DynamicMaskHead.forward = saved_conv_bn, saved_mask
        nn.MultiheadAttention.forward = saved_mha
        for module, key in bound:
            setattr(module, key, ours_msda)
        if saved_backend is not None:
            msda.set_backend(saved_backend)
