"""Checkpoints: official BIFIT/ReferFormer files and our own (which record their config).

Everything is read with `torch.load(weights_only=True)`: a file that would need to run code to
unpickle is refused. Official training files hold an `argparse.Namespace` under `args`, which is
allow-listed (it only carries plain values).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

OUR_FORMAT = "bifit-checkpoint-v1"
# official prefix -> our prefix (first match wins)
KEY_MAP = (
    ("backbone.0.body.", "backbone.body."),
    ("text_fusion_module.", "vl_interaction.vision_to_text."),
    ("fusion_module.", "vl_interaction.text_to_vision."),
    ("poolout_module.", "vl_interaction.sentence_pool."),
    ("transformer.decoder.decoder_layers.", "transformer.decoder.layers."),
    ("transformer.decoder.query_encoder_layers.", "transformer.decoder.inter_frame.layers."),
    ("controller.", "mask_head.controller."),
)
TIED_PREFIX = "transformer.decoder.bbox_embed."  # official alias of bbox_embed.*
IGNORED_KEYS = ("text_encoder.embeddings.position_ids", "text_encoder.embeddings.token_type_ids")
IGNORED_SUFFIXES = ("total_params", "total_ops")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the keys."""


def official_to_ours(key: str) -> str:
    for src, dst in KEY_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def ours_to_official(key: str) -> str:
    for src, dst in KEY_MAP:
        if key.startswith(dst):
            return src + key[len(dst):]
    return key


def convert_official_state_dict(state: dict, where: str = "state dict") -> dict:
    """Official keys -> ours; drops the tied box-head aliases (after checking they match) and legacy buffers."""
    out = {}
    for key, value in state.items():
        if key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith(TIED_PREFIX):
            twin = "bbox_embed." + key[len(TIED_PREFIX):]
            if twin in state and not torch.equal(state[twin], value):
                raise CheckpointError(f"{where}: {key} should be the same tensor as {twin} but differs")
            if twin in state:
                continue
            key = twin
        out[official_to_ours(key)] = value
    return out


def to_official_state_dict(state: dict) -> dict:
    """Our keys -> official keys, with the tied `transformer.decoder.bbox_embed.*` aliases added."""
    out = {ours_to_official(k): v for k, v in state.items()}
    for k, v in list(out.items()):
        if k.startswith("bbox_embed."):
            out[TIED_PREFIX + k[len("bbox_embed."):]] = v
    return out


def safe_load(path: str | Path) -> object:
    """torch.load with weights_only=True; `argparse.Namespace` (official `args`) is allow-listed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(
            f"checkpoint {path}: refused or unreadable with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Only tensors and plain containers are accepted."
        ) from err


def load_state_dict_strict(model: nn.Module, state: dict, where: str) -> None:
    """Load with zero missing and zero unexpected keys, and matching shapes; else list them all."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{where}: does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def extract_model_state(obj: object, where: str) -> dict:
    """The model state dict inside an official/our checkpoint object (dict with `model`, or bare)."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{where}: expected a dict with a 'model' entry or a bare state dict, found {keys}")


def load_official(path: str | Path, model: nn.Module, drop_class_heads: bool = False) -> dict:
    """Load an official BIFIT/ReferFormer checkpoint into a model built by the caller (to build the architecture
    the file records, use :func:`bifit.load_model`). Returns the other top-level entries.

    drop_class_heads: the official fine-tuning rule (`--pretrained_weights`): class_embed.* is not loaded.
    """
    return load_official_state(model, safe_load(path), f"checkpoint {path}", drop_class_heads)


def load_official_state(model: nn.Module, obj: object, where: str, drop_class_heads: bool = False) -> dict:
    """:func:`load_official` on an already read file object (``where`` names it in errors)."""
    state = convert_official_state_dict(extract_model_state(obj, where), where)
    if drop_class_heads:
        fresh = model.state_dict()
        state = {k: (fresh[k] if k.startswith("class_embed.") else v) for k, v in state.items()}
    load_state_dict_strict(model, state, where)
    return {k: v for k, v in obj.items() if k != "model"} if isinstance(obj, dict) and "model" in obj else {}


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, model: nn.Module | dict, config: dict, **extra) -> None:
    """Our format, written atomically (:func:`atomic_save`): the model state (our keys), the config it was trained
    with, and any extra entries (a training checkpoint's optimizer and scheduler state, epoch, step, metrics, ...).

    `model`: the model (a DDP wrapper is unwrapped), or its state dict (a checkpoint read back, written again)."""
    if "format" in extra:
        raise TypeError(f"save_checkpoint: 'format' is set by the function ({OUR_FORMAT}), not by the caller")
    state = model if isinstance(model, dict) else getattr(model, "module", model).state_dict()
    atomic_save({"format": OUR_FORMAT, "model": state, "config": config, **extra}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (checks the format tag and the presence of model and config)."""
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != OUR_FORMAT or "config" not in obj:
        raise CheckpointError(
            f"checkpoint {path}: not a {OUR_FORMAT} file (bifit.load_model also loads official weights)"
        )
    return obj
