"""Deformable-attention core speed: compiled CPU kernel vs the pure-PyTorch reference, in one run.

    python bench/ms_deform_attn.py [--runs 5] [--threads 2]

Shapes of the model's inference forward (ANCHORS.md): value [5, 4820, 8, 32], levels
[[45,80],[23,40],[12,20],[6,10]], 4 points; encoder (4820 queries per frame) and decoder (5 queries).
Forward under no_grad, and forward + backward. Prints medians and ratios, checks the outputs agree,
and writes bench/results/ms_deform_attn.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import ms_deform_attn as msda  # noqa: E402

ANCHORS = {"encoder": {"forward": 488.0, "forward_backward": 1158.0},
           "decoder": {"forward": 18.2, "forward_backward": 29.8}}  # official pure-PyTorch path, ms


def inputs(queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[45, 80], [23, 40], [12, 20], [6, 10]])
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(5, int(sizes.sum()), 8, 32, generator=g)
    loc = torch.rand(5, queries, 8, 4, 4, 2, generator=g)
    attn = torch.rand(5, queries, 8, 16, generator=g).softmax(-1).view(5, queries, 8, 4, 4)
    return value, shapes, starts, loc, attn


def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(backend, value, shapes, starts, loc, attn, runs):
    msda.set_backend(backend)

    def fwd():
        with torch.no_grad():
            return msda.ms_deform_attn(value, shapes, starts, loc, attn)

    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    grad = torch.randn(value.shape[0], loc.shape[1], 256)

    def fwd_bwd():
        out = msda.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad)

    return {"forward": median_ms(fwd, runs), "forward_backward": median_ms(fwd_bwd, runs)}, fwd()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ms_deform_attn.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"meta": {"threads": args.threads, "torch": torch.__version__, "unit": "ms (median)"}}
    print(f"{'call':<10}{'pass':<18}{'cpu kernel':>12}{'pytorch':>10}{'speedup':>9}{'official':>10}")
    for name, queries in (("encoder", 4820), ("decoder", 5)):
        data = inputs(queries)
        ours, out_ours = measure("cpu", *data, args.runs)
        ref, out_ref = measure("pytorch", *data, args.runs)
        diff = (out_ours - out_ref).abs().max().item()
        results[name] = {"cpu_kernel": ours, "pytorch": ref, "max_abs_diff": diff,
                         "speedup": {k: ref[k] / ours[k] for k in ours}, "official_anchor": ANCHORS[name]}
        for k in ("forward", "forward_backward"):
            print(f"{name:<10}{k:<18}{ours[k]:>12.1f}{ref[k]:>10.1f}{ref[k] / ours[k]:>8.1f}x{ANCHORS[name][k]:>10.1f}")
        print(f"{'':<10}max |cpu - pytorch| = {diff:.2e}")
    if torch.cuda.is_available():
        print("CUDA present: this build has no CUDA kernel yet; the pure-PyTorch path runs on GPU.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
