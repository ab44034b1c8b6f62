"""Compare MLflow runs: a table on the terminal (and markdown/CSV files) plus a bar plot.

    python -m pipeline.compare RUN_ID [RUN_ID ...]      # these runs
    python -m pipeline.compare --experiment bifit-ablations
    python -m pipeline.compare --parent SWEEP_RUN_ID     # the trials of one sweep (pipeline/tune.py)
    python -m pipeline.compare --parent latest --group-by variant   # mean ± std over seeds per variant

The tracking store is `--tracking-uri`, else MLFLOW_TRACKING_URI, else params.yaml's `mlflow.tracking_uri`.
Runs are shown with their name, status, the tags `variant` and `seed` when set, any `--columns` (params or
tags) and the `--metrics` (default: the Ref-YouTube-VOS J&F, J, F and the shuffled-expression control).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bifit.report import format_mean_std, group_rows, markdown_table, text_table, write_csv
from pipeline import tracking
from pipeline.config import load_pipeline_config, resolve

DEFAULT_METRICS = ("ytvos_jf", "ytvos_j", "ytvos_f", "ytvos_jf_shuffled")


class CompareError(ValueError):
    """Runs that cannot be found or compared; the message says which and why."""


def tracking_uri(params: Path, explicit: str | None = None) -> str:
    """`--tracking-uri`, else the user's MLFLOW_TRACKING_URI, else params.yaml's `mlflow.tracking_uri`."""
    return explicit or load_pipeline_config(params).mlflow.resolved_uri()


def latest_sweep(client, experiment: str):
    """The newest sweep parent run of `experiment` (tag kind=sweep)."""
    exp = tracking.find_experiment(client, experiment)
    if exp is None:
        raise CompareError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    runs = tracking.search_runs(client, exp, {"kind": "sweep"}, newest_first=True, max_results=1)
    if not runs:
        raise CompareError(f"experiment {experiment!r} has no sweep run (tag kind=sweep); run pipeline.tune first")
    return runs[0]


def load_runs(client, run_ids=(), experiment: str | None = None, parent: str | None = None,
              sweep_experiment: str = "bifit-ablations") -> list:
    """The runs to compare: explicit ids, every run of an experiment, or the children of a parent run
    ("latest": the newest sweep of `sweep_experiment`). Sorted by run name for ids/children, kept in order
    for explicit ids."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(tracking.get_run(client, rid))
            except tracking.RunNotFound as err:
                raise CompareError(f"run {rid!r}: {err}") from None
        return runs
    if parent is not None:
        if parent == "latest":
            parent_run = latest_sweep(client, sweep_experiment)
        else:
            try:
                parent_run = tracking.get_run(client, parent)
            except tracking.RunNotFound as err:
                raise CompareError(f"parent run {parent!r}: {err}") from None
        runs = tracking.child_runs(client, parent_run)
        if not runs:
            raise CompareError(f"parent run {parent_run.info.run_id}: has no child runs")
        return sorted(runs, key=lambda r: r.info.run_name or "")
    if experiment is not None:
        exp = tracking.find_experiment(client, experiment)
        if exp is None:
            raise CompareError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
        runs = tracking.search_runs(client, exp)
        if not runs:
            raise CompareError(f"experiment {experiment!r}: has no runs")
        return sorted(runs, key=lambda r: r.info.run_name or "")
    raise CompareError("nothing to compare: give run ids, --experiment NAME or --parent RUN_ID")


def run_rows(runs, metrics, columns=()) -> list[dict]:
    """One row per run: id, name, status, variant/seed tags, the requested params/tags and metrics."""
    rows = []
    for run in runs:
        tags, params, values = run.data.tags, run.data.params, run.data.metrics
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name or "", "status": run.info.status,
               "variant": tags.get("variant", run.info.run_name or run.info.run_id[:12]), "seed": tags.get("seed", "")}
        for c in columns:
            row[c] = params.get(c, tags.get(c, ""))
        for m in metrics:
            row[m] = float(values[m]) if m in values else math.nan
        rows.append(row)
    return rows


def checkpoint_of_run(client, run_id: str, dst: Path | None = None) -> Path:
    """A local checkpoint file of a run: the `checkpoint` tag (sweep trials) when that file exists here,
    else the run's `model/bifit.pth` artifact (train stage), downloaded to `dst`."""
    try:
        run = tracking.get_run(client, run_id)
    except tracking.RunNotFound as err:
        raise CompareError(f"run {run_id!r}: {err}") from None
    local = run.data.tags.get("checkpoint")
    if local and Path(local).is_file():
        return Path(local)
    names = tracking.artifact_paths(client, run_id, "model")
    if "model/bifit.pth" not in names:
        raise CompareError(f"run {run_id}: no checkpoint (tag 'checkpoint' {local!r} is not a file here and the "
                           f"run has no model/bifit.pth artifact; artifacts under model/: {names})")
    dst = Path(dst) if dst is not None else resolve("runs/mlflow-downloads") / run_id
    dst.mkdir(parents=True, exist_ok=True)
    return tracking.download_artifact(client, run_id, "model/bifit.pth", dst)


def plot_comparison(rows: list[dict], metrics, out: Path, group_by: str | None = None, title: str = "") -> Path:
    """Bars per run (or per group, mean ± std) and metric; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bifit.visualize import metric_bars

    if group_by:
        groups = group_rows(rows, group_by, metrics)
        labels = [str(g[group_by]) for g in groups]
        means = [[g[f"{m}_mean"] for m in metrics] for g in groups]
        stds = [[g[f"{m}_std"] for m in metrics] for g in groups]
    else:
        labels = [f"{r['variant']} seed {r['seed']}" if r["seed"] else r["variant"] for r in rows]
        means, stds = [[r[m] for m in metrics] for r in rows], None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(metrics)) / 2), 4.5))
    metric_bars(ax, labels, metrics, means, stds, title=title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def comparison_tables(rows: list[dict], metrics, columns=(), group_by: str | None = None) -> tuple[list, list]:
    """(headers, cells) of the table to print: every run, or one row per group with mean ± std and n."""
    if group_by:
        groups = group_rows(rows, group_by, metrics)
        headers = [group_by, "n", *metrics]
        return headers, [[str(g[group_by]), g["n"], *(format_mean_std(g[f"{m}_mean"], g[f"{m}_std"]) for m in metrics)]
                         for g in groups]
    headers = ["run", "name", "status", "variant", "seed", *columns, *metrics]
    return headers, [[r["run_id"][:12], r["run_name"], r["status"], r["variant"], r["seed"],
                      *(str(r[c]) for c in columns), *(r[m] for m in metrics)] for r in rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    parser.add_argument("--experiment", help="every run of this MLflow experiment")
    parser.add_argument("--parent", help="the child runs of this run id ('latest': the newest sweep)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--columns", nargs="*", default=[], help="params or tags to show, e.g. model.hidden_dim")
    parser.add_argument("--group-by", help="a column (e.g. variant) to average over: mean ± std and n per value")
    parser.add_argument("--out", default=str(resolve("plots/compare.png")), help="the plot (PNG); a .md and a "
                        ".csv with the same stem are written next to it")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--params", default=str(resolve("params.yaml")))
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.run_ids, args.experiment, args.parent)) != 1:
        parser.error("give exactly one of: RUN_ID..., --experiment NAME, --parent RUN_ID")
    client = tracking.client(tracking_uri(Path(args.params), args.tracking_uri))
    sweep_experiment = load_pipeline_config(args.params).tune.experiment
    try:
        runs = load_runs(client, args.run_ids, args.experiment, args.parent, sweep_experiment)
    except CompareError as err:
        raise SystemExit(f"pipeline.compare: {err}") from None
    rows = run_rows(runs, args.metrics, args.columns)
    with_metrics = [r for r in rows if any(not math.isnan(r[m]) for m in args.metrics)]
    if not with_metrics:
        raise SystemExit(f"pipeline.compare: none of the {len(rows)} run(s) has any of the metrics {args.metrics}")
    if len(with_metrics) < len(rows) and not args.run_ids:
        print(f"({len(rows) - len(with_metrics)} run(s) without any of {args.metrics} left out, e.g. sweep parents)",
              file=sys.stderr)
        rows = with_metrics
    headers, cells = comparison_tables(rows, args.metrics, args.columns, args.group_by)
    print(text_table(headers, cells), end="")
    out = Path(args.out)
    title = f"{len(rows)} MLflow run(s)" + (f", mean ± std per {args.group_by}" if args.group_by else "")
    plot_comparison(rows, args.metrics, out, args.group_by, title)
    out.with_suffix(".md").write_text(markdown_table(headers, cells))
    write_csv(out.with_suffix(".csv"), rows)
    print(f"plot: {out}\ntable: {out.with_suffix('.md')}, {out.with_suffix('.csv')}")
    return {"rows": rows, "headers": headers, "cells": cells, "plot": out}


if __name__ == "__main__":
    main()
