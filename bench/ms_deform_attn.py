"""Deformable-attention core speed: compiled kernels vs the pure-PyTorch reference, ratios in one run.

    python bench/ms_deform_attn.py [--runs 7] [--threads 2] [--skip-cpu] [--skip-cuda]

Shapes of the model's inference forward (those of the official timings ``ANCHORS_MS``): 5 frames
of 360x640, value [5, 4820, 8, 32], levels [[45,80],[23,40],[12,20],[6,10]], 4 points; encoder
(4820 queries per frame, placed like the encoder's reference points with offsets of a few pixels;
also with uniformly random locations) and decoder (5 queries per frame). Forward under no_grad, and forward + backward.

CPU: the compiled kernel vs the pure-PyTorch path, timed alternately, medians. CUDA (only where a
GPU is visible): the main kernel vs the classic Deformable-DETR design (one thread per output
element, `forward_classic`) vs the pure-PyTorch path, CUDA-event medians, with the achieved memory
bandwidth against the device's peak. Checks every arm gives the same outputs and gradients, prints
a table and updates bench/results/ms_deform_attn.json (sections not run are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops import build  # noqa: E402
from ops.ms_deform_attn import run_kernels  # noqa: E402
from ops.reference import ms_deform_attn_pytorch  # noqa: E402

SHAPES = [[45, 80], [23, 40], [12, 20], [6, 10]]
ANCHORS_MS = {"encoder": {"forward": 488.0, "forward_backward": 1158.0},
              "decoder": {"forward": 18.2, "forward_backward": 29.8}}  # official pure-PyTorch path, 2 threads


def inputs(call: str, device="cpu", dtype=torch.float32, seed=0):
    """value [5, s, 8, 32], shapes [4, 2], starts [4], locations [5, q, 8, 4, 4, 2], weights [5, q, 8, 4, 4], grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, s, m, d, lv, p = 5, int(sizes.sum()), 8, 32, 4, 4
    value = torch.randn(n, s, m, d, generator=g)
    if call == "encoder":  # reference points at every pixel centre of every level, offsets ~ N(0, 2 px)
        ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                    indexing="xy"), -1).reshape(-1, 2) for h, w in SHAPES])
        offsets = 2.0 * torch.randn(n, s, m, lv, p, 2, generator=g) / shapes.flip(1)[:, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    else:
        q = s if call == "encoder_uniform" else 5
        loc = torch.rand(n, q, m, lv, p, 2, generator=g)
    q = loc.shape[1]
    weights = torch.rand(n, q, m, lv * p, generator=g).softmax(-1).view(n, q, m, lv, p)
    grad = torch.randn(n, q, m * d, generator=g)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), shapes.to(device), starts.to(device), loc.to(**to), weights.to(**to), grad.to(**to)


def reference(value, shapes, starts, loc, weights):
    return ms_deform_attn_pytorch(value, shapes, loc, weights)


def passes(fn, data):
    """(forward under no_grad, forward + backward) closures, and a run returning output and grads."""
    value, shapes, starts, loc, weights, grad = data
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, weights)]

    def forward():
        with torch.no_grad():
            return fn(value, shapes, starts, loc, weights)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad.to(out.dtype))
        return out

    def results():
        out = forward_backward().detach()
        return [out] + [t.grad.clone() for t in leaves]

    return {"forward": forward, "forward_backward": forward_backward}, results


def max_diffs(a, b):
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    return {k: (x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for k, x, y in zip(names, a, b)}


def time_alternating(arms: dict, runs: int, timer) -> dict:
    """Median ms per arm and pass; the arms take turns so load changes hit them alike."""
    times = {arm: {k: [] for k in fns} for arm, fns in arms.items()}
    for arm_fns in arms.values():
        for fn in arm_fns.values():
            fn()  # warm-up
    for _ in range(runs):
        for arm, fns in arms.items():
            for k, fn in fns.items():
                times[arm][k].append(timer(fn))
    return {arm: {k: statistics.median(v) for k, v in t.items()} for arm, t in times.items()}


def cpu_timer(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def cuda_timer(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_cpu(runs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    kernels = build.load_kernels("cpu")
    load_s = time.perf_counter() - start
    ours_fn = lambda *a: run_kernels(kernels, *a)
    out = {"threads": threads, "cpu": platform.processor() or platform.machine(), "kernel_load_s": load_s}
    print(f"\nCPU, {threads} threads (kernel ready in {load_s:.1f} s)")
    print(f"{'call':<16}{'pass':<18}{'kernel ms':>10}{'pytorch ms':>11}{'speedup':>9}{'official':>10}")
    for call in ("encoder", "encoder_uniform", "decoder"):
        data = inputs(call)
        (ours, ours_results), (ref, ref_results) = passes(ours_fn, data), passes(reference, data)
        med = time_alternating({"kernel": ours, "pytorch": ref}, runs, cpu_timer)
        row = {"kernel_ms": med["kernel"], "pytorch_ms": med["pytorch"],
               "speedup": {k: med["pytorch"][k] / med["kernel"][k] for k in med["kernel"]},
               "max_abs_diff": max_diffs(ours_results(), ref_results())}
        anchor = ANCHORS_MS.get(call.split("_")[0], {})
        for k in ("forward", "forward_backward"):
            print(f"{call:<16}{k:<18}{med['kernel'][k]:>10.1f}{med['pytorch'][k]:>11.1f}"
                  f"{row['speedup'][k]:>8.1f}x{anchor.get(k, float('nan')):>10.1f}")
        print(f"{'':<16}max |kernel - pytorch|: " + ", ".join(f"{k} {v:.1e}" for k, v in row["max_abs_diff"].items()))
        out[call] = row
    return out


def peak_bandwidth_gbs(props) -> float | None:
    bus, clock = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)  # bits, kHz
    return 2 * bus / 8 * clock * 1e3 / 1e9 if bus and clock else None


def traffic_bytes(data, value_dtype) -> dict:
    """Bytes a pass must move at least (each tensor once), and the bytes its bilinear gathers touch."""
    value, _, _, loc, weights, grad = data
    e = torch.finfo(value_dtype).bits // 8
    n, q, m, lv, p, _ = loc.shape
    d = value.shape[-1]
    value_b, out_b, loc_b = value.numel() * e, grad.numel() * e, (loc.numel() + weights.numel()) * 4
    gathers = n * q * m * lv * p * 4 * d * e
    return {"forward": {"min": value_b + loc_b + out_b, "gathered": gathers},
            # backward also reads value, loc, weights, grad and writes grad value (float32), grad loc, grad weights
            "forward_backward": {"min": 2 * (value_b + loc_b) + 2 * out_b + value.numel() * 4 + loc_b,
                                 "gathered": 3 * gathers}}


def bench_cuda(runs: int) -> dict:
    props = torch.cuda.get_device_properties(0)
    start = time.perf_counter()
    kernels = build.load_kernels("cuda")
    load_s = time.perf_counter() - start
    peak = peak_bandwidth_gbs(props)
    out = {"device": props.name, "peak_bandwidth_GBs": peak, "kernel_load_s": load_s}
    print(f"\nCUDA {props.name} (kernel ready in {load_s:.1f} s, peak memory bandwidth {peak or float('nan'):.0f} GB/s)")
    print(f"{'call':<16}{'dtype':<10}{'pass':<18}{'main ms':>9}{'classic ms':>11}{'pytorch ms':>11}"
          f"{'vs classic':>11}{'GB/s min':>9}{'% peak':>7}{'GB/s gath':>10}")
    for call in ("encoder", "encoder_uniform", "decoder"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            data = inputs(call, device="cuda", dtype=dtype)
            arms = {"main": passes(lambda *a: run_kernels(kernels, *a), data)}
            if dtype == torch.float32:
                arms["classic"] = passes(lambda *a: run_kernels(kernels, *a, classic=True), data)
                arms["pytorch"] = passes(reference, data)
            med = time_alternating({k: v[0] for k, v in arms.items()}, runs, cuda_timer)
            data64 = tuple(t.double() if t.is_floating_point() else t for t in data)  # same (rounded) inputs
            ref_results = passes(reference, data64)[1]()
            row = {f"{arm}_ms": med[arm] for arm in med}
            row["max_abs_diff_vs_float64_reference"] = {arm: max_diffs(v[1](), ref_results) for arm, v in arms.items()}
            traffic = traffic_bytes(data, dtype)
            row["bandwidth_GBs"] = {k: {kind: b / (med["main"][k] * 1e6) for kind, b in traffic[k].items()}
                                    for k in traffic}
            if "classic" in med:
                row["speedup_vs_classic"] = {k: med["classic"][k] / med["main"][k] for k in med["main"]}
                row["speedup_vs_pytorch"] = {k: med["pytorch"][k] / med["main"][k] for k in med["main"]}
            for k in ("forward", "forward_backward"):
                bw = row["bandwidth_GBs"][k]
                cells = [f"{med[a][k]:>{w}.3f}" if a in med else f"{'-':>{w}}" for a, w in
                         (("main", 9), ("classic", 11), ("pytorch", 11))]
                ratio = f"{row['speedup_vs_classic'][k]:>10.2f}x" if "classic" in med else f"{'-':>11}"
                share = f"{100 * bw['min'] / peak:>6.1f}%" if peak else f"{'-':>7}"
                print(f"{call:<16}{str(dtype)[6:]:<10}{k:<18}{''.join(cells)}{ratio}{bw['min']:>9.0f}{share}"
                      f"{bw['gathered']:>10.0f}")
            out[f"{call}/{str(dtype)[6:]}"] = row
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cuda-runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ms_deform_attn.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = results if "meta" in results and "cpu" in results else {}  # older layouts are replaced
    results["meta"] = {"torch": torch.__version__, "unit": "ms (median)", "shapes": SHAPES,
                       "official_anchor_ms": ANCHORS_MS, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_cpu:
        results["cpu"] = bench_cpu(args.runs, args.threads)
    if not args.skip_cuda and torch.cuda.is_available():
        results["cuda"] = bench_cuda(args.cuda_runs)
    elif not args.skip_cuda:
        print("\nno GPU visible: CUDA section skipped")
    results.setdefault("cpu", None)
    results.setdefault("cuda", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
