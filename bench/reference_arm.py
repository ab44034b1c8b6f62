"""The reference arm of the model benchmark: our model switched to the official formulations.

The parts where our implementation computes the same function differently are swapped back to
the official way of computing them, so one process can time both and check the outputs agree:
- deformable attention: the pure-PyTorch grid_sample core (the official CPU path);
- frozen batch norm: a multiply-add over every activation after each conv (not folded);
- attention: nn.MultiheadAttention with need_weights=True (the official call; no fused kernel);
- dynamic mask head: mask features repeated per query + relative coordinates concatenated, then
  grouped 1x1 convolutions (CondInst-style), for every decoder level (aux masks included).
"""

from __future__ import annotations

import contextlib

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
    params = self.controller(hs).view(b, t * q, -1)  # [b, (t q), p]
    refs = centres.reshape(b, t * q, 2) * image_sizes.flip(-1)[:, None, :].to(hs.dtype)
    s = self.feat_stride
    shifts_x = torch.arange(0, w * s, s, dtype=torch.float32)
    shifts_y = torch.arange(0, h * s, s, dtype=torch.float32)
    yy, xx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    locations = torch.stack((xx.reshape(-1), yy.reshape(-1)), 1) + s // 2  # [(h w), 2]
    rel = refs.reshape(b, t, q, 1, 1, 2) - locations.reshape(1, 1, 1, h, w, 2).to(hs.dtype)
    rel = rel.permute(0, 1, 2, 5, 3, 4)  # [b, t, q, 2, h, w]
    feats = mask_features.view(b, t, 1, c, h, w).repeat(1, 1, q, 1, 1, 1)
    feats = torch.cat([feats, rel], dim=3)  # [b, t, q, c+2, h, w]
    n = b * t * q
    weights, biases = self.split_params(params.flatten(0, 1))
    x = feats.reshape(1, -1, h, w)
    for i, (wt, bs) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, wt.reshape(-1, wt.shape[-1], 1, 1), bs.reshape(-1), groups=n)
        if i < len(weights) - 1:
            x = F.relu(x)
    return x.view(b, t, q, h, w)


@contextlib.contextmanager
def reference_formulations():
    """Within the block, every BIFIT model computes the official way."""
    from ops import ms_deform_attn as msda

    saved_conv_bn, saved_mask = resnet.conv_bn, DynamicMaskHead.forward
    saved_mha = nn.MultiheadAttention.forward
    saved_backend = msda.get_backend() if hasattr(msda, "get_backend") else None

    def mha_with_weights(self, *args, **kwargs):
        kwargs["need_weights"] = True
        return saved_mha(self, *args, **kwargs)

    resnet.conv_bn = _reference_conv_bn
    DynamicMaskHead.forward = _reference_dynamic_mask
    nn.MultiheadAttention.forward = mha_with_weights
    if hasattr(msda, "set_backend"):
        msda.set_backend("pytorch")
    try:
        yield
    finally:
        resnet.conv_bn, DynamicMaskHead.forward = saved_conv_bn, saved_mask
        nn.MultiheadAttention.forward = saved_mha
        if saved_backend is not None:
            msda.set_backend(saved_backend)
