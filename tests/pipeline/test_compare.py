"""pipeline.compare on a small MLflow store: a sweep parent with four children, tables, plots, checkpoints."""

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.pipeline.test_chain import _params

JF = {("a", 0): 0.30, ("a", 1): 0.40, ("b", 0): 0.55, ("b", 1): 0.65}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("compare")
    params = _params(tmp)
    raw = yaml.safe_load(params.read_text())
    raw["tune"] = {"experiment": "toy-ablations"}
    params.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toy-ablations", artifact_location=(tmp / "artifacts").as_uri())
    other = client.create_experiment("other", artifact_location=(tmp / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep-x", tags={"kind": "sweep"}).info.run_id
    children = {}
    for (variant, seed), jf in JF.items():
        run = client.create_run(exp, run_name=f"{variant} seed={seed}", tags={
            "mlflow.parentRunId": parent, "variant": variant, "seed": str(seed), "kind": "trial"})
        rid = run.info.run_id
        client.log_param(rid, "model.inter_frame_layers", "0" if variant == "a" else "1")
        client.log_metric(rid, "ytvos_jf", jf)
        client.log_metric(rid, "ytvos_j", jf - 0.05)
        client.log_metric(rid, "ytvos_f", jf + 0.05)
        client.log_metric(rid, "ytvos_jf_shuffled", 0.1)
        client.set_terminated(rid)
        children[(variant, seed)] = rid
    stray = client.create_run(other, run_name="train-x").info.run_id
    client.log_metric(stray, "ytvos_jf", 0.2)
    return tmp, params, uri, parent, children, stray, client


def _main(store, *args):
    from pipeline import compare

    tmp, params, uri, *_ = store
    return compare.main([*args, "--tracking-uri", uri, "--params", str(params)])


def test_parent_grouped_by_variant_mean_and_std(store, capsys):
    tmp, _, _, parent, *_ = store
    out = _main(store, "--parent", parent, "--group-by", "variant", "--out", str(tmp / "grouped.png"))
    assert out["headers"][:2] == ["variant", "n"]
    cells = {c[0]: c for c in out["cells"]}
    for variant in ("a", "b"):
        jf = [JF[(variant, s)] for s in (0, 1)]
        assert cells[variant][1] == 2
        assert cells[variant][2] == f"{np.mean(jf):.4f} ± {np.std(jf, ddof=1):.4f}"
    printed = capsys.readouterr().out
    assert "0.3500 ± 0.0707" in printed and "0.6000 ± 0.0707" in printed
    with Image.open(tmp / "grouped.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
    assert "| a | 2 | 0.3500 ± 0.0707 |" in (tmp / "grouped.md").read_text()


def test_parent_runs_one_row_each(store):
    tmp, _, _, parent, children, _, _ = store
    out = _main(store, "--parent", parent, "--columns", "model.inter_frame_layers", "--out", str(tmp / "runs.png"))
    rows = {(r["variant"], int(r["seed"])): r for r in out["rows"]}
    assert set(rows) == set(JF)
    for key, jf in JF.items():
        assert rows[key]["ytvos_jf"] == pytest.approx(jf) and rows[key]["run_id"] == children[key]
        assert rows[key]["model.inter_frame_layers"] == ("0" if key[0] == "a" else "1")
    assert (tmp / "runs.png").stat().st_size > 1000
    assert (tmp / "runs.csv").read_text().count("\n") == 5  # header + 4 runs


def test_latest_sweep_experiment_and_explicit_ids(store):
    tmp, _, _, parent, children, stray, _ = store
    latest = _main(store, "--parent", "latest", "--out", str(tmp / "latest.png"))
    assert {r["run_id"] for r in latest["rows"]} == set(children.values())
    whole = _main(store, "--experiment", "toy-ablations", "--out", str(tmp / "exp.png"))
    assert {r["run_id"] for r in whole["rows"]} == set(children.values())  # the parent has no metrics
    picked = _main(store, children[("b", 1)], stray, "--metrics", "ytvos_jf", "--out", str(tmp / "ids.png"))
    assert [r["run_id"] for r in picked["rows"]] == [children[("b", 1)], stray]
    assert [r["ytvos_jf"] for r in picked["rows"]] == pytest.approx([0.65, 0.2])


def test_unknown_run_and_missing_metrics_are_reported(store):
    tmp = store[0]
    with pytest.raises(SystemExit, match="run 'deadbeef': not found"):
        _main(store, "deadbeef", "--out", str(tmp / "x.png"))
    with pytest.raises(SystemExit, match="no MLflow experiment named 'nope'"):
        _main(store, "--experiment", "nope", "--out", str(tmp / "x.png"))
    with pytest.raises(SystemExit, match="has any of the metrics"):
        _main(store, "--parent", store[3], "--metrics", "no_such_metric", "--out", str(tmp / "x.png"))


def test_checkpoint_of_run_prefers_local_tag_then_artifact(store, tmp_path):
    from pipeline.compare import CompareError, checkpoint_of_run

    _, _, _, _, children, stray, client = store
    local = tmp_path / "epoch_0000.pth"
    local.write_bytes(b"weights")
    client.set_tag(children[("a", 0)], "checkpoint", str(local))
    assert checkpoint_of_run(client, children[("a", 0)]) == local
    model = tmp_path / "bifit.pth"
    model.write_bytes(b"exported")
    client.log_artifact(stray, str(model), artifact_path="model")
    got = checkpoint_of_run(client, stray, tmp_path / "dl")
    assert got.read_bytes() == b"exported"
    with pytest.raises(CompareError, match="no checkpoint"):
        checkpoint_of_run(client, children[("b", 0)], tmp_path / "dl2")
