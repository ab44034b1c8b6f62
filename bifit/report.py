"""Result tables: group trials by variant (mean and spread over seeds) and render markdown / CSV.

Rows are plain dicts (one per trial or run); nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value). NaNs are ignored."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def group_rows(rows: Iterable[dict], by: str, metrics: Sequence[str], keep: Sequence[str] = ()) -> list[dict]:
    """One row per value of `by` (in order of first appearance): `n`, `<m>_mean` and `<m>_std` for every metric,
    and the columns `keep` copied from the group's first row (e.g. the variant's switches)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    out = []
    for name, members in groups.items():
        summary = {by: name, **{k: members[0].get(k) for k in keep}, "n": len(members)}
        for m in metrics:
            summary[f"{m}_mean"], summary[f"{m}_std"] = mean_std([r.get(m, math.nan) for r in members])
        out.append(summary)
    return out


def format_value(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """'0.4120 ± 0.0310' ('0.4120' alone when the spread is undefined)."""
    if math.isnan(std):
        return format_value(mean, digits)
    return f"{format_value(mean, digits)} ± {format_value(std, digits)}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; cells are formatted with `format_value` unless they are strings already."""
    body = [[c if isinstance(c, str) else format_value(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Column-aligned plain text (for the terminal)."""
    body = [[c if isinstance(c, str) else format_value(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in body]) + "\n"


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Rows as CSV with the given column order (default: every key, in order of first appearance)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_cell(r.get(k)) for k in columns})


def _csv_cell(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
