"""The model's MSDeformAttn module gives the same outputs and gradients on the compiled CPU kernel as on
the pure-PyTorch path (2-D and 4-D reference points, padding mask)."""

from __future__ import annotations

import pytest
import torch

from bifit.models.ms_deform_attn import MSDeformAttn


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_across_backends(cpu_kernels, backend_state, monkeypatch, ref_dim):
    monkeypatch.delenv("BIFIT_MSDA_BACKEND", raising=False)
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move off the symmetric init
    shapes = torch.tensor([[9, 11], [5, 6], [3, 3]])
    starts = torch.tensor([0, 99, 129])
    query = torch.randn(2, 13, 64, dtype=torch.float64)
    value_in = torch.randn(2, 138, 64, dtype=torch.float64)
    ref = torch.rand(2, 13, 3, ref_dim, dtype=torch.float64) * (0.5 if ref_dim == 4 else 1.0)
    padding = torch.zeros(2, 138, dtype=torch.bool)
    padding[1, 90:99] = True
    results = {}
    for backend in ("pytorch", "cpu"):
        backend_state.set_backend(backend)
        module.zero_grad()
        out = module(query, ref, value_in, shapes, starts, padding)
        out.square().sum().backward()
        results[backend] = (out.detach(), {k: p.grad.clone() for k, p in module.named_parameters()})
    torch.testing.assert_close(results["cpu"][0], results["pytorch"][0], rtol=1e-10, atol=1e-10)
    for k, g in results["pytorch"][1].items():
        torch.testing.assert_close(results["cpu"][1][k], g, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")
