"""Visual backbone: torchvision ResNet with frozen batch norm, multi-scale outputs res2..res5."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class VisualBackbone(nn.Module):
    """ResNet body returning res2..res5 ([(b t), c_l, h_l, w_l], strides 4/8/16/32)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False, weights_path: str | None = None):
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"model.backbone: expected one of {sorted(RESNET_CHANNELS)}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"model.dilation: {name} (BasicBlock) does not support dilation")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        if weights_path:
            load_torchvision_weights(resnet, weights_path)
        for pname, p in resnet.named_parameters():
            if not train_backbone or not any(s in pname for s in ("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        layers = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
        self.body = IntermediateLayerGetter(resnet, return_layers=layers)
        self.num_channels = RESNET_CHANNELS[name]
        self.strides = (4, 8, 16, 32 if not dilation else 16)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(images)
        return [out["res2"], out["res3"], out["res4"], out["res5"]]


def load_torchvision_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load an ImageNet (torchvision-format) ResNet state dict from a local file; never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.backbone_weights: {path} does not exist. Place a torchvision ResNet state dict there "
            "(e.g. resnet50-0676ba61.pth) or set model.backbone_weights: null for random initialisation."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"model.backbone_weights: {path} does not match the ResNet: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
