"""Loading a trained model for inference: :func:`load_model`, the one way to do it (evaluate stages, the sweep's
trials, the notebooks).

The architecture built is the one the checkpoint was trained with, never the caller's current settings:

- our checkpoints (``bifit-checkpoint-v1``, :func:`bifit.checkpoint.save_checkpoint`): the ``model`` section of
  the configuration saved in the file;
- official BIFIT/ReferFormer training files: their ``args`` (the official ``opts.py`` namespace) mapped to a
  :class:`~bifit.config.ModelConfig` by :func:`model_config_from_official_args` (the mapping the parity check
  uses), the official key names mapped to ours (:data:`bifit.checkpoint.KEY_MAP`). An official file that carries
  no ``args`` (a bare state dict, released weights) does not say its architecture: the caller names it
  (``architecture=``), else the file is refused.

Only settings that do not change the weights' shapes can be overridden (:data:`OVERRIDABLE`): where the text
encoder's files are (an official file's args do not name one: the official code hard-codes ``roberta-base``), the
deformable-attention backend, and training-only switches. The weights are loaded strictly: a file of another
architecture lists its missing, unexpected and mis-shaped keys, naming the file.

A training run that starts from another checkpoint (the official ``--pretrained_weights``) loads it into the model it
built with :func:`load_start_weights`: the same two kinds of file, the class heads dropped, the rest strict.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bifit.checkpoint import (
    OUR_FORMAT,
    CheckpointError,
    convert_official_state_dict,
    extract_model_state,
    load_official_state,
    load_state_dict_strict,
    official_to_ours,
    safe_load,
)
from bifit.config import ConfigError, ModelConfig, from_dict, to_dict

OFFICIAL_TEXT_ENCODER = "roberta-base"  # what the official code loads (its args do not name a text encoder)
RUN_ID = re.compile(r"(?:runs:/)?([0-9a-f]{32})/?")  # an MLflow run id, bare or as runs:/<id>
# MLflow run ids are resolved by the pipeline package, the one place that talks to MLflow: the library never imports
# MLflow, so the resolver is imported by name, only when a run id is given (`import bifit` stays free of it).
RUN_RESOLVER = "pipeline.run_checkpoint"
# ModelConfig fields that leave the state dict's keys and shapes unchanged
OVERRIDABLE = ("text_encoder", "msda_backend", "backbone_weights", "train_backbone", "backbone_trainable_layers",
               "freeze_text_encoder", "dropout")


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    config: ModelConfig  # the architecture built (the checkpoint's, with the overrides)
    tokenizer: Any  # of config.text_encoder
    checkpoint: dict  # the file's other entries (ours: format, config, epoch, mlflow_run_id, ...; official: args, ...)
    official: bool  # an official BIFIT/ReferFormer file

    def segment(self, video, texts, config=None, *, progress: bool = False, **options):
        """Segment `video` (a video file, a frame folder, an image or uint8 [T, H, W, 3]) with each sentence of
        `texts`: one :class:`bifit.segment.ExpressionResult` per sentence (``.masks`` [T, H, W] bool, ``.save``).
        Options: :class:`bifit.segment.SegmentConfig` fields (``window``, ``every``, ``amp``, ...)."""
        # imported by name: the pipeline stages load models but never segment a user's video, so the video tool
        # (PyAV, the overlay writer) is not among their DVC dependencies (tests/dvc/imports.py follows imports)
        return importlib.import_module("bifit.segment").segment(self, video, texts, config, progress=progress,
                                                                 **options)


def model_config_from_official_args(args: dict, where: str = "args",
                                    text_encoder: str = OFFICIAL_TEXT_ENCODER) -> ModelConfig:
    """The official ``opts.py`` values (``vars(args)`` of an official training file) -> our ModelConfig."""
    if args.get("two_stage"):
        raise ValueError(f"{where}.two_stage: only two_stage=False is supported")
    if not args.get("with_box_refine", True):
        raise ValueError(f"{where}.with_box_refine: only with_box_refine=True is supported")
    if args.get("mask_dim", args["hidden_dim"]) != args["hidden_dim"]:
        raise ValueError(f"{where}.mask_dim: only mask_dim == hidden_dim ({args['hidden_dim']}) is supported, "
                         f"got {args['mask_dim']}")
    return ModelConfig(
        backbone=args.get("backbone", "resnet50"), backbone_weights=None, dilation=bool(args.get("dilation", False)),
        train_backbone=float(args.get("lr_backbone", 1e-5)) > 0, text_encoder=text_encoder,
        freeze_text_encoder=bool(args.get("freeze_text_encoder", True)), hidden_dim=args["hidden_dim"],
        nheads=args["nheads"], enc_layers=args["enc_layers"], dec_layers=args["dec_layers"],
        dim_feedforward=args["dim_feedforward"], dropout=args["dropout"],
        num_feature_levels=args["num_feature_levels"], enc_n_points=args["enc_n_points"],
        dec_n_points=args["dec_n_points"], num_queries=args["num_queries"],
        num_classes=1 if args.get("binary", True) else 65,
        controller_layers=args["controller_layers"], dynamic_mask_channels=args["dynamic_mask_channels"],
        rel_coord=bool(args.get("rel_coord", True)), aux_loss=bool(args.get("aux_loss", True)),
        inter_frame_layers=args.get("query_enc_layers", 1), bidirectional_vl=True, msda_backend="auto",
    )


def _missing_directory(text_encoder: str) -> bool:
    """A text encoder recorded as an absolute directory that does not exist here (trained on another machine)."""
    return Path(text_encoder).is_absolute() and not Path(text_encoder).exists()


def _recorded_architecture(obj, where: str, architecture: ModelConfig | None,
                           text_encoder_fallback: str | None) -> tuple[ModelConfig, bool]:
    """(the architecture the file was trained with, whether it is an official file)."""
    if isinstance(obj, dict) and obj.get("format") == OUR_FORMAT:
        saved = obj.get("config")
        if not isinstance(obj.get("model"), dict) or not isinstance(saved, dict) or not isinstance(
                saved.get("model"), dict):
            raise CheckpointError(f"{where}: a {OUR_FORMAT} file without its weights ('model') or its saved model "
                                  "configuration ('config' -> 'model')")
        try:
            cfg = from_dict(ModelConfig, dict(saved["model"]), "model")
        except ConfigError as err:
            raise CheckpointError(f"{where}: its saved model configuration is not readable here: {err}") from None
        if text_encoder_fallback is not None and _missing_directory(cfg.text_encoder):
            cfg.text_encoder = str(text_encoder_fallback)
        return cfg, False
    try:
        extract_model_state(obj, where)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (neither a {OUR_FORMAT} file nor an official BIFIT/ReferFormer "
                              "checkpoint)") from None
    args = obj.get("args") if "model" in obj else None
    if args is not None:
        args = vars(args) if isinstance(args, argparse.Namespace) else args
        if not isinstance(args, dict):
            raise CheckpointError(f"{where}: 'args' is a {type(args).__name__}, expected the official argparse "
                                  "namespace")
        text_encoder = args.get("text_encoder") or text_encoder_fallback or OFFICIAL_TEXT_ENCODER
        try:
            return model_config_from_official_args(args, f"{where}: args", text_encoder), True
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{where}: its official args do not describe a supported model ({err})") from None
    if architecture is None:
        kind = "an official file without args" if "model" in obj else "a bare state dict"
        raise CheckpointError(f"{where}: {kind} does not record its architecture, and neither a {OUR_FORMAT} "
                              "file (no saved config); pass architecture=ModelConfig(...) (e.g. the paper's model "
                              "section) to load it")
    cfg = dataclasses.replace(architecture)
    if text_encoder_fallback is not None:
        cfg.text_encoder = str(text_encoder_fallback)
    return cfg, True


def _apply_overrides(cfg: ModelConfig, overrides: dict, where: str) -> ModelConfig:
    wrong = sorted(set(overrides) - set(OVERRIDABLE))
    if wrong:
        raise ValueError(f"load_model overrides: {wrong} would change the architecture recorded in {where} (or are "
                         f"not model settings); only {list(OVERRIDABLE)} can be overridden")
    cfg = from_dict(ModelConfig, {**to_dict(cfg), **overrides}, "model")
    cfg.validate()
    return cfg


def run_id_of(spec) -> str | None:
    """The MLflow run id `spec` names (a 32-hex id or ``runs:/<id>``) when it is not a file here, else None."""
    match = RUN_ID.fullmatch(str(spec))
    return match.group(1) if match and not Path(spec).exists() else None


def resolve_checkpoint(spec, tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """(the checkpoint file, a text encoder to fall back on or None) of a path or an MLflow run id (the run's
    checkpoint, downloaded from its store by ``pipeline.run_checkpoint``; store: `tracking_uri`, else
    MLFLOW_TRACKING_URI, else params.yaml's)."""
    run_id = run_id_of(spec)
    if run_id is None:
        return Path(spec), None
    try:
        resolver = importlib.import_module(RUN_RESOLVER)
    except ImportError as err:
        raise CheckpointError(f"checkpoint {spec}: looks like an MLflow run id, which needs the project's pipeline "
                              f"package and mlflow ({err}); pass the checkpoint file instead") from None
    path, text_encoder = resolver.checkpoint_of_run_id(run_id, tracking_uri)
    return Path(path), None if text_encoder is None else str(text_encoder)


def load_model(path_or_official_file, overrides: dict | None = None, device=None, *,
               architecture: ModelConfig | None = None, text_encoder_fallback: str | None = None,
               tracking_uri: str | None = None) -> LoadedModel:
    """Build the architecture a checkpoint was trained with, load its weights strictly and return the model in
    eval mode on ``device`` with its config and tokenizer (module docstring).

    path_or_official_file: one of our checkpoints or an official BIFIT/ReferFormer file (read with
        ``torch.load(weights_only=True)``: a pickle that would run code is refused), or an MLflow run id
        (``runs:/<id>`` too) whose checkpoint is fetched from the store `tracking_uri` (:func:`resolve_checkpoint`).
    overrides: ModelConfig fields that do not change the architecture (:data:`OVERRIDABLE`), e.g.
        ``{"msda_backend": "pytorch"}`` or ``{"text_encoder": "/path/roberta-base"}``.
    device: a ``torch.device``, or ``auto`` | ``cpu`` | ``cuda`` (None: auto, the GPU when torch sees one; cuda
        without a GPU raises before the file is read).
    architecture: the ModelConfig of an official file that records no ``args`` (ignored for any other file).
    text_encoder_fallback: the text encoder used where the file names none available here: an official file
        (its args name none; default ``roberta-base``), or one of ours whose encoder is a directory that does
        not exist on this machine. Only its architecture and tokenizer are used; the weights come from the file.

    A recorded ``msda_backend: cuda`` becomes ``auto`` on a CPU device (an override is kept as given).
    """
    from transformers import AutoTokenizer

    from bifit.inference import resolve_device
    from bifit.models import build_model

    device = device if isinstance(device, torch.device) else resolve_device(device or "auto", "device")
    path, run_text_encoder = resolve_checkpoint(path_or_official_file, tracking_uri)
    text_encoder_fallback = text_encoder_fallback or run_text_encoder
    where = f"checkpoint {path}"
    obj = safe_load(path)
    cfg, official = _recorded_architecture(obj, where, architecture, text_encoder_fallback)
    overrides = dict(overrides or {})
    if cfg.msda_backend == "cuda" and device.type != "cuda" and "msda_backend" not in overrides:
        overrides["msda_backend"] = "auto"
    cfg = _apply_overrides(cfg, overrides, where)
    model = build_model(cfg)
    if official:
        rest = load_official_state(model, obj, where)
    else:
        load_state_dict_strict(model, obj["model"], where)
        rest = {k: v for k, v in obj.items() if k != "model"}
    # moved once: every inference function runs where the model's parameters are
    return LoadedModel(model.to(device).eval(), cfg, AutoTokenizer.from_pretrained(cfg.text_encoder), rest, official)


# --- starting a training run from another checkpoint (the official --pretrained_weights) ---------------------------

# official prefixes of the modules BIFIT adds to ReferFormer: weights released by ReferFormer have none of them
BIFIT_ONLY_OFFICIAL = ("text_fusion_module.", "poolout_module.", "transformer.decoder.query_encoder_layers.")


@dataclass
class StartReport:
    """What :func:`load_start_weights` did (:meth:`summary` prints it at the start of a run)."""

    path: Path
    kind: str  # "ours" | "official"
    dropped: list[str]  # the class heads (our key names): not read from the file, the model's own initial values
    kept_initialisation: list[str]  # BIFIT-only keys a ReferFormer-style file lacks: the model's own initial values
    loaded: int  # tensors loaded from the file

    def summary(self) -> str:
        source = "our checkpoint" if self.kind == "ours" else "the official BIFIT/ReferFormer file"
        text = (f"Starting from {source} {self.path}: {self.loaded} tensors loaded; "
                f"{len(self.dropped)} class-head tensors dropped, keeping this model's initialisation "
                f"({_grouped(self.dropped)}), as the official fine-tuning from pretrained weights does")
        if self.kept_initialisation:
            text += (f"; the file is ReferFormer-style (no BIFIT-only module), so {len(self.kept_initialisation)} "
                     f"tensors keep their initialisation ({_grouped(self.kept_initialisation)})")
        return text + "."


def _grouped(keys: list[str]) -> str:
    """'<module>.* <count>' per module: the class heads, each BIFIT-only module, else the key's first part."""
    groups = (official_to_ours("class_embed."), *(official_to_ours(p) for p in BIFIT_ONLY_OFFICIAL))
    counts: dict[str, int] = {}
    for key in keys:
        group = next((g for g in groups if key.startswith(g)), key.split(".")[0] + ".")
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{group}* {n}" for group, n in counts.items()) or "none"


def _class_head_keys(model: nn.Module, own: dict) -> list[str]:
    """Our names of the official `class_embed.<l>.weight/bias`, l < dec_layers (the heads the official rule drops)."""
    dec_layers = model.cfg.dec_layers if hasattr(model, "cfg") else len(model.class_embed)
    keys = [official_to_ours(f"class_embed.{layer}.{name}") for layer in range(dec_layers)
            for name in ("weight", "bias")]
    absent = [k for k in keys if k not in own]
    if absent:
        raise ValueError(f"load_start_weights: the model has no class heads {absent} (not a BIFIT model?)")
    return keys


def _architecture_differences(saved: ModelConfig, model: nn.Module) -> list[str]:
    """Fields that shape the weights and differ between the file's saved model config and the model's."""
    current = getattr(model, "cfg", None)
    if not isinstance(current, ModelConfig):
        return []
    return [f"{f.name}: {getattr(saved, f.name)!r} in the file, {getattr(current, f.name)!r} here"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in OVERRIDABLE and getattr(saved, f.name) != getattr(current, f.name)]


def load_start_weights(model: nn.Module, source, *, text_encoder_fallback: str | None = None) -> StartReport:
    """Load the weights a training run starts from into ``model`` (in place, on the device it is on), the way the
    official ``--pretrained_weights`` does, but strictly.

    source: one of our checkpoints or an official BIFIT/ReferFormer file (read as :func:`load_model` reads them:
        a pickle that would run code is refused; official key names are mapped to ours).
    text_encoder_fallback: as for :func:`load_model`; it only names the text encoder of the file's recorded
        architecture (used in messages): the text encoder's weights always come from the file, strictly.

    The class heads (official ``class_embed.<l>``) are not read: they keep the model's own initialisation. The
    BIFIT-only modules keep theirs when the file is an official ReferFormer-style file holding none of them at all.
    Everything else must match: an unexpected, missing or mis-shaped key raises a ValueError
    (:class:`~bifit.checkpoint.CheckpointError`) naming the file and the keys.
    """
    path = Path(source)
    where = f"checkpoint {path}"
    obj = safe_load(path)
    target = getattr(model, "module", model)  # a DDP wrapper
    # recognises our files and official ones (or refuses the file); an official file without args is read as the
    # model's own architecture, which the state dict check below verifies
    saved, official = _recorded_architecture(obj, where, getattr(target, "cfg", None) or ModelConfig(),
                                             text_encoder_fallback)
    if official:
        state = convert_official_state_dict(extract_model_state(obj, where), where)
    else:
        state = dict(obj["model"])
    own = target.state_dict()
    dropped = _class_head_keys(target, own)
    bifit_only = tuple(official_to_ours(prefix) for prefix in BIFIT_ONLY_OFFICIAL)
    referformer_style = official and not any(k.startswith(bifit_only) for k in state)
    kept = sorted(k for k in own if referformer_style and k.startswith(bifit_only) and k not in state)
    for key in dropped:
        state.pop(key, None)
    loaded = len(state)
    state.update({k: own[k] for k in [*dropped, *kept]})  # the model's own values, written back unchanged
    try:
        load_state_dict_strict(target, state, where)
    except CheckpointError as err:
        hint = [] if official else _architecture_differences(saved, target)
        raise CheckpointError(f"{err}\n  the checkpoint was trained with another architecture than this model"
                              + (f" ({'; '.join(hint)})" if hint else "")) from None
    return StartReport(path, "official" if official else "ours", dropped, kept, loaded)
