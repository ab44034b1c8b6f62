"""The compiled CPU kernel against the pure-PyTorch reference and the public golden."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from ops import build
from ops import ms_deform_attn as msda
from ops.testing import CASES, random_case, reference, run_with_grads

NAMES = ("output", "grad value", "grad locations", "grad weights")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def kernel_fn(kernels):
    return lambda *args: msda.run_kernels(kernels, *args)


def assert_all_close(ours, ref, tol, label):
    for what, a, b in zip(NAMES, ours, ref):
        assert a.shape == b.shape, f"{label} {what}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, what=what: f"{label} {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(cpu_kernels, name, dtype):
    case = random_case(*CASES[name], dtype=dtype, seed=len(name))
    ours = run_with_grads(kernel_fn(cpu_kernels), case)
    assert ours[0].dtype == dtype
    assert_all_close(ours, run_with_grads(reference, case), TOL[dtype], f"{name} {dtype}")


@pytest.mark.parametrize("backend", ["cpu", "pytorch"])
def test_public_golden(golden_dir, backend, backend_state, request, monkeypatch):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    if backend == "cpu":
        request.getfixturevalue("cpu_kernels")
    golden = torch.load(golden_dir / "ms_deform_attn_public.pt", weights_only=True)
    inp = golden["inputs"]
    backend_state.set_backend(backend)
    assert backend_state.active_backend("cpu") == backend
    case = (inp["value"], inp["spatial_shapes"], inp["level_start_index"], inp["sampling_locations"],
            inp["attention_weights"], inp["grad_output"])
    ours = run_with_grads(backend_state.ms_deform_attn, case)
    ref = (golden["output"], *(golden["grads"][k] for k in ("value", "sampling_locations", "attention_weights")))
    assert_all_close(ours, ref, dict(rtol=0, atol=1e-10), f"golden ({backend})")


def test_gradcheck_float64(cpu_kernels):
    value, shapes, starts, locations, weights, _ = random_case(2, 3, 2, 3, [(3, 5), (2, 2), (1, 3)], 2, seed=1,
                                                               margin=0.2)
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    fn = lambda v, loc, w: msda.run_kernels(cpu_kernels, v, shapes, starts, loc, w)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_non_contiguous_inputs(cpu_kernels):
    case = random_case(*CASES["model-like"], dtype=torch.float32)
    value, shapes, starts, locations, weights, grad_out = case
    # leaves in other layouts; the kernel sees strided views of them
    wide = torch.zeros(*value.shape[:-1], 2 * value.shape[-1])
    wide[..., ::2] = value
    loc_t = locations.transpose(1, 2).contiguous()
    w_p = weights.permute(4, 3, 2, 1, 0).contiguous()
    for t in (wide, loc_t, w_p):
        t.requires_grad_(True)
    views = (wide[..., ::2], shapes.t().contiguous().t(), starts, loc_t.transpose(1, 2), w_p.permute(4, 3, 2, 1, 0))
    assert not any(t.is_contiguous() for t in (views[0], views[1], views[3], views[4]))
    out = msda.run_kernels(cpu_kernels, *views)
    out.backward(grad_out)
    ours = (out.detach(), wide.grad[..., ::2], loc_t.grad.transpose(1, 2), w_p.grad.permute(4, 3, 2, 1, 0))
    assert not wide.grad[..., 1::2].any()
    assert_all_close(ours, run_with_grads(kernel_fn(cpu_kernels), case), dict(rtol=0, atol=0), "non-contiguous")


@pytest.mark.parametrize("n, q", [(0, 5), (2, 0)])
def test_zero_size_batch_and_queries(cpu_kernels, n, q):
    case = random_case(n, q, 2, 4, [(3, 4), (2, 2)], 2)
    ours = run_with_grads(kernel_fn(cpu_kernels), case)
    assert_all_close(ours, run_with_grads(reference, case), TOL[torch.float64], f"n={n} q={q}")


def test_empty_level_contributes_nothing(cpu_kernels):
    value, shapes, starts, locations, weights, grad_out = random_case(2, 6, 2, 4, [(3, 4), (0, 5), (2, 2)], 2)
    ours = run_with_grads(kernel_fn(cpu_kernels), (value, shapes, starts, locations, weights, grad_out))
    keep = [0, 2]  # the same case without the empty level
    ref = run_with_grads(reference, (value, shapes[keep], starts[keep], locations[:, :, :, keep],
                                     weights[:, :, :, keep], grad_out))
    assert_all_close(ours[:2], ref[:2], TOL[torch.float64], "empty level")
    torch.testing.assert_close(ours[2][:, :, :, keep], ref[2], **TOL[torch.float64])
    torch.testing.assert_close(ours[3][:, :, :, keep], ref[3], **TOL[torch.float64])
    assert not ours[2][:, :, :, 1].any() and not ours[3][:, :, :, 1].any()


def test_query_splits_when_fewer_heads_than_threads(cpu_kernels):
    # n * m = 1 head and 2 threads: backward splits the queries over private grad_value buffers
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = random_case(1, 300, 1, 8, [(6, 7), (3, 3)], 3, seed=3)
        ours = run_with_grads(kernel_fn(cpu_kernels), case)
    finally:
        torch.set_num_threads(threads)
    assert_all_close(ours, run_with_grads(reference, case), TOL[torch.float64], "split queries")


def test_low_precision_inputs_run_in_float32(cpu_kernels):
    value, shapes, starts, locations, weights, _ = random_case(*CASES["odd"], dtype=torch.bfloat16)
    out = msda.run_kernels(cpu_kernels, value, shapes, starts, locations, weights)
    assert out.dtype == torch.bfloat16
    ref = reference(value.float(), shapes, starts, locations.float(), weights.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_rejects_inconsistent_levels(cpu_kernels):
    value, shapes, starts, locations, weights, _ = random_case(*CASES["odd"])
    with pytest.raises(RuntimeError, match="spatial_shapes sum to"):
        cpu_kernels.forward(value[:, :-1].contiguous(), shapes, starts, locations, weights)
    with pytest.raises(RuntimeError, match="level_start_index"):
        cpu_kernels.forward(value, shapes, starts + 1, locations, weights)
    with pytest.raises(RuntimeError, match=r"sampling_locations must be \[n, q, m, l, p, 2\]"):
        cpu_kernels.forward(value, shapes, starts, locations[..., :1].contiguous(), weights)


def test_build_directory_is_keyed_by_torch_and_sources(tmp_path, monkeypatch):
    flags = ("-O3",)
    name = build.build_dir("cpu", flags).name
    assert name.startswith(torch.__version__.replace("+", "_")) and "-cpu-" in name
    assert build.build_dir("cpu", ("-O2",)) != build.build_dir("cpu", flags)
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for f in (*build.SOURCES["cpu"], *build.HEADERS):
        (csrc / f).write_bytes((build.CSRC / f).read_bytes())
    (csrc / "msda_cpu.cpp").write_text((csrc / "msda_cpu.cpp").read_text() + "\n// changed\n")
    before = build.source_hash("cpu", flags)
    monkeypatch.setattr(build, "CSRC", csrc)
    assert build.source_hash("cpu", flags) != before


def test_later_runs_load_the_cached_build_without_compiling(cpu_kernels):
    # a fresh process with no usable compiler must still find and load the finished build
    code = "from ops.build import load_kernels; import time; t = time.time(); load_kernels('cpu'); print(time.time() - t)"
    env = dict(os.environ, CXX="/nonexistent/c++")
    libraries = sorted(build.cache_root().glob("*-cpu-*/*.so"))
    mtimes = [p.stat().st_mtime for p in libraries]
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=build.CSRC.parent.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert float(res.stdout.strip().splitlines()[-1]) < 10, "loading a cached build took too long"
    assert [p.stat().st_mtime for p in libraries] == mtimes, "a cached library was rebuilt"
    assert time.perf_counter() - start < 120


def test_baseline_instruction_set_kernels_match_reference(cpu_kernels):
    # the same build with the AVX2 kernels switched off (as on a CPU without AVX2), in a fresh process
    code = """if True:
        import torch
        from ops.build import load_kernels
        from ops.ms_deform_attn import run_kernels
        from ops.testing import CASES, random_case, reference, run_with_grads
        kernels = load_kernels("cpu")
        for name, dtype, tol in (("model-like", torch.float32, 1e-4), ("odd", torch.float64, 1e-10)):
            case = random_case(*CASES[name], dtype=dtype)
            ours = run_with_grads(lambda *a: run_kernels(kernels, *a), case)
            for a, b in zip(ours, run_with_grads(reference, case)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        print("ok")
    """
    env = dict(os.environ, BIFIT_MSDA_NO_AVX2="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=build.CSRC.parent.parent)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
