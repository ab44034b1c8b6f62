"""Typed configuration loaded from `params.yaml`.

Every section of params.yaml maps to one dataclass below. Loading rejects unknown keys, wrong
types and out-of-range values with a message naming the file, the key and what was expected.

Validation is written one way for every configuration dataclass of the project (these, pipeline/config.py and the
generators' settings in bifit/synthetic): a `validate(self, where)` method stating each rule with `check(cond, key,
expected, value)`, `where` being the key prefix ("model", "datasets.davis", or the class name for settings built in
code). `load_config` validates the loaded sections (after overlays and overrides); frozen settings objects call
`self.validate()` from `__post_init__`, so one that exists is valid.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad value in a configuration file; the message names the file and the key."""


def check(cond: bool, key: str, expected: str, value: Any) -> None:
    """The one validation statement: raise ConfigError "<key>: expected <expected>, got <value>" unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def int_in(value: Any, lo: int, hi: int) -> bool:
    """`value` is an integer (numpy integers too, bools not) in [lo, hi]."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and lo <= value <= hi


@dataclass
class ModelConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "swin_t_p4w7", "swin_s_p4w7", "swin_b_p4w7",
                      "swin_l_p4w7", "video_swin_t_p4w7", "video_swin_s_p4w7", "video_swin_b_p4w7"] = "resnet50"
    # local file, never downloaded: a torchvision-format ResNet, an official Swin ImageNet or Video-Swin Kinetics
    # release (bifit/models/backbone.py)
    backbone_weights: str | None = None
    train_backbone: bool = True  # lr_backbone > 0 in the official code: layer2-4 trainable
    backbone_trainable_layers: int = 3  # of layer4, layer3, layer2, layer1, stem (torchvision order); official 3
    # (Swin: of stage 4, 3, 2, 1, patch embedding)
    backbone_norm: Literal["frozen_batch_norm", "batch_norm", "group_norm"] = "frozen_batch_norm"
    dilation: bool = False
    text_encoder: str = "roberta-base"  # hub id or local directory written with save_pretrained
    freeze_text_encoder: bool = True
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 4
    dec_layers: int = 4
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 5
    num_classes: int = 1  # binary referring
    controller_layers: int = 3
    dynamic_mask_channels: int = 8
    rel_coord: bool = True
    aux_loss: bool = True
    inter_frame_layers: int = 1  # BIFIT inter-frame interaction layers (0 turns the module off)
    bidirectional_vl: bool = True  # false: one-way fusion and the encoder's pooled sentence (ReferFormer)
    # where the bidirectional model's sentence feature comes from: the first token of the text after the
    # vision-to-text fusion (official), before it (the resized encoder output), or the mean of the resized
    # encoder output over the expression's tokens (text_mean)
    sentence_source: Literal["fused_text", "text", "text_mean"] = "fused_text"
    # where the decoder queries start: learned (official: a learned point per query, the same for every
    # expression) or text_guided (the soft-argmax of a sentence-to-token map; bifit/models/referent_map.py)
    query_reference: Literal["learned", "text_guided"] = "learned"
    # > 0: a linear head on the finest encoder level's tokens predicts the category of the object under each token
    # (trained with loss.token_category_coef; not in the official model). The number of categories of
    # data.categories: 4 for the generated benchmark (its shapes), 65 for Ref-YouTube-VOS
    token_category_classes: int = 0
    msda_backend: Literal["auto", "cpu", "cuda", "pytorch"] = "auto"

    def validate(self, where: str = "model"):
        for name in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "num_queries", "num_classes",
                     "dynamic_mask_channels", "enc_n_points", "dec_n_points"):
            check(getattr(self, name) >= 1, f"{where}.{name}", "an integer >= 1", getattr(self, name))
        for name in ("enc_layers", "inter_frame_layers", "token_category_classes"):
            check(getattr(self, name) >= 0, f"{where}.{name}", "an integer >= 0", getattr(self, name))
        check(0 <= self.backbone_trainable_layers <= 5, f"{where}.backbone_trainable_layers", "an integer in [0, 5]",
              self.backbone_trainable_layers)
        check(self.controller_layers >= 1, f"{where}.controller_layers", "an integer >= 1", self.controller_layers)
        check(0.0 <= self.dropout < 1.0, f"{where}.dropout", "a float in [0, 1)", self.dropout)
        check(self.num_feature_levels >= 3, f"{where}.num_feature_levels", "an integer >= 3", self.num_feature_levels)
        check(self.hidden_dim % self.nheads == 0, f"{where}.hidden_dim",
              f"a multiple of {where}.nheads ({self.nheads})", self.hidden_dim)
        check(self.hidden_dim % 32 == 0, f"{where}.hidden_dim", "a multiple of 32 (GroupNorm(32) on inputs)",
              self.hidden_dim)
        check(self.dec_layers >= 2 or not self.aux_loss, f"{where}.dec_layers",
              ">= 2 when aux_loss is on", self.dec_layers)
        check(bool(self.text_encoder), f"{where}.text_encoder", "a hub id or a local directory", self.text_encoder)
        check(not (self.dilation and self.backbone in ("resnet18", "resnet34")), f"{where}.dilation",
              f"false with {where}.backbone {self.backbone!r} (its BasicBlock cannot dilate; use resnet50/101)",
              self.dilation)
        swin = self.backbone.startswith(("swin_", "video_swin_"))
        check(not (self.dilation and swin), f"{where}.dilation",
              f"false with {where}.backbone {self.backbone!r} (only a ResNet dilates)", self.dilation)
        check(not swin or self.backbone_norm == "frozen_batch_norm", f"{where}.backbone_norm",
              f"'frozen_batch_norm' (the default) with {where}.backbone {self.backbone!r} (Swin bodies use their own "
              "LayerNorms)", self.backbone_norm)


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 2.0
    cost_dice: float = 5.0

    def validate(self, where: str = "matcher"):
        for f in dataclasses.fields(self):
            check(getattr(self, f.name) >= 0, f"{where}.{f.name}", "a float >= 0", getattr(self, f.name))


@dataclass
class LossConfig:
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 2.0
    dice_loss_coef: float = 5.0
    focal_alpha: float = 0.25
    referent_map_coef: float = 0.0  # the text-guided start point's map against the ground-truth mask (0: off)
    token_category_coef: float = 0.0  # the token-category head (model.token_category_classes) against the referent's
                                      # category on the tokens its mask covers (0: off)

    def validate(self, where: str = "loss"):
        for f in dataclasses.fields(self):
            check(getattr(self, f.name) >= 0, f"{where}.{f.name}", "a value >= 0", getattr(self, f.name))
        check(self.focal_alpha <= 1, f"{where}.focal_alpha", "a float in [0, 1]", self.focal_alpha)

    def weight_dict(self, dec_layers: int, aux_loss: bool) -> dict[str, float]:
        w = {"loss_ce": self.cls_loss_coef, "loss_bbox": self.bbox_loss_coef, "loss_giou": self.giou_loss_coef,
             "loss_mask": self.mask_loss_coef, "loss_dice": self.dice_loss_coef}
        if aux_loss:
            w.update({f"{k}_{i}": v for i in range(dec_layers - 1) for k, v in list(w.items())})
        if self.referent_map_coef > 0:
            w["loss_referent_map"] = self.referent_map_coef  # one map per frame, not per decoder layer
        if self.token_category_coef > 0:
            w["loss_token_category"] = self.token_category_coef  # one per frame, on the encoder's tokens
        return w


@dataclass
class DataConfig:
    # the video training set: ytvos = the Ref-YouTube-VOS-format data at `root`; a2d = the A2D-Sentences train
    # split (the pipeline reads it from the a2d preprocess output; one annotated frame per clip, as the official
    # A2D training)
    dataset: Literal["ytvos", "a2d"] = "ytvos"
    root: str = "data/synthetic/ref-youtube-vos"  # the Ref-YouTube-VOS-format training data
    num_frames: int = 6
    train_scales: list[int] = field(default_factory=lambda: [288, 320, 352, 392, 416, 448, 480, 512])
    max_size: int = 640
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    # how often a training clip takes the resize-crop-resize branch instead of the plain resize (official 0.5)
    crop_probability: float = 0.5
    categories: Literal["ytvos", "synthetic"] = "ytvos"  # class list used to read category names
    # "official": the reference PhotometricDistort (hue shift, random channel permutation, uint8 wrap-around);
    # "colour_preserving": brightness/contrast/saturation only, for data whose expressions name colours
    photometric: Literal["official", "colour_preserving", "none"] = "official"
    eval_short_side: int = 360
    num_workers: int = 0
    skip_bad_samples: bool = False
    # "none": clips drawn independently (official); "video": every batch holds expressions of one video about
    # different objects (bifit/data/samplers.py), so each step contrasts referents in the same scene
    batch_grouping: Literal["none", "video"] = "none"
    # 1 (official): one expression per clip. k > 1: each clip is decoded with k expressions of its video (the
    # sampled one plus expressions about the other objects in the clip); the backbone runs once per clip
    expressions_per_clip: int = 1

    def validate(self, where: str = "data"):
        check(self.num_frames >= 1, f"{where}.num_frames", "an integer >= 1", self.num_frames)
        check(len(self.train_scales) > 0 and all(s >= 32 for s in self.train_scales), f"{where}.train_scales",
              "a non-empty list of integers >= 32", self.train_scales)
        check(self.max_size >= max(self.train_scales), f"{where}.max_size", ">= the largest train scale",
              self.max_size)
        check(1 <= self.crop_min <= self.crop_max, f"{where}.crop_min", f"1 <= crop_min <= crop_max ({self.crop_max})",
              self.crop_min)
        check(len(self.crop_resize_scales) > 0 and min(self.crop_resize_scales) >= self.crop_min,
              f"{where}.crop_resize_scales", f"a non-empty list of sizes >= crop_min ({self.crop_min})",
              self.crop_resize_scales)
        check(0.0 <= self.crop_probability <= 1.0, f"{where}.crop_probability", "a float in [0, 1]",
              self.crop_probability)
        check(self.eval_short_side >= 32, f"{where}.eval_short_side", "an integer >= 32", self.eval_short_side)
        check(self.num_workers >= 0, f"{where}.num_workers", "an integer >= 0", self.num_workers)
        check(self.expressions_per_clip >= 1, f"{where}.expressions_per_clip", "an integer >= 1",
              self.expressions_per_clip)
        check(self.dataset == "ytvos" or (self.expressions_per_clip == 1 and self.batch_grouping == "none"),
              f"{where}.dataset", "'ytvos' with expressions_per_clip > 1 or batch_grouping 'video' (A2D clips have one "
              "annotated expression and no per-video grouping)", self.dataset)


@dataclass
class TrainConfig:
    seed: int = 42
    epochs: int = 10
    batch_size: int = 1
    lr: float = 5e-5
    lr_backbone: float = 1e-5
    lr_text_encoder: float = 1e-5
    lr_text_fusion: float = 5e-5
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 5e-4
    lr_drop: list[int] = field(default_factory=lambda: [6, 8])
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    amp: bool = True  # mixed precision on GPU only
    skip_nonfinite_batches: bool = False  # true: skip a batch whose loss is NaN/inf (counted) instead of stopping
    max_steps_per_epoch: int | None = None
    # > 0: the exported model is the exponential moving average of the weights with this decay per optimizer step
    # (bifit/ema.py; not in the official recipe); 0: the last weights
    ema_decay: float = 0.0
    # true: torch.use_deterministic_algorithms (warn-only) and deterministic cuDNN/cuBLAS; CPU runs are bitwise
    # reproducible without it, GPU runs only up to the ops that have no deterministic CUDA kernel (README)
    deterministic: bool = False
    # what the train stage trains on and from (pipeline/train.py): scratch = the video training set from random
    # weights; pretrain_finetune = the pretrain stage's model (image datasets) fine-tuned on it; joint = the video
    # set and the image datasets mixed, from random weights
    recipe: Literal["scratch", "pretrain_finetune", "joint"] = "scratch"
    # a checkpoint (ours or an official file) the train stage starts from, minus the class heads (as the official
    # --pretrained_weights); with recipe pretrain_finetune the pretrain stage's model instead
    start_from: str | None = None

    def validate(self, where: str = "train"):
        check(self.epochs >= 1, f"{where}.epochs", "an integer >= 1", self.epochs)
        check(self.batch_size >= 1, f"{where}.batch_size", "an integer >= 1", self.batch_size)
        for name in ("lr", "lr_backbone", "lr_text_encoder", "lr_text_fusion", "lr_linear_proj_mult",
                     "weight_decay", "clip_max_norm"):
            check(getattr(self, name) >= 0, f"{where}.{name}", "a float >= 0", getattr(self, name))
        check(self.lr > 0, f"{where}.lr", "a float > 0", self.lr)
        check(0 < self.lr_gamma <= 1, f"{where}.lr_gamma", "a float in (0, 1]", self.lr_gamma)
        check(0 <= self.ema_decay < 1, f"{where}.ema_decay", "a float in [0, 1) (0: off)", self.ema_decay)
        check(all(e >= 1 for e in self.lr_drop), f"{where}.lr_drop", "a list of epochs >= 1", self.lr_drop)
        check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, f"{where}.max_steps_per_epoch",
              "null or an integer >= 1", self.max_steps_per_epoch)
        check(self.start_from is None or (bool(self.start_from) and self.recipe != "pretrain_finetune"),
              f"{where}.start_from", "null with recipe pretrain_finetune (it starts from the pretrain stage's model), "
              "else null or a checkpoint path", self.start_from)


@dataclass
class EvalConfig:
    threshold: float = 0.5
    num_frames: int | None = None  # inference window in frames; null = the whole video in one pass (YTVOS)
    batch_expressions: int = 8  # expressions of one video run together on its shared visual features
    # where inference runs: auto = cuda when torch sees a GPU, else cpu; cuda without a GPU is refused when an
    # evaluation starts (bifit.inference.resolve_device), not here: loading params must work on any machine
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # bfloat16 autocast for the forward pass (CPU too); mask logits are thresholded in float32

    def validate(self, where: str = "eval"):
        check(0 < self.threshold < 1, f"{where}.threshold", "a float in (0, 1)", self.threshold)
        check(self.num_frames is None or self.num_frames >= 1, f"{where}.num_frames", "null or an integer >= 1",
              self.num_frames)
        check(self.batch_expressions >= 1, f"{where}.batch_expressions", "an integer >= 1", self.batch_expressions)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.loss.token_category_coef > 0:
            check(self.model.token_category_classes > 0, "model.token_category_classes",
                  "an integer > 0 while loss.token_category_coef is > 0 (the head the loss trains)",
                  self.model.token_category_classes)
        if self.model.token_category_classes > 0:
            expected = len(category_names(self.data.categories))
            check(self.model.token_category_classes == expected, "model.token_category_classes",
                  f"{expected} (the number of categories of data.categories: {self.data.categories}) or 0",
                  self.model.token_category_classes)
        return self


def category_names(categories: str) -> tuple[str, ...]:
    """The class list `data.categories` names: the 65 Ref-YouTube-VOS categories or the generated shapes."""
    if categories == "synthetic":
        from bifit.synthetic.config import SYNTHETIC_CATEGORIES
        return SYNTHETIC_CATEGORIES
    from bifit.data.ytvos import YTVOS_CATEGORIES
    return YTVOS_CATEGORIES


# Keys of earlier versions that could hold one value only. The configs saved in checkpoints (and older params
# files) still have them: from_dict checks that such a key holds that value, then drops it.
# (section class, key) -> (the value, given the section's mapping; what is expected)
RETIRED_KEYS = {
    (ModelConfig, "mask_dim"): (lambda d: d.get("hidden_dim", ModelConfig.hidden_dim),
                                "equal to {where}.hidden_dim ({value})"),
    (LossConfig, "mask_out_stride"): (lambda d: 4, "4 (masks are predicted at 1/4)"),
}


def _drop_retired_keys(cls, data: dict, where: str) -> dict:
    data = dict(data)
    for (section, key), (value_of, expected) in RETIRED_KEYS.items():
        if section is cls and key in data:
            value = value_of(data)
            check(data[key] == value, f"{where}.{key}", expected.format(where=where, value=value), data[key])
            del data[key]
    return data


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, _type_name(tp), value)
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        check(isinstance(value, (list, tuple)), key, f"a list of {_type_name(args[0])}", value)
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        check(isinstance(value, (list, tuple)) and len(value) == len(args), key,
              f"a list of {len(args)} values", value)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        check(isinstance(value, list), key, f"a list of {_type_name(args[0])}", value)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # e.g. the sweep grid: {"model.inter_frame_layers": [0, 1, 2]}
        check(isinstance(value, dict), key, f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}", value)
        return {_coerce(k, args[0], f"{key} (a key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        check(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        check(math.isfinite(value), key, "a finite number", value)
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, "a string", value)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types (`where`: key prefix)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    data = _drop_retired_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    prefix = f"{where}." if where else ""
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a frozen settings object validates when built: name where it was read
        raise ConfigError(f"{where or 'top level'}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} written twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "YAML would keep the last one silently", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """The YAML document in `path`, refusing duplicate keys at any level."""
    return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path = "params.yaml", overrides: dict | None = None, cls=None):
    """Read and validate a params file into `cls` (default `Config`; the pipeline passes a subclass that adds
    its own sections). `overrides` maps dotted keys to values, e.g. {"train.epochs": 1}."""
    cls = cls or Config
    path = Path(path)
    try:
        raw = read_yaml(path) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if overrides and "overlay" in overrides:
        raw["overlay"] = overrides["overlay"]
    for overlay_path in _overlay_paths(path, raw.pop("overlay", None)):
        raw = _deep_merge(raw, _read_overlay(path, overlay_path))
    for key, value in (overrides or {}).items():
        if key == "overlay":
            continue
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    try:
        return from_dict(cls, raw).validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _overlay_paths(path: Path, overlay) -> list[Path]:
    """`overlay`: null, one file or a list of files (applied in order; later files win), relative to `path`."""
    if overlay is None:
        return []
    names = [overlay] if isinstance(overlay, str) else overlay
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: overlay: expected null, a file name or a list of file names, got {overlay!r}")
    return [Path(n) if Path(n).is_absolute() else path.parent / n for n in names]


def _read_overlay(path: Path, overlay_path: Path) -> dict:
    try:
        extra = read_yaml(overlay_path) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: overlay: cannot read {overlay_path} ({err})") from err
    if not isinstance(extra, dict) or "overlay" in extra:
        raise ConfigError(f"{overlay_path}: expected a mapping of sections without its own overlay")
    return extra


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'hidden_dim': 256}} -> {'model.hidden_dim': 256} (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
