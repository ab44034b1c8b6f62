"""Visual backbone: torchvision ResNet with frozen batch norm, multi-scale outputs res2..res5."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bifit.models.resnet import ARCHS, NORMS, FrozenBatchNorm2d, ResNetBody  # noqa: F401 (re-exported)

# torchvision's order for "trainable layers": the last k of these train (official: 3, layer2-4)
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")

RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class VisualBackbone(nn.Module):
    """ResNet body returning res2..res5 ([(b t), c_l, h_l, w_l], strides 4/8/16/32)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False, weights_path: str | None = None,
                 norm: str = "frozen_batch_norm", trainable_layers: int = 3):
        """trainable_layers: how many of layer4, layer3, layer2, layer1, stem (conv1 + bn1) train when
        train_backbone is true (torchvision's convention; official 3). norm: one of NORMS."""
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"model.backbone: expected one of {sorted(ARCHS)}, got {name!r}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"model.backbone_trainable_layers: expected an integer in [0, 5], got {trainable_layers}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"model.dilation: {name} (BasicBlock) does not support dilation")
        # channels-last kernels match the channels-last activations (no gradient layout copies under DDP)
        self.body = ResNetBody(name, dilation, norm).to(memory_format=torch.channels_last)
        if weights_path:
            load_torchvision_weights(self.body, weights_path)
        trainable = TRAINABLE_ORDER[:trainable_layers] if train_backbone else ()
        if "conv1" in trainable:
            trainable += ("bn1",)
        for pname, p in self.body.named_parameters():
            if not pname.startswith(trainable):
                p.requires_grad_(False)
        self.num_channels = RESNET_CHANNELS[name]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # channels-last activations: oneDNN convolutions run faster on CPU, values are the same
        return self.body(images.contiguous(memory_format=torch.channels_last))


def load_torchvision_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load an ImageNet (torchvision-format) ResNet state dict from a local file; never downloads.

    The classifier (fc.*) and num_batches_tracked entries are ignored."""
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
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # trainable BN's counter
    if missing or unexpected:
        raise ValueError(
            f"model.backbone_weights: {path} does not match the ResNet: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
