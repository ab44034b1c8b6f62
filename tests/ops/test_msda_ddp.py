"""The compiled CPU kernel inside DistributedDataParallel (gloo, 2 processes) gives the averaged gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from ops import ms_deform_attn as msda

    class TinyDeformAttn(nn.Module):
        """value projection, offsets and weights around the core: n heads m, levels l, points p."""
        def __init__(self, c=16, m=2, l=2, p=2):
            super().__init__()
            self.m, self.l, self.p = m, l, p
            self.value_proj = nn.Linear(c, c)
            self.offsets = nn.Linear(c, m * l * p * 2)
            self.weights = nn.Linear(c, m * l * p)

        def forward(self, query, ref, value_in, shapes, starts):
            n, q, c = query.shape
            value = self.value_proj(value_in).view(n, -1, self.m, c // self.m)  # [n, s, m, d]
            offsets = 0.2 * torch.tanh(self.offsets(query)).view(n, q, self.m, self.l, self.p, 2)
            loc = ref[:, :, None, None, None, :] + offsets  # [n, q, m, l, p, 2]
            w = self.weights(query).view(n, q, self.m, -1).softmax(-1).view(n, q, self.m, self.l, self.p)
            return msda.ms_deform_attn(value, shapes, starts, loc, w)

    def batch(rank):
        g = torch.Generator().manual_seed(100 + rank)
        shapes = torch.tensor([[5, 6], [3, 3]])
        starts = torch.tensor([0, 30])
        return (torch.randn(2, 7, 16, generator=g, dtype=torch.float64), torch.rand(2, 7, 2, generator=g, dtype=torch.float64),
                torch.randn(2, 39, 16, generator=g, dtype=torch.float64), shapes, starts)

    def grads(model, backend, ranks):
        msda.set_backend(backend)
        model.zero_grad()
        for r in ranks:
            (model(*batch(r)).square().sum() / len(ranks)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    rank, out, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = TinyDeformAttn().double()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ddp = nn.parallel.DistributedDataParallel(model)
    msda.set_backend("cpu")
    ddp(*batch(rank)).square().sum().backward()  # DDP averages over the 2 ranks
    assert msda.active_backend("cpu") == "cpu"
    result = {"ddp": {k: p.grad.clone() for k, p in model.named_parameters()}}
    dist.destroy_process_group()
    if rank == 0:  # reference: the mean loss of both shards in one process, pure PyTorch
        torch.manual_seed(0)
        result["single"] = grads(TinyDeformAttn().double(), "pytorch", [0, 1])
    torch.save(result, out)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process(cpu_kernels, tmp_path):
    script = tmp_path / "ddp_msda.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("BIFIT_MSDA_BACKEND", None)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / f"rank{r}.pt"), port], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    ref = torch.load(tmp_path / "rank0.pt")["single"]
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")["ddp"]
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k, r=r: f"rank {r} {k}: {m}")
