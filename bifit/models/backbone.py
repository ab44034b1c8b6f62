"""Visual backbones with multi-scale outputs res2..res5 ([(b t), c_l, h_l, w_l], strides 4/8/16/32).

- ResNet (`resnet18/34/50/101`): torchvision ResNet with frozen (or trainable) batch norm, per frame.
- Swin (`swin_{t,s,b,l}_p4w7`, bifit/models/swin.py): per frame; its four stage outputs play res2..res5.
- Video-Swin (`video_swin_{t,s,b}_p4w7`, bifit/models/video_swin.py): the clip is encoded jointly (3-D windows
  over time) and the features come back per frame.

The body is `self.body`, whose state-dict keys are the official body's (`backbone.0.body.*` in official
checkpoints, see bifit/checkpoint.py). As in the official model, the last three levels feed the transformer
(plus a stride-2 conv of the last one) and the first (stride 4) feeds the mask head's pixel decoder.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bifit.models.resnet import ARCHS, NORMS, FrozenBatchNorm2d, ResNetBody  # noqa: F401 (re-exported)
from bifit.models.swin import STRIDES, SWIN_VARIANTS, SwinTransformer
from bifit.models.video_swin import VIDEO_SWIN_VARIANTS, VideoSwinTransformer

# torchvision's order for "trainable layers": the last k of these train (official: 3, layer2-4)
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")

RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
BACKBONES = (*RESNET_CHANNELS, *SWIN_VARIANTS, *VIDEO_SWIN_VARIANTS)


def is_swin(name: str) -> bool:
    return name in SWIN_VARIANTS or name in VIDEO_SWIN_VARIANTS


def check_backbone_options(name: str, dilation: bool, norm: str, trainable_layers: int, where: str = "model") -> None:
    """The combinations of the backbone keys that apply (ValueError naming the key otherwise)."""
    if name not in BACKBONES:
        raise ValueError(f"{where}.backbone: expected one of {list(BACKBONES)}, got {name!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"{where}.backbone_trainable_layers: expected an integer in [0, 5], got {trainable_layers}")
    if dilation and name in ("resnet18", "resnet34"):
        raise ValueError(f"{where}.dilation: {name} (BasicBlock) does not support dilation")
    if dilation and is_swin(name):
        raise ValueError(f"{where}.dilation: expected false with {where}.backbone {name!r} (only a ResNet dilates)")
    if norm != "frozen_batch_norm" and is_swin(name):
        raise ValueError(f"{where}.backbone_norm: expected 'frozen_batch_norm' (the default) with {where}.backbone "
                         f"{name!r}: Swin bodies use their own LayerNorms; got {norm!r}")


def swin_trainable_prefixes(trainable_layers: int, video: bool) -> tuple[str, ...]:
    """Key prefixes of the last k units of (stage 4, stage 3, stage 2, stage 1, patch embedding). A stage comes
    with its output norm and the patch merging that feeds it (like torchvision's order for a ResNet)."""
    units = []
    for i in range(3, -1, -1):
        unit = [f"layers.{i}.blocks.", f"norm{i}."]
        if i > 0:
            unit.append(f"downsamples.{i - 1}." if video else f"layers.{i - 1}.downsample.")
        units.append(unit)
    units.append(["patch_embed."])
    return tuple(p for unit in units[:trainable_layers] for p in unit)


class VisualBackbone(nn.Module):
    """One of BACKBONES returning res2..res5 ([(b t), c_l, h_l, w_l], strides 4/8/16/32)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False, weights_path: str | None = None,
                 norm: str = "frozen_batch_norm", trainable_layers: int = 3):
        """trainable_layers: how many of layer4, layer3, layer2, layer1, stem (conv1 + bn1) train when
        train_backbone is true (torchvision's convention; official 3); for Swin the same count of stage 4..1 and
        the patch embedding (`swin_trainable_prefixes`). norm: one of NORMS (ResNet only)."""
        super().__init__()
        check_backbone_options(name, dilation, norm, trainable_layers)
        self.temporal = name in VIDEO_SWIN_VARIANTS  # needs the clip length: encodes frames jointly
        self.strides = STRIDES
        if is_swin(name):
            self.body = build_swin_body(name)
            if weights_path:
                load_swin_weights(self.body, weights_path)
            trainable = swin_trainable_prefixes(trainable_layers, self.temporal) if train_backbone else ()
            self.num_channels = tuple(self.body.num_channels)
        else:
            # channels-last kernels match the channels-last activations (no gradient layout copies under DDP)
            self.body = ResNetBody(name, dilation, norm).to(memory_format=torch.channels_last)
            if weights_path:
                load_torchvision_weights(self.body, weights_path)
            trainable = TRAINABLE_ORDER[:trainable_layers] if train_backbone else ()
            if "conv1" in trainable:
                trainable += ("bn1",)
            self.num_channels = RESNET_CHANNELS[name]
        for pname, p in self.body.named_parameters():
            if not pname.startswith(trainable):
                p.requires_grad_(False)

    def forward(self, images: torch.Tensor, num_frames: int | None = None) -> list[torch.Tensor]:
        """images [(b t), 3, H, W]; num_frames: t (Video-Swin encodes each clip jointly; per-frame bodies ignore it;
        None: all images are one clip)."""
        if self.temporal:
            return self.body(images, num_frames or images.shape[0])
        if isinstance(self.body, SwinTransformer):
            return self.body(images)
        # channels-last activations: oneDNN convolutions run faster on CPU, values are the same
        return self.body(images.contiguous(memory_format=torch.channels_last))


def build_swin_body(name: str) -> nn.Module:
    if name in VIDEO_SWIN_VARIANTS:
        return VideoSwinTransformer(**VIDEO_SWIN_VARIANTS[name])
    return SwinTransformer(**SWIN_VARIANTS[name])


def _read_weights(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.backbone_weights: {path} does not exist. Place {what} there or set model.backbone_weights: null "
            "for random initialisation."
        )
    return path, torch.load(path, map_location="cpu", weights_only=True)


def load_torchvision_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load an ImageNet (torchvision-format) ResNet state dict from a local file; never downloads.

    The classifier (fc.*) and num_batches_tracked entries are ignored."""
    path, state = _read_weights(path, "a torchvision ResNet state dict (e.g. resnet50-0676ba61.pth)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # trainable BN's counter
    if missing or unexpected:
        raise ValueError(
            f"model.backbone_weights: {path} does not match the ResNet: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


# entries of the releases that the backbone body does not use: the classifier, the final norm (the detection
# body has one norm per stage instead, the per-frame Video-Swin none), the classification Swin's fixed masks
_UNUSED = re.compile(r"^(head\.|cls_head\.|norm\.|fc\.)|\.attn_mask$|num_batches_tracked$")


def swin_release_state(state: dict, video: bool) -> dict:
    """An official release's state dict (Swin ImageNet `{"model": ...}`, Video-Swin Kinetics
    `{"state_dict": {"backbone.*", "cls_head.*"}}`, or bare) -> the body's keys. Video-Swin: `layers.{i}.downsample`
    -> `downsamples.{i}` and a temporal patch embedding [c, 3, pt, 4, 4] summed over time to [c, 3, 1, 4, 4]."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if any(k.startswith("backbone.") for k in state):  # mmaction/mmdet layout: keep the backbone's entries
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {}
    for key, value in state.items():
        if _UNUSED.search(key):
            continue
        if video:
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
            if m:
                key = f"downsamples.{m.group(1)}.{m.group(2)}"
            if key == "patch_embed.proj.weight" and value.dim() == 5 and value.shape[2] != 1:
                value = value.sum(dim=2, keepdim=True)  # the official temporal sum: pt -> 1
        out[key] = value
    return out


def load_swin_weights(body: nn.Module, path: str | Path) -> None:
    """Load an official Swin (ImageNet) or Video-Swin (Kinetics) release from a local file; never downloads.
    Entries the body does not use are ignored (`_UNUSED`); the detection body's per-stage norms `norm{i}`, absent
    from classification releases, keep their identity initialisation (as in the official code). Anything else
    missing, unexpected or mis-shaped is an error naming the keys."""
    video = isinstance(body, VideoSwinTransformer)
    path, raw = _read_weights(path, "an official Video-Swin (Kinetics) release" if video
                              else "an official Swin (ImageNet) release")
    if not isinstance(raw, dict):
        raise ValueError(f"model.backbone_weights: {path} holds a {type(raw).__name__}, expected a state dict")
    state = swin_release_state(raw, video)
    own = body.state_dict()
    missing = [k for k in own if k not in state and not re.match(r"norm\d+\.", k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"model.backbone_weights: {path} does not match the {type(body).__name__}: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {shapes[:4]}")
    body.load_state_dict(state, strict=False)
