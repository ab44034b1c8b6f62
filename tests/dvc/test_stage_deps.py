"""dvc.yaml's code deps are complete: every project file a stage's command imports (transitively, also inside
functions) or opens next to its code (ops/csrc) is covered by one of the stage's `deps:` (the file itself or a
folder above it), so that changing it makes the stage run again. The stages come from DVC's own parser (foreach and
`${...}` resolved), for both the main job (dvc.yaml) and the sweep (sweeps/dvc.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dvc.imports import PACKAGES, REPO, command_modules, direct_needs, module_file, needed_files

pytest.importorskip("dvc")

DVC = Path(sys.executable).with_name("dvc")


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return [{"name": s.addressing, "cmd": s.cmd,
                 "deps": [Path(d.fs_path) for d in s.deps],
                 "outs": [Path(o.fs_path) for o in s.outs]} for s in repo.index.stages]


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in deps)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_every_stage_runs_a_project_module(stages):
    assert {s["name"] for s in stages} >= {"resolve_params", "generate", "train", "summary", "package",
                                           "sweeps/dvc.yaml:tune"}
    for s in stages:
        mods = command_modules(s["cmd"])
        assert mods and all(module_file(m) for m in mods), f"{s['name']}: no project module in {s['cmd']!r}"


def test_every_imported_project_file_is_a_dependency(stages):
    missing = {}
    for s in stages:
        needed = set().union(*(needed_files(m) for m in command_modules(s["cmd"])))
        gaps = sorted(_rel(p) for p in needed if not _covered(p, s["deps"]))
        if gaps:
            missing[s["name"]] = gaps
    listing = "\n".join(f"  {stage}: {', '.join(files)}" for stage, files in missing.items())
    assert not missing, ("stages whose command imports project files that no `deps:` entry covers (add the file "
                         f"or its folder to the stage in dvc.yaml):\n{listing}")


def test_every_code_dependency_exists(stages):
    """A moved or renamed module must not leave a dep behind (DVC would stop: missing dependency)."""
    produced = [o for s in stages for o in s["outs"]]
    stale = {}
    for s in stages:
        for d in s["deps"]:
            in_code = d.relative_to(REPO).parts[0] in PACKAGES or d.parent == REPO
            if in_code and not d.exists() and not _covered(d, produced):
                stale.setdefault(s["name"], []).append(_rel(d))
    assert not stale, f"deps that do not exist: {stale}"


def test_the_import_scan_sees_lazy_imports_and_files_opened_next_to_the_code():
    # function-level import (evaluate_dataset imports the proxy evaluation inside eval_ytvos_proxy)
    assert REPO / "bifit/eval/ytvos_proxy.py" in needed_files("pipeline.evaluate_dataset")
    # ops/build.py compiles the kernel sources in ops/csrc: `CSRC = Path(__file__).resolve().parent / "csrc"`
    assert (REPO / "ops/csrc").resolve() in direct_needs(REPO / "ops/build.py")[1]
    assert (REPO / "ops/csrc").resolve() in needed_files("pipeline.train")
    # `from bifit import load_model` goes through bifit/__init__.py's lazy __getattr__ to bifit/loading.py
    assert REPO / "bifit/loading.py" in needed_files("pipeline.evaluate_dataset")


@pytest.mark.parametrize("args", [["stage", "list", "--all"], ["dag"]])
def test_dvc_parses_the_pipelines(args):
    if not DVC.exists():
        pytest.skip("no dvc executable next to this Python")
    done = subprocess.run([str(DVC), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stderr
    assert "resolve_params" in done.stdout
