"""The key-name weight recipe (`bifit-keyname-recipe-v1`) that the official goldens were made with.

Every state-dict entry is filled from its key name and shape alone, so a model built in any
order gets the weights the golden outputs were computed with.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping

import torch

TIED_PREFIX = "transformer.decoder.bbox_embed."
SEED_PREFIX = "bbox_embed."
STD_OVERRIDES = {
    "query_embed.weight": 1.0,
    "transformer.level_embed": 1.0,
    "controller.layers.2.weight": 0.3 / math.sqrt(256),
    "controller.layers.2.bias": 0.03,
}


def seed_key(key: str) -> str:
    """The key whose crc32 seeds the generator (tied box heads share their `bbox_embed.` seed)."""
    return SEED_PREFIX + key[len(TIED_PREFIX) :] if key.startswith(TIED_PREFIX) else key


def recipe_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value of one official state-dict entry under the recipe."""
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked" or not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    seed = seed_key(key)
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(seed.encode("utf-8")))
    if leaf == "running_var":
        t = 0.75 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float32)
    elif leaf == "running_mean":
        t = 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    elif len(shape) == 1 and leaf == "weight":
        t = 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    else:
        if seed in STD_OVERRIDES:
            std = STD_OVERRIDES[seed]
        elif len(shape) <= 1:
            std = 0.1
        else:
            std = 1.0 / math.sqrt(math.prod(shape[1:]))
        t = torch.randn(shape, generator=g, dtype=torch.float32) * std
    return t.to(dtype)


def recipe_state_dict(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype] | None = None) -> dict:
    """Fill an official-key state dict {key: shape} with the recipe."""
    dtypes = dtypes or {}
    return {k: recipe_tensor(k, tuple(s), dtypes.get(k, torch.float32)) for k, s in shapes.items()}


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted keys: key bytes, a zero byte, the raw little-endian tensor bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode("utf-8"))
        h.update(b"\0")
        h.update(state_dict[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
