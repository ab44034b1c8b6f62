"""ResNet body with frozen batch norm folded into the convolutions.

Same module names and state-dict keys as torchvision's ResNet (conv1, bn1, layer1.0.conv1, ...,
layer1.0.downsample.0/1), so torchvision ImageNet files and official checkpoints load unchanged.
Each frozen BN is applied by scaling the conv kernel and adding a bias (one weight-sized multiply)
instead of a multiply-add over the whole activation; the result is the same affine map.

`norm="batch_norm"` or `"group_norm"` swaps in trainable normalisation (for a backbone trained from
scratch, where frozen identity statistics leave the network unnormalised); the module names stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers (no num_batches_tracked)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


NORMS = ("frozen_batch_norm", "batch_norm", "group_norm")


def make_norm(kind: str, channels: int) -> nn.Module:
    """The backbone's normalisation layer: frozen BN (official, pretrained weights), trainable BN or GroupNorm(32)."""
    if kind == "frozen_batch_norm":
        return FrozenBatchNorm2d(channels)
    if kind == "batch_norm":
        return nn.BatchNorm2d(channels)
    if kind == "group_norm":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"model.backbone_norm: expected one of {NORMS}, got {kind!r}")


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)); a frozen BN is folded into the kernel."""
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    scale, shift = bn.scale_shift()
    return F.conv2d(x, conv.weight * scale[:, None, None, None], shift, conv.stride, conv.padding, conv.dilation)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm="frozen_batch_norm"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(conv_bn(x, self.conv1, self.bn1), inplace=True)
        out = conv_bn(out, self.conv2, self.bn2)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1])
        return F.relu(out.add_(identity), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm="frozen_batch_norm"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = make_norm(norm, planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(conv_bn(x, self.conv1, self.bn1), inplace=True)
        out = F.relu(conv_bn(out, self.conv2, self.bn2), inplace=True)
        out = conv_bn(out, self.conv3, self.bn3)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1])
        return F.relu(out.add_(identity), inplace=True)


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNetBody(nn.Module):
    """Stem + layer1..4; forward returns res2..res5 ([n, c_l, h_l, w_l], strides 4/8/16/32)."""

    def __init__(self, name: str, dilation: bool = False, norm: str = "frozen_batch_norm"):
        super().__init__()
        block, depths = ARCHS[name]
        self.norm = norm
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.inplanes, self.dilation = 64, 1
        self.layer1 = self._make_layer(block, 64, depths[0])
        self.layer2 = self._make_layer(block, 128, depths[1], stride=2)
        self.layer3 = self._make_layer(block, 256, depths[2], stride=2)
        self.layer4 = self._make_layer(block, 512, depths[3], stride=2, dilate=dilation)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        prev_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                make_norm(self.norm, planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, prev_dilation, self.norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation, norm=self.norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(conv_bn(x, self.conv1, self.bn1), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        return [res2, res3, res4, self.layer4(res4)]
