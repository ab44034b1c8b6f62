"""The metric parity CLI: passes on the public goldens, fails on perturbed copies and on unknown layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*files) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bifit.eval.parity", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def goldens(golden_dir):
    return golden_dir / "davis_metrics_public.npz", golden_dir / "a2d_metrics_public.npz"


def test_cli_passes_on_public_goldens(goldens):
    proc = run_cli(*goldens)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 2
    assert "deform_480x854" in proc.stdout and "e2e vidB annotator 3" in proc.stdout
    assert "metric_values [fast]" in proc.stdout and "metric_values [pycocotools]" in proc.stdout


def test_cli_fails_on_perturbed_davis_output(goldens, tmp_path):
    d = load(goldens[0])
    d["corner_small_360x640__F"] = d["corner_small_360x640__F"].copy()
    d["corner_small_360x640__F"][4] += 2e-6
    d["e2e_global"] = d["e2e_global"] + np.eye(4, 7) * 1e-5
    np.savez_compressed(tmp_path / "davis_bad.npz", **d)
    proc = run_cli(tmp_path / "davis_bad.npz")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL(F)" in proc.stdout and "FAIL(J&F-Mean,J-Mean,J-Recall,J-Decay)" in proc.stdout


def test_cli_fails_on_perturbed_inputs(goldens, tmp_path):
    """The stored outputs are recomputed from the inputs: changing an input mask must be caught."""
    d = load(goldens[1])
    tags = list(d["case_tags"])
    k = f"s{tags.index('iou_exactly_0.7'):03d}__pred"
    d[k] = d[k].copy()
    d[k][:, :4, :4] = ~d[k][:, :4, :4]
    np.savez_compressed(tmp_path / "a2d_bad.npz", **d)
    proc = run_cli(tmp_path / "a2d_bad.npz")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL(" in proc.stdout


def test_cli_missing_key_and_unknown_layout(goldens, tmp_path):
    d = load(goldens[1])
    del d["coco_stats_top1"]
    np.savez(tmp_path / "a2d_missing.npz", **d)
    proc = run_cli(tmp_path / "a2d_missing.npz")
    assert proc.returncode == 2
    assert "missing key 'coco_stats_top1'" in proc.stderr

    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    proc = run_cli(tmp_path / "other.npz")
    assert proc.returncode == 2 and "not recognised" in proc.stderr

    d = load(goldens[1])
    d["s999__gt"] = d["s000__gt"]
    np.savez(tmp_path / "a2d_extra.npz", **d)
    proc = run_cli(tmp_path / "a2d_extra.npz")
    assert proc.returncode == 2 and "s999__gt" in proc.stderr
