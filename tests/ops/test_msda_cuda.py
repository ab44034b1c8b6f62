"""The CUDA kernels (main and classic baseline) against the reference; runs only where a GPU is visible."""

from __future__ import annotations

import pytest
import torch

from ops import build
from ops import ms_deform_attn as msda
from ops.testing import CASES, random_case, reference, run_with_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# extra layouts for the CUDA thread mapping: 12 chunks of 4 channels (idle lanes), 64 chunks (2 per lane)
GPU_CASES = {**CASES, "d48": (2, 11, 3, 48, [(5, 6), (3, 3)], 3), "d256": (1, 6, 2, 256, [(4, 5), (2, 2)], 2)}
NAMES = ("output", "grad value", "grad locations", "grad weights")


@pytest.fixture(scope="module")
def cuda_kernels():
    return build.load_kernels("cuda")


def kernel_fn(kernels, classic=False, dtype=None):
    def fn(value, shapes, starts, locations, weights):
        if dtype is not None:
            value, locations, weights = (t.to(dtype) for t in (value, locations, weights))
        return msda.run_kernels(kernels, value, shapes, starts, locations, weights, classic=classic)

    return fn


def cpu64(case):
    return tuple(t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in case)


def assert_close(ours, ref, rtol, atol, label):
    for what, a, b in zip(NAMES, ours, ref):
        torch.testing.assert_close(a.detach().cpu().double(), b, rtol=rtol, atol=atol,
                                   msg=lambda m, what=what: f"{label} {what}: {m}")


@pytest.mark.parametrize("classic", [False, True], ids=["main", "classic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_matches_reference(cuda_kernels, name, dtype, classic):
    case = random_case(*GPU_CASES[name], dtype=dtype, device="cuda", seed=len(name))
    ours = run_with_grads(kernel_fn(cuda_kernels, classic), case)
    assert ours[0].dtype == dtype and ours[0].is_cuda
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(ours, run_with_grads(reference, cpu64(case)), tol, tol, f"{name} {dtype} classic={classic}")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)], ids=str)
def test_half_precision_value(cuda_kernels, dtype, tol):
    case = random_case(*GPU_CASES["model-like"], dtype=dtype, device="cuda", seed=5)
    ours = run_with_grads(kernel_fn(cuda_kernels), case)
    assert ours[0].dtype == dtype
    ref = run_with_grads(reference, cpu64(case))
    assert_close(ours[:2], ref[:2], tol, tol, str(dtype))
    assert_close(ours[3:], ref[3:], tol, tol, str(dtype))
    scale = ref[2].abs().max().item()  # location gradients are large (x w, x h): compare relative to their scale
    torch.testing.assert_close(ours[2].cpu().double(), ref[2], rtol=tol, atol=tol * scale)


def test_public_golden_on_gpu(golden_dir, cuda_kernels):
    golden = torch.load(golden_dir / "ms_deform_attn_public.pt", weights_only=True)
    inp = golden["inputs"]
    case = tuple(inp[k].cuda() for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations",
                                         "attention_weights", "grad_output"))
    ref = (golden["output"], *(golden["grads"][k] for k in ("value", "sampling_locations", "attention_weights")))
    for classic in (False, True):
        assert_close(run_with_grads(kernel_fn(cuda_kernels, classic), case), ref, 0, 1e-10, f"golden classic={classic}")


@pytest.mark.parametrize("classic", [False, True], ids=["main", "classic"])
def test_gradcheck_float64(cuda_kernels, classic):
    value, shapes, starts, locations, weights, _ = random_case(2, 3, 2, 4, [(3, 5), (2, 2), (1, 3)], 2, seed=1,
                                                               device="cuda", margin=0.2)
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    fn = lambda v, loc, w: msda.run_kernels(cuda_kernels, v, shapes, starts, loc, w, classic=classic)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, nondet_tol=1e-12)


def test_autocast_runs_value_in_half(cuda_kernels, backend_state, monkeypatch):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    backend_state.set_backend("cuda")
    case = random_case(*GPU_CASES["model-like"], dtype=torch.float32, device="cuda", seed=2)
    with torch.autocast("cuda", dtype=torch.float16):
        ours = run_with_grads(backend_state.ms_deform_attn, case)
    assert ours[0].dtype == torch.float16 and all(g.dtype == torch.float32 for g in ours[1:])
    ref = run_with_grads(reference, cpu64(case))
    assert_close(ours[:2], ref[:2], 2e-2, 2e-2, "autocast")


def test_unaligned_and_non_contiguous_inputs(cuda_kernels):
    case = random_case(*GPU_CASES["model-like"], device="cuda", dtype=torch.float32, seed=4)
    value, shapes, starts, locations, weights, grad_out = case
    flat = torch.zeros(value.numel() + 1, device="cuda")
    flat[1:] = value.flatten()
    loc_t = locations.transpose(1, 2).contiguous()
    w_t = weights.transpose(0, 1).contiguous()
    for t in (flat, loc_t, w_t):
        t.requires_grad_(True)
    shifted = flat[1:].view_as(value)  # contiguous but 4 bytes off 16-byte alignment: the scalar-load path
    assert shifted.data_ptr() % 16 != 0
    out = msda.run_kernels(cuda_kernels, shifted, shapes, starts, loc_t.transpose(1, 2), w_t.transpose(0, 1))
    out.backward(grad_out)
    ours = (out.detach(), flat.grad[1:].view_as(value), loc_t.grad.transpose(1, 2), w_t.grad.transpose(0, 1))
    assert_close(ours, run_with_grads(reference, cpu64(case)), 1e-4, 1e-4, "unaligned")


@pytest.mark.parametrize("n, q", [(0, 5), (2, 0)])
def test_zero_size_batch_and_queries(cuda_kernels, n, q):
    case = random_case(n, q, 2, 4, [(3, 4), (2, 2)], 2, device="cuda")
    for classic in (False, True):
        ours = run_with_grads(kernel_fn(cuda_kernels, classic), case)
        assert_close(ours, run_with_grads(reference, cpu64(case)), 0, 1e-12, f"n={n} q={q}")


def test_auto_uses_the_cuda_kernel_for_cuda_tensors(cuda_kernels, backend_state, monkeypatch):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    backend_state.set_backend("auto")
    assert backend_state.active_backend("cuda") == "cuda"
