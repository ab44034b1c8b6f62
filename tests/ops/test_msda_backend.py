"""Backend selection: forced backends, the environment variable, and the fallback when a build fails."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from ops import build
from ops.testing import CASES, random_case, reference


def broken_sources(tmp_path, monkeypatch):
    """Point the builder at a copy of the sources whose CPU file does not compile, with an empty cache."""
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    source = csrc / "msda_cpu.cpp"
    source.write_text("#include <deliberately_broken_source.h>\n" + source.read_text())  # fatal at once
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setenv("BIFIT_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    build.forget()


def test_forced_cpu_backend_runs_the_kernel(cpu_kernels, backend_state, monkeypatch):
    msda = backend_state
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    msda.set_backend("cpu")
    assert msda.get_backend() == "cpu" and msda.active_backend("cpu") == "cpu"

    def no_reference(*args):
        raise AssertionError("the pure-PyTorch path ran although the cpu kernel was forced")

    monkeypatch.setattr(msda, "ms_deform_attn_pytorch", no_reference)
    value, shapes, starts, locations, weights, _ = random_case(*CASES["model-like"])
    out = msda.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out, reference(value, shapes, starts, locations, weights), rtol=1e-10, atol=1e-10)


def test_pytorch_backend_uses_the_reference(backend_state, monkeypatch):
    msda = backend_state
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(msda, "ms_deform_attn_pytorch", lambda *a: calls.append(1) or reference(a[0], a[1], None, *a[2:]))
    msda.set_backend("pytorch")
    value, shapes, starts, locations, weights, _ = random_case(*CASES["odd"])
    msda.ms_deform_attn(value, shapes, starts, locations, weights)
    assert calls == [1] and msda.active_backend("cpu") == "pytorch"


def test_environment_variable_wins_over_the_configured_backend(backend_state, monkeypatch):
    msda = backend_state
    monkeypatch.setenv("BIFIT_MSDA_BACKEND", "pytorch")
    msda.set_backend("cpu")  # params.yaml says cpu, the environment says pytorch: nothing is built
    assert msda.get_backend() == "pytorch" and msda.active_backend("cpu") == "pytorch"
    monkeypatch.delenv("BIFIT_MSDA_BACKEND")
    msda.set_backend("pytorch")
    assert msda.get_backend() == "pytorch"
    monkeypatch.setenv("BIFIT_MSDA_BACKEND", "gpu")
    with pytest.raises(ValueError, match="BIFIT_MSDA_BACKEND must be one of auto, cpu, cuda, pytorch; got 'gpu'"):
        msda.get_backend()


def test_unknown_backend_name(backend_state):
    with pytest.raises(ValueError, match="must be one of auto, cpu, cuda, pytorch; got 'fast'"):
        backend_state.set_backend("fast")


def test_auto_falls_back_with_one_warning_when_the_build_fails(backend_state, monkeypatch, tmp_path):
    msda = backend_state
    broken_sources(tmp_path, monkeypatch)
    attempts = []
    real_build = build.build
    monkeypatch.setattr(build, "build", lambda kind, *a, **k: attempts.append(kind) or real_build(kind, *a, **k))
    msda.set_backend("auto")
    value, shapes, starts, locations, weights, _ = random_case(*CASES["odd"])
    with pytest.warns(RuntimeWarning, match="pure-PyTorch path") as record:
        out = msda.ms_deform_attn(value, shapes, starts, locations, weights)
    message = str(record[0].message)
    assert "compilation failed" in message and "deliberately_broken_source.h" in message and "Fix:" in message
    torch.testing.assert_close(out, reference(value, shapes, starts, locations, weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msda.ms_deform_attn(value, shapes, starts, locations, weights)
    assert msda.active_backend("cpu") == "pytorch"
    msda.set_backend("auto")  # a new choice retries nothing: the failure is remembered
    with pytest.warns(RuntimeWarning):
        msda.ms_deform_attn(value, shapes, starts, locations, weights)
    assert attempts == ["cpu"]


def test_forced_backend_that_fails_to_compile_raises_the_compiler_output(backend_state, monkeypatch, tmp_path):
    broken_sources(tmp_path, monkeypatch)
    with pytest.raises(build.BuildError) as err:
        backend_state.set_backend("cpu")
    text = str(err.value)
    assert "cannot build the cpu kernel: compilation failed" in text
    assert "deliberately_broken_source.h" in text and "BIFIT_MSDA_BACKEND=pytorch" in text


def test_forced_backend_without_compiler_says_how_to_fix(backend_state, monkeypatch, tmp_path):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    monkeypatch.setenv("BIFIT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-bifit")
    build.forget()
    with pytest.raises(build.BuildError, match=r"no C\+\+ compiler found") as err:
        backend_state.set_backend("cpu")
    assert "Fix: install one" in str(err.value) and "CXX" in str(err.value)


def test_forced_cuda_without_toolkit_says_how_to_fix(backend_state, monkeypatch, tmp_path):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    monkeypatch.setenv("BIFIT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda-here"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # so that a machine without a GPU gets to the toolkit
    build.forget()
    with pytest.raises(build.BuildError) as err:
        backend_state.set_backend("cuda")
    text = str(err.value)
    assert "Fix:" in text
    assert "CUDA_HOME" in text or "without CUDA" in text  # CPU-only torch builds say the latter


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is None,
                    reason="needs a CUDA build of torch and no visible GPU (a GPU supplies the architecture)")
def test_cuda_build_without_gpu_asks_for_an_architecture_list(backend_state, monkeypatch, tmp_path):
    monkeypatch.setenv("BIFIT_EXT_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    build.forget()
    with pytest.raises(build.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        build.build("cuda")


def test_forced_backend_rejects_tensors_on_another_device(backend_state, monkeypatch):
    msda = backend_state
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    monkeypatch.setattr(msda, "_requested", "cuda")
    msda._kernels.clear()
    with pytest.raises(RuntimeError, match="backend 'cuda' is forced .* tensors are on cpu; use 'auto' or 'cpu'"):
        msda.ms_deform_attn(*random_case(*CASES["odd"])[:5])
