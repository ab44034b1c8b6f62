"""Every plot of dvc.yaml and sweeps/dvc.yaml renders, once, with its data: the project's DVC files and plot
templates are copied into a throwaway DVC repository, small CSVs with the columns the stages write are placed at
the plot paths, and `dvc plots show` (JSON and HTML) must show every row, with a number in every quantitative
field (a category on a quantitative axis renders as an empty plot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dvc.imports import REPO

DVC = Path(sys.executable).with_name("dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
DVC_FILES = ("dvc.yaml", "sweeps/dvc.yaml")

# plot file -> (writer, CSV text with the writer's columns); values distinctive enough to find in the output
SAMPLES = {
    "plots/train_loss.csv": ("pipeline/train.py", "step,epoch,loss,loss_mask,loss_dice\n"
                             "10,0,4.1375,1.2503,2.0117\n20,0,3.5921,1.1048,1.7784\n"),
    "plots/pretrain_loss.csv": ("pipeline/train.py", "step,epoch,loss,loss_mask,loss_dice\n"
                                "10,0,5.2175,1.5103,2.3117\n20,0,4.6921,1.3048,2.0784\n"),
    "plots/refcoco_precision.csv": ("pipeline/evaluate_dataset.py",
                                    "iou_threshold,refcoco,refcoco+,refcocog\n0.5,0.581234,0.523456,0.498765\n"
                                    "0.9,0.051234,0.043456,0.038765\n"),
    "plots/ytvos_per_video.csv": ("pipeline/evaluate_dataset.py",
                                  "video,jf\nvid_ytvos_a,0.734512\nvid_ytvos_b,0.412377\n"),
    "plots/ytvos_proxy_per_video.csv": ("pipeline/evaluate_dataset.py", "video,jf\nvid_proxy_a,0.623101\n"),
    "plots/davis_per_video.csv": ("pipeline/evaluate_dataset.py",
                                  "video,jf\nbike-packing,0.551234\ndogs-jump,0.298765\n"),
    "plots/a2d_precision.csv": ("pipeline/evaluate_dataset.py",
                                "iou_threshold,precision\n0.5,0.654321\n0.6,0.543219\n0.7,0.432198\n"),
    "plots/jhmdb_precision.csv": ("pipeline/evaluate_dataset.py",
                                  "iou_threshold,precision\n0.5,0.712345\n0.9,0.012346\n"),
    "metrics/tune/variants.csv": ("pipeline/tune.py",
                                  "variant,model.inter_frame_layers,model.bidirectional_vl,n,jf_mean,jf_std\n"
                                  "ifl0-bvlF,0,False,2,0.301234,0.012345\nifl1-bvlT,1,True,2,0.356789,0.023456\n"),
    "metrics/tune/trials.csv": ("pipeline/tune.py",
                                "variant,model.inter_frame_layers,model.bidirectional_vl,seed,jf\n"
                                "ifl0-bvlF,0,False,1,0.291234\nifl0-bvlF,0,False,2,0.311234\n"
                                "ifl1-bvlT,1,True,1,0.346789\n"),
}


def declared_plots() -> dict[str, dict]:
    """Top-level `plots:` of both DVC files: repository-relative path -> definition."""
    out = {}
    for name in DVC_FILES:
        base = (REPO / name).parent
        for entry in yaml.safe_load((REPO / name).read_text()).get("plots", []):
            (path, props), = entry.items()
            out[(base / path).resolve().relative_to(REPO).as_posix()] = props or {}
    return out


def _fields(props: dict) -> set[str]:
    y = props.get("y", [])
    return {props["x"], *([y] if isinstance(y, str) else y)}


def test_every_plot_has_a_sample_with_its_fields_and_the_writer_writes_them():
    plots = declared_plots()
    assert set(plots) == set(SAMPLES), "a plot of dvc.yaml without a sample here (or the reverse)"
    for path, props in plots.items():
        writer, text = SAMPLES[path]
        header = text.splitlines()[0].split(",")
        assert _fields(props) <= set(header), f"{path}: {props} names columns the CSV does not have"
        source = (REPO / writer).read_text()
        for field in _fields(props) - {"jf_mean"}:  # tune writes f"{metric}_mean" for each metric ("jf")
            assert field in source, f"{path}: {writer} writes no column {field!r}"


def test_stage_outputs_are_not_plot_definitions_too():
    """A path that is a stage's `plots:` output and a top-level plot renders twice: stages list them as outs."""
    for name in DVC_FILES:
        for stage in yaml.safe_load((REPO / name).read_text())["stages"].values():
            assert not stage.get("do", stage).get("plots"), f"{name}: plots belong in the top-level `plots:`"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if not DVC.exists():
        pytest.skip("no dvc executable next to this Python")
    root = tmp_path_factory.mktemp("plots-repo")
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=root, check=True, timeout=60, env=ENV)
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    for name in (*DVC_FILES, "params.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    if (REPO / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    for path, (_, text) in SAMPLES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    done = subprocess.run([str(DVC), "plots", "show", "--json"], cwd=root, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    html_dir = root / "html"
    shown = subprocess.run([str(DVC), "plots", "show", "-o", str(html_dir)], cwd=root, capture_output=True,
                           text=True, timeout=120, env=ENV)
    assert shown.returncode == 0, shown.stderr
    return json.loads(done.stdout), (html_dir / "index.html").read_text()


def _quantitative_fields(spec) -> set[str]:
    out = set()
    if isinstance(spec, dict):
        if spec.get("type") == "quantitative" and isinstance(spec.get("field"), str):
            out.add(spec["field"])
        for v in spec.values():
            out |= _quantitative_fields(v)
    elif isinstance(spec, list):
        for v in spec:
            out |= _quantitative_fields(v)
    return out


def test_every_plot_renders_once_with_its_data(rendered):
    data, _ = rendered
    assert not data.get("errors"), data.get("errors")
    assert set(data["data"]) == set(SAMPLES), "each plot exactly once (no stage-output duplicate)"
    for path, (_, text) in SAMPLES.items():
        (plot,) = data["data"][path]
        rows = plot["content"]["data"]["values"]
        assert rows, f"{path}: rendered with no data"
        header, *lines = [line.split(",") for line in text.splitlines()]
        for line in lines:  # every row of the CSV is in the plot
            want = dict(zip(header, line))
            assert any(all(r.get(k) == v for k, v in want.items()) for r in rows), f"{path}: row {want} missing"
        quantitative = _quantitative_fields(plot["content"]) & set().union(*rows)
        assert quantitative, f"{path}: no quantitative axis has data"
        for field in quantitative:
            for r in rows:
                try:
                    float(r[field])
                except ValueError:
                    pytest.fail(f"{path}: {field!r} is on a quantitative axis but holds {r[field]!r}: the plot "
                                f"renders empty (bar_horizontal: x is the number, y the category)")


def test_the_html_report_holds_every_plot(rendered):
    _, html = rendered
    for path, (_, text) in SAMPLES.items():
        last = text.splitlines()[-1].split(",")
        assert all(value in html for value in last), f"{path}: {last} not in index.html"
    assert "vid_ytvos_a" in html and "0.734512" in html
