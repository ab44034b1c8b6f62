"""The one entry point the model calls for multi-scale deformable attention.

Backends:
    "cpu", "cuda"  compiled kernels from `ops/csrc/`, built on first use by `ops.build`
    "pytorch"      the pure-PyTorch reference (`ops.reference`), always available
    "auto"         the compiled kernel for the tensors' device if it builds, else "pytorch" with one
                   warning saying why (default)
`set_backend` chooses (the model calls it with params.yaml `model.msda_backend`); the environment
variable BIFIT_MSDA_BACKEND, when set, wins over it. A forced "cpu"/"cuda" backend that cannot build
raises `ops.build.BuildError` with the reason, the fix and the compiler's output.

Dtypes: the CPU kernel computes in float32/float64 (other dtypes run in float32 and are cast back).
The CUDA kernel computes value in float32/float16/bfloat16/float64 with locations and weights in
float32 (float64 for float64 value); under CUDA autocast value runs in the autocast dtype.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.autograd.function import once_differentiable

from ops.build import BuildError, load_kernels
from ops.reference import ms_deform_attn_pytorch

BACKENDS = ("auto", "cpu", "cuda", "pytorch")
ENV_VAR = "BIFIT_MSDA_BACKEND"
_MISSING = object()

_requested = "auto"  # set_backend's choice; the environment variable wins over it
_kernels: dict[str, object] = {}  # device type -> torch.ops namespace, or None for the pure-PyTorch path
_kernels_env: list[str | None] = [None]  # the environment value _kernels was resolved under


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose "auto", "cpu", "cuda" or "pytorch" (BIFIT_MSDA_BACKEND, when set, wins).

    A forced compiled backend is built now, so a broken toolchain fails here with `BuildError`."""
    global _requested
    _requested = _check_name(name, "msda backend (model.msda_backend)")
    _kernels.clear()
    backend = get_backend()
    if backend in ("cpu", "cuda"):
        load_kernels(backend)


def get_backend() -> str:
    """The backend in force: BIFIT_MSDA_BACKEND if set, else the last `set_backend` ("auto" by default)."""
    env = os.environ.get(ENV_VAR)
    return _check_name(env.strip().lower(), ENV_VAR) if env else _requested


def active_backend(device: str | torch.device = "cpu") -> str:
    """The backend that runs for tensors on `device`: "cpu", "cuda" or "pytorch" (may build the kernel)."""
    device_type = torch.device(device).type
    return "pytorch" if _resolve(device_type) is None else device_type


def _resolve(device_type: str):
    env = os.environ.get(ENV_VAR)
    if env != _kernels_env[0]:
        _kernels.clear()
        _kernels_env[0] = env
    kernels = _kernels.get(device_type, _MISSING)
    if kernels is not _MISSING:
        return kernels
    backend = get_backend()
    if backend == "pytorch":
        kernels = None
    elif backend in ("cpu", "cuda"):
        if device_type != backend:
            raise RuntimeError(f"ms_deform_attn: backend {backend!r} is forced (BIFIT_MSDA_BACKEND or "
                               f"model.msda_backend) but the tensors are on {device_type}; use 'auto' or "
                               f"{device_type!r}")
        kernels = load_kernels(backend)
    elif device_type not in ("cpu", "cuda"):
        kernels = None
        warnings.warn(f"ms_deform_attn: no compiled kernel for {device_type} tensors; using the pure-PyTorch "
                      "path", RuntimeWarning, stacklevel=3)
    else:
        try:
            kernels = load_kernels(device_type)
        except BuildError as e:
            kernels = None
            warnings.warn(f"ms_deform_attn: the compiled {device_type} kernel is unavailable, using the slower "
                          f"pure-PyTorch path. Why: {e.summary()}", RuntimeWarning, stacklevel=3)
    _kernels[device_type] = kernels
    return kernels


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, value, spatial_shapes, level_start_index, locations, weights):
        ctx.backward_op = ops[1]
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        return ops[0](value, spatial_shapes, level_start_index, locations, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = ctx.backward_op(*ctx.saved_tensors, grad_output.contiguous())
        return None, grad_value, None, None, grad_locations, grad_weights


def _compute_dtypes(value, locations, weights) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of value and output, dtype of locations and weights) for the compiled kernels."""
    dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
    if value.device.type == "cuda":
        if torch.is_autocast_enabled("cuda") and dtype != torch.float64:
            dtype = torch.get_autocast_dtype("cuda")
        return dtype, torch.float64 if dtype == torch.float64 else torch.float32
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, dtype


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [n, s, m, d], spatial_shapes [l, 2] (h, w), level_start_index [l], locations [n, q, m, l, p, 2]
    (x, y) in [0, 1], weights [n, q, m, l, p] -> [n, q, (m d)]."""
    kernels = _kernels.get(value.device.type, _MISSING)
    if kernels is _MISSING or os.environ.get(ENV_VAR) != _kernels_env[0]:
        kernels = _resolve(value.device.type)
    if kernels is None:
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    return run_kernels(kernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def run_kernels(kernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                classic: bool = False) -> torch.Tensor:
    """`ms_deform_attn` on a given compiled kernel namespace (`ops.build.load_kernels(kind)`);
    `classic` runs the CUDA baseline kernels (Deformable-DETR design) instead of the main ones."""
    out_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                    attention_weights.dtype)
    value_dtype, loc_dtype = _compute_dtypes(value, sampling_locations, attention_weights)
    device = value.device
    ops = (kernels.forward_classic, kernels.backward_classic) if classic else (kernels.forward, kernels.backward)
    out = _MSDeformAttnFunction.apply(
        ops,
        value.to(value_dtype).contiguous(),
        spatial_shapes.to(device=device, dtype=torch.long).contiguous(),
        level_start_index.to(device=device, dtype=torch.long).contiguous(),
        sampling_locations.to(loc_dtype).contiguous(),
        attention_weights.to(loc_dtype).contiguous(),
    )
    if device.type == "cpu" and out.dtype != out_dtype:  # e.g. bfloat16 inputs computed in float32
        out = out.to(out_dtype)
    return out
