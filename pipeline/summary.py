"""DVC stage `summary`: one markdown table of every benchmark's metrics next to the paper's numbers.

    python -m pipeline.summary [--params params.yaml] [--out metrics/summary.md]

Reads `<paths.metrics>/{ytvos,ytvos_proxy,davis,a2d,jhmdb,refcoco}.json` (fractions) and prints them x 100 beside
the BIFIT ResNet-50 numbers of its README, with the data source and checkpoint of each row and the wall time of
each evaluation. refcoco.json holds one object per image dataset: each gets its own rows ("RefCOCO val",
"RefCOCO+ val", "RefCOCOg val"), with an empty paper column (BIFIT reports no RefCOCO numbers). A run on the
synthetic data is not comparable with the paper; the table says so on every such row. A missing metrics file is
listed as missing, never filled in.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.config import EVALUATIONS, PipelineConfig, load_pipeline_config, resolve

# BIFIT (ResNet-50) as reported in its README (Ref-DAVIS17 and JHMDB: zero-shot, no finetune)
PAPER = {
    "ytvos": {"jf": 59.9, "j": 58.4, "f": 61.4},
    "davis": {"jf": 60.5, "j": 56.9, "f": 64.1},
    "a2d": {"overall_iou": 74.7, "mean_iou": 67.6, "mAP 0.5:0.95": 52.4},
    "jhmdb": {"overall_iou": 72.1, "mean_iou": 71.5, "mAP 0.5:0.95": 43.0},
}
TITLES = {"ytvos": "Ref-YouTube-VOS valid", "ytvos_proxy": "Ref-YouTube-VOS local proxy (held-out train videos)",
          "davis": "Ref-DAVIS17 val (4 annotators averaged)", "a2d": "A2D-Sentences test",
          "jhmdb": "JHMDB-Sentences", "refcoco": "RefCOCO/+/g val"}
# evaluations whose metrics file holds one object per dataset: dataset key -> row title, in table order
PART_TITLES = {"refcoco": {"refcoco": "RefCOCO val", "refcoco+": "RefCOCO+ val", "refcocog": "RefCOCOg val"}}
REFCOCO_NOTE = ("RefCOCO/+/g: val splits, each sentence scored on its image alone (highest-scoring query); BIFIT "
                "reports no RefCOCO numbers, so these rows have no paper value")
DAVIS_PROTOCOL_NOTE = ("Ref-DAVIS17: unsupervised protocol (Hungarian matching), mean of 4 annotator runs; "
                       "no per-expression score")
ROWS = {  # metric key -> label, in table order
    "ytvos": {"jf": "J&F", "j": "J", "f": "F", "jf_shuffled": "J&F, expressions shuffled (control)"},
    "ytvos_proxy": {"jf": "J&F", "j": "J", "f": "F"},
    "davis": {"jf": "J&F", "j": "J", "f": "F"},
    "a2d": {"overall_iou": "Overall IoU", "mean_iou": "Mean IoU",
            "mAP 0.5:0.95": "mAP (all queries: the paper's protocol)",
            "best-query-only mAP 0.5:0.95": "mAP (best query only: not the paper's protocol)",
            "P@0.5": "P@0.5", "P@0.9": "P@0.9"},
}
ROWS["jhmdb"] = ROWS["a2d"]
ROWS["refcoco"] = {"overall_iou": "Overall IoU", "mean_iou": "Mean IoU", "P@0.5": "P@0.5"}  # per dataset


def _source(cfg: PipelineConfig, name: str) -> str:
    return getattr(cfg.datasets, "ytvos" if name == "ytvos_proxy" else name).source


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def sections(name: str, metrics: dict) -> list[tuple[str, dict]]:
    """(row title, metrics) of each part of evaluation `name`: the whole file, or for an evaluation of several
    datasets (PART_TITLES) each dataset object the file holds."""
    if name not in PART_TITLES:
        return [(TITLES[name], metrics)]
    return [(title, metrics[key]) for key, title in PART_TITLES[name].items() if isinstance(metrics.get(key), dict)]


def summary_rows(cfg: PipelineConfig) -> tuple[list[list[str]], list[str]]:
    rows, notes = [], []
    for name in EVALUATIONS:
        path = resolve(cfg.paths.metrics) / f"{name}.json"
        source = _source(cfg, name)
        data = "synthetic (not comparable)" if source == "synthetic" else "real"
        ckpt = getattr(cfg.datasets, name).checkpoint
        if not path.is_file():
            rows.append([TITLES[name], "(no metrics file)", "missing", "", "", data, ckpt, ""])
            notes.append(f"{path} is missing: run `dvc repro evaluate@{name}`")
            continue
        metrics = json.loads(path.read_text())
        seconds = f"{metrics['eval_seconds']:.0f} s" if "eval_seconds" in metrics else ""
        if name == "ytvos" and "jf" not in metrics:
            rows.append([TITLES[name], "J&F", "server only", _fmt(PAPER[name]["jf"]), "", data, ckpt, seconds])
            notes.append("Ref-YouTube-VOS valid has no public GT: submit outputs/submission_ytvos.zip to the "
                         "challenge server, or compare runs with the local proxy row")
            continue
        parts = sections(name, metrics)
        if not parts:
            rows.append([TITLES[name], "(no dataset in the metrics file)", "missing", "", "", data, ckpt, seconds])
            notes.append(f"{path} holds no dataset's metrics: run `dvc repro evaluate@{name}`")
        for title, values in parts:
            for key, label in ROWS[name].items():
                value = values.get(key)
                ours = None if value is None else 100 * value
                paper = PAPER.get(name, {}).get(key)
                delta = "" if ours is None or paper is None else f"{ours - paper:+.1f}"
                rows.append([title, label, _fmt(ours), _fmt(paper) if paper is not None else "",
                             delta, data, ckpt, seconds])
        if name == "davis":
            notes.append(DAVIS_PROTOCOL_NOTE)
        if name == "refcoco" and parts:
            notes.append(REFCOCO_NOTE)
    return rows, notes


def render(rows: list[list[str]], notes: list[str]) -> str:
    header = ["Benchmark", "Metric", "This run", "BIFIT paper (R50)", "Δ", "Data", "Checkpoint", "Eval time"]
    lines = ["# Evaluation summary", "",
             "Values are percentages. The paper's numbers are BIFIT ResNet-50 from its README; the paper evaluates "
             "Ref-DAVIS17 with its Ref-YouTube-VOS model and JHMDB-Sentences with its A2D-Sentences model, both "
             "zero-shot.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="default: <paths.metrics>/summary.md")
    args = parser.parse_args(argv)
    cfg = load_pipeline_config(args.params)
    text = render(*summary_rows(cfg))
    out = args.out or resolve(cfg.paths.metrics) / "summary.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
