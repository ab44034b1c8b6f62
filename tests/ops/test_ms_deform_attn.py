import warnings

import pytest
import torch

from ops import extension
from ops import ms_deform_attn as msda
from ops.reference import ms_deform_attn_pytorch


@pytest.fixture(scope="module")
def cpu_backend():
    extension.load_cpu_extension()  # built once per session (about 30 s), then cached on disk
    saved = msda.get_backend()
    msda.set_backend("cpu")
    yield
    msda.set_backend(saved)


def _inputs(n, q, m, d, shapes, p, dtype=torch.float64, seed=0, spread=(-0.1, 1.1)):
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes_t.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(n, int(sizes.sum()), m, d, generator=g, dtype=dtype)
    lo, hi = spread
    loc = lo + (hi - lo) * torch.rand(n, q, m, len(shapes), p, 2, generator=g, dtype=dtype)
    attn = torch.rand(n, q, m, len(shapes) * p, generator=g, dtype=dtype).softmax(-1).view(n, q, m, len(shapes), p)
    return value, shapes_t, starts, loc, attn


@pytest.mark.parametrize("case", [
    dict(n=2, q=7, m=3, d=5, shapes=[[5, 7], [3, 1], [1, 1]], p=2),  # odd sizes, 1-pixel levels
    dict(n=1, q=33, m=8, d=32, shapes=[[16, 20], [8, 10], [4, 5], [2, 3]], p=4),  # the model's layout
])
def test_cpu_kernel_matches_reference_outputs_and_gradients(cpu_backend, case):
    value, shapes, starts, loc, attn = _inputs(**case)
    leaves_ref = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    leaves_cpu = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    ref = ms_deform_attn_pytorch(leaves_ref[0], shapes, leaves_ref[1], leaves_ref[2])
    out = msda.ms_deform_attn(leaves_cpu[0], shapes, starts, leaves_cpu[1], leaves_cpu[2])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for a, b in zip(leaves_cpu, leaves_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-11)


def test_cpu_kernel_float32_close_to_reference(cpu_backend):
    value, shapes, starts, loc, attn = _inputs(2, 50, 8, 32, [[12, 9], [6, 5], [3, 3], [2, 2]], 4, torch.float32)
    torch.testing.assert_close(msda.ms_deform_attn(value, shapes, starts, loc, attn),
                               ms_deform_attn_pytorch(value, shapes, loc, attn), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(cpu_backend):
    value, shapes, starts, loc, attn = _inputs(1, 3, 2, 3, [[4, 3], [2, 2]], 2, spread=(0.05, 0.95))
    args = [value.requires_grad_(True), shapes, starts, loc.requires_grad_(True), attn.requires_grad_(True)]
    assert torch.autograd.gradcheck(msda.ms_deform_attn, args, eps=1e-6, atol=1e-6)


def test_non_contiguous_inputs(cpu_backend):
    value, shapes, starts, loc, attn = _inputs(2, 6, 4, 8, [[6, 5], [3, 3]], 2)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    loc_nc = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(msda.ms_deform_attn(value_nc, shapes, starts, loc_nc, attn),
                               ms_deform_attn_pytorch(value, shapes, loc, attn), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,q", [(0, 5), (2, 0)])
def test_empty_batches_and_queries(cpu_backend, n, q):
    value, shapes, starts, loc, attn = _inputs(n, q, 2, 4, [[3, 3], [2, 2]], 2)
    value.requires_grad_(True)
    out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (n, q, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and not value.grad.any()


def test_auto_falls_back_with_one_warning_when_the_build_fails(monkeypatch):
    def broken():
        raise extension.ExtensionBuildError("compiler exploded")

    monkeypatch.setattr(msda, "load_cpu_extension", broken)
    monkeypatch.setitem(msda._state, "warned", set())
    monkeypatch.setitem(msda._state, "backend", "auto")
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    value, shapes, starts, loc, attn = _inputs(1, 4, 2, 4, [[3, 3]], 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
        msda.ms_deform_attn(value, shapes, starts, loc, attn)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch path because compiler exploded" in messages[0]
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, loc, attn))
    monkeypatch.setitem(msda._state, "backend", "cpu")
    with pytest.raises(extension.ExtensionBuildError, match="Fix: install a C\\+\\+ compiler"):
        msda.ms_deform_attn(value, shapes, starts, loc, attn)


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="model.msda_backend"):
        msda.set_backend("fast")
    monkeypatch.setenv("BIFIT_MSDA_BACKEND", "gpu")
    with pytest.raises(ValueError, match="BIFIT_MSDA_BACKEND"):
        msda.get_backend()
    monkeypatch.setenv("BIFIT_MSDA_BACKEND", "pytorch")
    assert msda.get_backend() == "pytorch"


def test_cached_build_is_reused(cpu_backend):
    from ops.extension import CSRC, build_dir

    folder = build_dir("cpu", [CSRC / "ms_deform_attn_cpu.cpp"])
    assert any(folder.glob("*.so"))
    assert extension.load_cpu_extension() is extension.load_cpu_extension()
