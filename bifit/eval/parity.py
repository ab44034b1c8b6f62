"""Metric parity against golden files: recompute every stored output from the stored inputs with our code.

    python -m bifit.eval.parity FILE.npz [FILE2.npz ...] [--tol 1e-6]

The format of each file (the DAVIS or the A2D metric golden, as in ``tests/golden/``) is read from its
``kind`` entry, or recognised from its keys. Everything is derived from the file (sequence names, sizes, frame,
annotator, sample and query counts), so other files of the same layout work too.

- DAVIS: per sequence J and F with and without the void mask, db_statistics, the means, the radius, the means
  over sequences; end to end, the unsupervised toolkit run per video and annotator (per-frame J/F after Hungarian
  matching, per-object JM/FM), the per-annotator global table and its mean over annotators.
- A2D: the official metric dict, COCOeval stats of both protocols (all queries, best query only) with both of
  our mAP backends, and the per-sample IoU / intersection / union / selected query.

Prints the max abs error per group and quantity. Exit status: 0 when everything is within the tolerance,
1 when some value is not, 2 when a file cannot be read or has a layout this tool does not understand.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from bifit.eval import a2d, davis

DAVIS_SEQ_SUFFIXES = ("gt", "pred", "void", "J", "F", "J_novoid", "F_novoid", "stats_JF", "J_mean", "F_mean",
                      "bound_pix", "frame_tags")
DAVIS_GLOBAL_KEYS = ("kind", "bound_th", "seq_names", "J_mean_over_seqs", "F_mean_over_seqs", "JF_mean_over_seqs",
                     "e2e_videos", "e2e_global", "e2e_final_mean_over_annotators", "e2e_global_measures")
DAVIS_E2E_SUFFIXES = ("gt_labels", "pred_labels", "J", "F", "JM", "FM")
A2D_GLOBAL_KEYS = ("kind", "num_samples", "num_queries", "image_ids", "case_tags", "heights", "widths",
                   "metric_names", "metric_values", "coco_stats_labels", "coco_stats_all_queries",
                   "coco_stats_top1", "per_sample_iou", "per_sample_intersection", "per_sample_union",
                   "per_sample_selected_query")
A2D_SAMPLE_SUFFIXES = ("gt", "pred", "scores")


class FormatError(Exception):
    """The file cannot be read, or its keys do not follow a layout this tool understands."""


class _File:
    """Key access that names the file and the key when something is missing or malformed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as z:
                self.data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise FormatError(f"{path}: cannot be read as an .npz of plain arrays ({e})") from e
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, ndim: int | None = None) -> np.ndarray:
        if key not in self.data:
            raise FormatError(f"{self.path}: missing key {key!r}")
        self.used.add(key)
        a = self.data[key]
        if ndim is not None and a.ndim != ndim:
            raise FormatError(f"{self.path}: key {key!r} should have {ndim} dimension(s), has shape {a.shape}")
        return a

    def scalar(self, key: str, kind=float):
        a = self.get(key)
        if a.size != 1:
            raise FormatError(f"{self.path}: key {key!r} should be a scalar, has shape {a.shape}")
        return kind(a.reshape(()))

    def strings(self, key: str) -> list[str]:
        a = self.get(key, ndim=1)
        if a.dtype.kind != "U":
            raise FormatError(f"{self.path}: key {key!r} should hold strings, has dtype {a.dtype}")
        return [str(x) for x in a]

    def unknown_keys(self, patterns: list[str]) -> list[str]:
        rx = re.compile("|".join(f"(?:{p})" for p in patterns))
        return sorted(k for k in self.data if not rx.fullmatch(k))


def _err(ours, ref) -> float:
    """Max abs difference; inf on a shape mismatch or a NaN on one side only (NaN on both counts as equal)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ours.size == 0:
        return 0.0
    both_nan = np.isnan(ours) & np.isnan(ref)
    d = np.abs(ours - ref)
    d = np.where(both_nan, 0.0, np.where(np.isnan(d), np.inf, d))
    return float(d.max())


class _Report:
    def __init__(self, tol: float):
        self.tol = tol
        self.worst = 0.0
        self.failures: list[str] = []

    def line(self, group: str, errors: dict[str, float], note: str = "") -> None:
        bad = [k for k, v in errors.items() if not v <= self.tol]
        worst = max(errors.values()) if errors else 0.0
        self.worst = max(self.worst, worst)
        self.failures += [f"{group} {k}" for k in bad]
        parts = "  ".join(f"{k}={v:.1e}" for k, v in errors.items())
        status = "ok" if not bad else "FAIL(" + ",".join(bad) + ")"
        print(f"  {group:<34} max {worst:.1e}  {status}   [{parts}]{('  ' + note) if note else ''}")


def _detect(f: _File) -> str:
    if "kind" in f:
        kind = str(f.get("kind").reshape(()))
        if kind not in ("davis", "a2d"):
            raise FormatError(f"{f.path}: unknown kind {kind!r} (this tool understands 'davis' and 'a2d')")
        return kind
    if "seq_names" in f or "e2e_videos" in f:
        return "davis"
    if "num_samples" in f or "metric_names" in f:
        return "a2d"
    raise FormatError(f"{f.path}: key layout not recognised as the DAVIS or the A2D metric golden format")


# ----------------------------------------------------------------------------------------------------------------
# DAVIS
# ----------------------------------------------------------------------------------------------------------------


def _check_davis(f: _File, rep: _Report) -> None:
    bound_th = f.scalar("bound_th")
    seqs = f.strings("seq_names")
    videos = f.strings("e2e_videos")
    measures = f.strings("e2e_global_measures")
    if tuple(measures) != davis.GLOBAL_MEASURES:
        raise FormatError(f"{f.path}: e2e_global_measures {measures} differ from {list(davis.GLOBAL_MEASURES)}")
    for k in DAVIS_GLOBAL_KEYS:
        f.get(k)
    patterns = [re.escape(k) for k in DAVIS_GLOBAL_KEYS]
    patterns += [re.escape(s) + "__(?:" + "|".join(DAVIS_SEQ_SUFFIXES) + ")" for s in seqs]
    patterns += ["e2e_" + re.escape(v) + "__(?:" + "|".join(DAVIS_E2E_SUFFIXES) + ")" for v in videos]
    unknown = f.unknown_keys(patterns)
    if unknown:
        raise FormatError(f"{f.path}: keys outside the DAVIS golden layout: {unknown[:10]}")
    print(f"  DAVIS golden: {len(seqs)} sequences, {len(videos)} end-to-end videos, bound_th {bound_th}")

    j_means, f_means = [], []
    for s in seqs:
        gt, pred, void = (f.get(f"{s}__{k}", ndim=3) for k in ("gt", "pred", "void"))
        if not (gt.shape == pred.shape == void.shape):
            raise FormatError(f"{f.path}: sequence {s!r} has gt {gt.shape}, pred {pred.shape}, void {void.shape}")
        j = davis.region_similarity(gt, pred, void, name=s)
        fm = davis.boundary_measure(gt, pred, void, bound_th, name=s)
        j_nv = davis.region_similarity(gt, pred, name=s)
        f_nv = davis.boundary_measure(gt, pred, None, bound_th, name=s)
        stats = [*davis.db_statistics(j), *davis.db_statistics(fm)]
        j_means.append(stats[0])
        f_means.append(stats[3])
        f.get(f"{s}__frame_tags")
        rep.line(s, {
            "J": _err(j, f.get(f"{s}__J")), "F": _err(fm, f.get(f"{s}__F")),
            "J_novoid": _err(j_nv, f.get(f"{s}__J_novoid")), "F_novoid": _err(f_nv, f.get(f"{s}__F_novoid")),
            "stats_JF": _err(stats, f.get(f"{s}__stats_JF")),
            "J_mean": _err(stats[0], f.get(f"{s}__J_mean")), "F_mean": _err(stats[3], f.get(f"{s}__F_mean")),
            "bound_pix": _err(davis.boundary_radius(*gt.shape[1:], bound_th), f.get(f"{s}__bound_pix")),
        }, note=f"{gt.shape[0]} frames {gt.shape[1]}x{gt.shape[2]}")
    if seqs:
        jm, fmean = float(np.mean(j_means)), float(np.mean(f_means))
        rep.line("means over sequences", {
            "J": _err(jm, f.get("J_mean_over_seqs")), "F": _err(fmean, f.get("F_mean_over_seqs")),
            "JF": _err((jm + fmean) / 2, f.get("JF_mean_over_seqs")),
        })

    if not videos:
        raise FormatError(f"{f.path}: e2e_videos is empty")
    inputs, n_ann = {}, None
    for v in videos:
        gl = f.get(f"e2e_{v}__gt_labels", ndim=3)
        pl = f.get(f"e2e_{v}__pred_labels", ndim=4)
        if pl.shape[1:] != gl.shape:
            raise FormatError(f"{f.path}: e2e video {v!r}: pred_labels {pl.shape} vs gt_labels {gl.shape}")
        if n_ann is None:
            n_ann = pl.shape[0]
        if pl.shape[0] != n_ann:
            raise FormatError(f"{f.path}: e2e video {v!r} has {pl.shape[0]} annotator runs, others {n_ann}")
        inputs[v] = (gl, pl)
    res = davis.evaluate_ref_davis(inputs, bound_th=bound_th)
    for v in videos:
        ref_j, ref_f = f.get(f"e2e_{v}__J", ndim=3), f.get(f"e2e_{v}__F", ndim=3)
        ref_jm, ref_fm = f.get(f"e2e_{v}__JM", ndim=2), f.get(f"e2e_{v}__FM", ndim=2)
        for k, r in enumerate(res.sequences[v]):
            rep.line(f"e2e {v} annotator {k}", {
                "J": _err(r.J, ref_j[k]) if k < len(ref_j) else float("inf"),
                "F": _err(r.F, ref_f[k]) if k < len(ref_f) else float("inf"),
                "JM": _err(r.JM, ref_jm[k]) if k < len(ref_jm) else float("inf"),
                "FM": _err(r.FM, ref_fm[k]) if k < len(ref_fm) else float("inf"),
            }, note=f"{r.n_objects} objects, pred ids {r.pred_ids.tolist()} -> GT {r.gt_ids.tolist()}")
        if ref_j.shape[0] != n_ann:
            rep.line(f"e2e {v} annotator count", {"n": float("inf")})
    glob = f.get("e2e_global", ndim=2)
    rep.line("e2e global table (per annotator)", {m: _err(res.per_annotator[:, i], glob[:, i]) if glob.shape ==
                                                   res.per_annotator.shape else float("inf")
                                                   for i, m in enumerate(davis.GLOBAL_MEASURES)})
    rep.line("e2e final mean over annotators",
             {"all 7": _err(res.final, f.get("e2e_final_mean_over_annotators"))})


# ----------------------------------------------------------------------------------------------------------------
# A2D
# ----------------------------------------------------------------------------------------------------------------


def _check_a2d(f: _File, rep: _Report) -> None:
    n = f.scalar("num_samples", int)
    q = f.scalar("num_queries", int)
    names = f.strings("metric_names")
    unknown_names = [m for m in names if m not in a2d.METRIC_NAMES]
    if unknown_names:
        raise FormatError(f"{f.path}: metric_names has names this tool does not know: {unknown_names}")
    labels = f.strings("coco_stats_labels")
    if tuple(labels) != a2d.COCO_STATS_LABELS:
        raise FormatError(f"{f.path}: coco_stats_labels {labels} differ from the COCOeval.stats order")
    for k in A2D_GLOBAL_KEYS:
        f.get(k)
    sample_keys = [f"s{i:03d}" for i in range(n)]
    patterns = [re.escape(k) for k in A2D_GLOBAL_KEYS]
    patterns += [re.escape(s) + "__(?:" + "|".join(A2D_SAMPLE_SUFFIXES) + ")" for s in sample_keys]
    unknown = f.unknown_keys(patterns)
    if unknown:
        raise FormatError(f"{f.path}: keys outside the A2D golden layout: {unknown[:10]}")
    ids = f.strings("image_ids")
    heights, widths = f.get("heights", ndim=1), f.get("widths", ndim=1)
    for what, arr in (("image_ids", ids), ("heights", heights), ("widths", widths), ("case_tags", f.get("case_tags"))):
        if len(arr) != n:
            raise FormatError(f"{f.path}: {what} has {len(arr)} entries, num_samples is {n}")
    gts, preds, scores = [], [], []
    for i, s in enumerate(sample_keys):
        g = f.get(f"{s}__gt", ndim=2)
        p = f.get(f"{s}__pred", ndim=3)
        sc = f.get(f"{s}__scores", ndim=1)
        if g.shape != (int(heights[i]), int(widths[i])):
            raise FormatError(f"{f.path}: sample {s} gt {g.shape} vs heights/widths {(heights[i], widths[i])}")
        if p.shape != (q, *g.shape) or sc.shape != (q,):
            raise FormatError(f"{f.path}: sample {s} pred {p.shape} / scores {sc.shape}, expected {q} queries")
        gts.append(g)
        preds.append(p)
        scores.append(sc)
    print(f"  A2D golden: {n} samples, {q} queries, sizes {sorted({g.shape for g in gts})}")
    values = f.get("metric_values", ndim=1)
    if values.shape[0] != len(names):
        raise FormatError(f"{f.path}: metric_values has {values.shape[0]} values for {len(names)} names")
    for backend in ("fast", "pycocotools"):
        t0 = time.perf_counter()
        r = a2d.evaluate(gts, preds, scores, ids, backend=backend)
        dt = time.perf_counter() - t0
        rep.line(f"metric_values [{backend}]", {m: _err(r.metrics[m], values[i]) for i, m in enumerate(names)},
                 note=f"{dt * 1e3:.0f} ms")
        rep.line(f"coco stats [{backend}]", {
            "all_queries": _err(r.coco_stats_all_queries, f.get("coco_stats_all_queries")),
            "top1": _err(r.coco_stats_best_query_only, f.get("coco_stats_top1")),
        })
    rep.line("per sample", {
        "iou": _err(r.per_sample_iou, f.get("per_sample_iou")),
        "intersection": _err(r.per_sample_intersection, f.get("per_sample_intersection")),
        "union": _err(r.per_sample_union, f.get("per_sample_union")),
        "selected_query": _err(r.selected_query, f.get("per_sample_selected_query")),
    })


# ----------------------------------------------------------------------------------------------------------------


def check_file(path: str | Path, tol: float = 1e-6) -> _Report:
    """Check one golden file; prints the report. Raises FormatError for unreadable / unknown layouts."""
    path = Path(path)
    print(f"{path}")
    f = _File(path)
    kind = _detect(f)
    rep = _Report(tol)
    t0 = time.perf_counter()
    (_check_davis if kind == "davis" else _check_a2d)(f, rep)
    verdict = "PASS" if not rep.failures else f"FAIL ({len(rep.failures)} quantities above {tol:g})"
    print(f"  => {kind}: max abs error {rep.worst:.2e} (tolerance {tol:g}) {verdict}  "
          f"[{time.perf_counter() - t0:.1f} s]")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bifit.eval.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="golden .npz files (DAVIS or A2D metric layout)")
    ap.add_argument("--tol", type=float, default=1e-6, help="max allowed abs error (default 1e-6)")
    args = ap.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            rep = check_file(path, args.tol)
        except FormatError as e:
            print(f"  ERROR: {e}", file=sys.stderr)
            status = 2
            continue
        except ValueError as e:  # input rejected by the metric code (e.g. too many predicted ids)
            print(f"  ERROR: {path}: {e}", file=sys.stderr)
            status = 2
            continue
        if rep.failures:
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
