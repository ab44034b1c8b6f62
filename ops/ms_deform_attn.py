"""The one entry point the model calls for multi-scale deformable attention.

Backends: `pytorch` (the pure-PyTorch reference in ops/reference.py), `cpu` (the compiled C++ kernel in
ops/csrc, built on first use), and `auto` (the compiled kernel for the tensors' device when it builds,
else the pure-PyTorch path with one warning saying why). Select with `set_backend` (the model does
this from params.yaml `model.msda_backend`) or the environment variable BIFIT_MSDA_BACKEND, which wins.
"""

from __future__ import annotations

import os
import warnings

import torch

from ops.extension import ExtensionBuildError, load_cpu_extension
from ops.reference import ms_deform_attn_pytorch

BACKENDS = ("auto", "cpu", "cuda", "pytorch")
_state = {"backend": "auto", "warned": set()}


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"model.msda_backend: expected one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    env = os.environ.get("BIFIT_MSDA_BACKEND")
    if env and env not in BACKENDS:
        raise ValueError(f"BIFIT_MSDA_BACKEND: expected one of {BACKENDS}, got {env!r}")
    return env or _state["backend"]


def _warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class _CompiledMSDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        args = (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                sampling_locations.contiguous(), attention_weights.contiguous())
        ctx.ext = ext
        ctx.save_for_backward(*args)
        return ext.forward(*args)

    @staticmethod
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = ctx.ext.backward(*ctx.saved_tensors, grad_output.contiguous())
        return None, grad_value, None, None, grad_loc, grad_attn


def _cpu_extension(forced: bool):
    try:
        return load_cpu_extension()
    except ExtensionBuildError as err:
        if forced:
            raise ExtensionBuildError(f"{err}\nFix: install a C++ compiler (g++) and ninja, or set "
                                      "model.msda_backend / BIFIT_MSDA_BACKEND to 'pytorch'.") from err
        _warn_once("cpu-build", f"deformable attention: using the pure-PyTorch path because {err}")
        return None


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [n, s, m, d], locations [n, q, m, l, p, 2], weights [n, q, m, l, p] -> [n, q, (m d)]."""
    backend = get_backend()
    if backend == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    if value.is_cuda:
        if backend == "cpu":
            raise ValueError("model.msda_backend is 'cpu' but the tensors are on a CUDA device")
        if backend == "cuda":
            raise ExtensionBuildError("the CUDA deformable-attention kernel is not available in this build; "
                                      "set model.msda_backend to 'auto' or 'pytorch'")
        _warn_once("cuda-missing", "deformable attention: no CUDA kernel in this build, using the pure-PyTorch path")
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    if backend == "cuda":
        raise ValueError("model.msda_backend is 'cuda' but the tensors are on the CPU")
    if value.dtype not in (torch.float32, torch.float64):  # bfloat16/half on CPU: the reference handles them
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    ext = _cpu_extension(forced=backend == "cpu")
    if ext is None:
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    spatial_shapes = spatial_shapes.to(torch.long)
    level_start_index = level_start_index.to(torch.long)
    return _CompiledMSDA.apply(ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
