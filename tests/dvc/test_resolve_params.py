"""The resolve_params stage: params.resolved.yaml holds exactly the settings the stages load from params.yaml and
its overlay files, so that DVC (which reads the stages' params from it) shows every value an overlay changes."""

from __future__ import annotations

import shutil

import pytest
import yaml

from bifit.config import flatten, load_config, to_dict
from pipeline import resolve_params
from pipeline.config import PipelineConfig, load_pipeline_config
from tests.dvc.imports import REPO

OVERLAYS = ["params_paper.yaml", "params_paper_finetune_ytvos.yaml", "params_paper_finetune_a2d.yaml"]


def _copy_params(tmp_path, overlay) -> object:
    """The repository's params.yaml and overlay files in tmp_path, `overlay` set to the given value."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["overlay"] = overlay
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name in OVERLAYS:
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "params.yaml"


def _resolve(params):
    out = resolve_params.main(["--params", str(params), "--out", str(params.with_name("resolved.yaml"))])
    return out, yaml.safe_load(out.read_text())


@pytest.mark.parametrize("overlay", [None, "params_paper.yaml",
                                     ["params_paper.yaml", "params_paper_finetune_a2d.yaml"]])
def test_the_file_is_what_the_config_loader_loads(tmp_path, overlay):
    params = _copy_params(tmp_path, overlay)
    out, written = _resolve(params)
    expected = to_dict(load_config(params, cls=PipelineConfig))
    assert yaml.safe_load(yaml.safe_dump(resolve_params._plain(expected))) == written
    # loaded as a params file, it gives the same settings as params.yaml (paths made absolute the same way)
    assert to_dict(load_pipeline_config(out)) == to_dict(load_pipeline_config(params))
    assert "overlay" not in written  # already applied: loading the file must not apply it again


def test_the_paper_overlay_shows_in_the_file_value_by_value(tmp_path):
    default = flatten(_resolve(_copy_params(tmp_path, None))[1])
    paper_params = _copy_params(tmp_path, "params_paper.yaml")
    out, paper = _resolve(paper_params)
    paper = flatten(paper)
    missing = object()  # pretrain.overrides is a mapping: the overlay may add keys the default lacks
    changed = {k for k in set(default) | set(paper) if default.get(k, missing) != paper.get(k, missing)}
    overlay = flatten(yaml.safe_load((REPO / "params_paper.yaml").read_text()))
    # every value the overlay sets is in the file, and every value that differs from the default is listed
    assert {k: paper[k] for k in overlay} == {k: yaml.safe_load(yaml.safe_dump(v)) for k, v in overlay.items()}
    assert changed == {k for k in overlay if overlay[k] != default.get(k, missing)}
    assert len(changed) > 30  # the paper configuration changes some 40 values (README, params_paper.yaml)
    assert {"model.backbone", "model.hidden_dim", "train.lr", "data.root", "datasets.davis.source"} <= changed
    text = out.read_text()
    assert "backbone: resnet50" in text and "hidden_dim: 256" in text and 'overlay: "params_paper.yaml"' in text
    # a stacked recipe: later files win
    _, stacked = _resolve(_copy_params(tmp_path, ["params_paper.yaml", "params_paper_finetune_ytvos.yaml"]))
    ft = flatten(yaml.safe_load((REPO / "params_paper_finetune_ytvos.yaml").read_text()))
    assert all(flatten(stacked)[k] == yaml.safe_load(yaml.safe_dump(v)) for k, v in ft.items())


def test_an_unchanged_file_is_left_alone(tmp_path):
    params = _copy_params(tmp_path, None)
    out, _ = _resolve(params)
    before = out.stat().st_mtime_ns
    _resolve(params)
    assert out.stat().st_mtime_ns == before


def test_the_committed_file_is_up_to_date():
    committed = REPO / resolve_params.DEFAULT_OUT
    assert committed.exists() and committed.read_text() == resolve_params.render(REPO / "params.yaml"), (
        "params.resolved.yaml is out of date with params.yaml (or the config defaults): run "
        "`dvc repro resolve_params` (or python -m pipeline.resolve_params) and commit it")


def test_the_stages_take_their_params_from_the_resolved_file():
    """Only resolve_params reads params.yaml (all of it); every other stage's params come from the resolved file
    and exist there (DVC would report a missing param)."""
    resolved = flatten(yaml.safe_load((REPO / resolve_params.DEFAULT_OUT).read_text()))
    for dvc_file in (REPO / "dvc.yaml", REPO / "sweeps" / "dvc.yaml"):
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            body = stage.get("do", stage)
            entries = body.get("params", [])
            if name == "resolve_params":
                assert entries == [{"params.yaml": None}], "resolve_params tracks the whole params.yaml"
                continue
            for entry in entries:
                assert isinstance(entry, dict) and list(entry) == ["params.resolved.yaml"], (
                    f"{dvc_file.name}:{name}: params from params.resolved.yaml only, got {entry!r}")
                keys = entry["params.resolved.yaml"]
                for key in keys:
                    key = key.replace("${key}", "ytvos_proxy")
                    assert any(k == key or k.startswith(key + ".") for k in resolved), f"{name}: no {key}"
