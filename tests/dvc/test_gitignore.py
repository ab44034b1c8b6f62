"""What DVC's diffs read from git is committed: metrics, plots, dvc.lock and params.resolved.yaml are not ignored
(`dvc metrics diff`, `dvc plots diff`, `dvc params diff` and `dvc exp show` compare commits); data, runs, models
and outputs stay ignored. Checked with `git check-ignore` on the project's .gitignore in a throwaway repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.dvc.imports import REPO

COMMITTED = ["dvc.lock", "params.resolved.yaml", "metrics/train.json", "metrics/ytvos.json", "metrics/summary.md",
             "metrics/tune/summary.json", "metrics/tune/variants.csv", "plots/train_loss.csv",
             "plots/ytvos_per_video.csv", "plots/a2d_precision.csv", ".dvc/plots/strip.json"]
IGNORED = ["data/synthetic/x.jpg", "data/status/ytvos.json", "runs/ray/x", "models/bifit.pth", "outputs/x.zip",
           "mlruns/0/meta.yaml", "mlflow.db", ".dvc/cache/files/x", ".dvc/tmp/lock"]


def _dvc_metrics_and_plots() -> list[str]:
    """Every metrics and plot file the pipelines declare (no `${...}` left: DVC's own parser)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        outs = [o for s in repo.index.stages for o in s.outs if o.metric or o.plot or not o.use_cache]
        paths = {Path(o.fs_path).relative_to(REPO).as_posix() for o in outs}
    return sorted(p for p in paths if p.split("/")[0] in ("metrics", "plots") or p == "params.resolved.yaml")


def test_diffable_files_are_committed_and_data_is_not(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    paths = sorted({*COMMITTED, *IGNORED, *_dvc_metrics_and_plots()})
    for p in paths:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("x")
    done = subprocess.run(["git", "check-ignore", "--stdin"], cwd=tmp_path, input="\n".join(paths) + "\n",
                          capture_output=True, text=True)
    ignored = set(done.stdout.split())
    wrongly = sorted(ignored - set(IGNORED))
    assert not wrongly, f"ignored by .gitignore, but DVC's diffs read them from git commits: {wrongly}"
    assert set(IGNORED) <= ignored, f"not ignored: {sorted(set(IGNORED) - ignored)}"


def test_metrics_and_plots_are_declared():
    declared = _dvc_metrics_and_plots()
    assert {"metrics/train.json", "plots/train_loss.csv", "params.resolved.yaml"} <= set(declared)
