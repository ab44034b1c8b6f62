"""The ablation sweep at toy size: plan validation, a 2-variant x 2-seed Ray Tune sweep, tables, MLflow runs, resume."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.pipeline.test_chain import _params

SWEEP = dict(grid={"model.inter_frame_layers": [0, 1]}, seeds=[0, 1],
             trial_overrides={"train.epochs": 1, "train.max_steps_per_epoch": 2}, eval_max_expressions=4,
             max_concurrent_trials=2, num_workers=1, cpus_per_worker=1, max_failures=0,
             experiment="toy-ablations", storage_path="{tmp}/tune", results_dir="{tmp}/tune-results")


def _sweep_params(tmp, **changes):
    path = _params(tmp)
    raw = yaml.safe_load(path.read_text())
    raw["tune"] = json.loads(json.dumps({**SWEEP, **changes}).replace("{tmp}", str(tmp)))
    path.write_text(yaml.safe_dump(raw))
    return path


def _read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_default_plan_is_six_variants_times_two_seeds():
    from pipeline.config import load_pipeline_config
    from pipeline.tune import plan_trials

    cfg = load_pipeline_config(REPO / "params.yaml")
    trials = plan_trials(cfg)
    assert len(trials) == 12 and len({t.key for t in trials}) == 12
    assert {t.name for t in trials} == {f"inter_frame_layers={i} bidirectional_vl={b}"
                                        for i in (0, 1, 2) for b in ("false", "true")}
    t = trials[0]
    assert t.cfg.train.epochs == cfg.tune.trial_overrides["train.epochs"] and t.cfg.train.seed == cfg.tune.seeds[0]
    assert t.cfg.ray.num_workers == cfg.tune.num_workers
    assert t.cfg.training_hash() != cfg.training_hash()  # trials never share the train stage's run folder


@pytest.mark.parametrize("change, message", [
    (dict(grid={"model.inter_frame_layers": [0, -1]}), "inter_frame_layers=-1.*model.inter_frame_layers: expected"),
    (dict(grid={"model.no_such_switch": [0, 1]}), r"model: unknown key\(s\) \['no_such_switch'\]"),
    (dict(grid={"ray.num_workers": [1, 2]}), "tune.grid.ray.num_workers: expected a dotted key of a training"),
    (dict(grid={"train.seed": [1, 2]}), r"tune.grid.train.seed: expected .*the seeds are set by tune.seeds"),
    (dict(grid={"train.lr": [1e-3, 1e-3]}), "tune.grid.train.lr: expected distinct values"),
    (dict(grid={"model.bidirectional_vl": "yes"}), r"tune.grid.model.bidirectional_vl: expected a list"),
    (dict(seeds=[]), "tune.seeds: expected a non-empty list"),
    (dict(max_concurrent_trials=0), "tune.max_concurrent_trials: expected an integer >= 1"),
    (dict(benchmark="kitti"), "tune.benchmark: expected one of ytvos, ytvos_proxy"),
])
def test_bad_sweep_settings_rejected_before_ray_starts(tmp_path, change, message):
    import ray

    from bifit.config import ConfigError
    from pipeline import tune

    params = _sweep_params(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as err:
        tune.main(["--params", str(params)])
    assert str(params) in str(err.value)
    assert not ray.is_initialized()


def test_eval_device_cuda_without_a_gpu_stops_the_sweep_before_ray_starts(tmp_path, monkeypatch):
    import ray
    import torch

    from bifit.config import ConfigError
    from pipeline import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    params = _sweep_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["eval"]["device"] = "cuda"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"^{params}: eval.device: 'cuda' asks for a GPU but torch sees none"):
        tune.main(["--params", str(params)])
    assert not ray.is_initialized() and not (tmp_path / "tune").exists()


def test_trial_identity_ignores_where_it_is_evaluated_but_not_bfloat16():
    from pipeline.config import load_pipeline_config
    from pipeline.tune import plan_trials, sweep_hash

    def first_key(**overrides):
        return plan_trials(load_pipeline_config(REPO / "params.yaml", overrides=overrides))[0].key

    default = first_key()
    assert first_key(**{"eval.device": "cpu"}) == default == first_key(**{"eval.device": "cuda"})
    assert first_key(**{"eval.amp": True}) != default
    cfg = load_pipeline_config(REPO / "params.yaml")
    assert sweep_hash(load_pipeline_config(REPO / "params.yaml", overrides={"eval.amp": True})) != sweep_hash(cfg)
    # the trials train with tune.num_workers etc.: those key the trials; the train stage's ray section keys neither
    assert first_key(**{"tune.num_workers": 2}) != default
    assert first_key(**{"ray.num_workers": 3}) == default
    assert sweep_hash(load_pipeline_config(REPO / "params.yaml", overrides={"ray.num_workers": 3})) == sweep_hash(cfg)


def test_group_rows_mean_and_sample_std():
    from bifit.report import format_mean_std, group_rows

    rows = [{"variant": "a", "jf": 0.2}, {"variant": "b", "jf": 0.5}, {"variant": "a", "jf": 0.4}]
    a, b = group_rows(rows, "variant", ["jf"])
    assert a["n"] == 2 and a["jf_mean"] == pytest.approx(0.3) and a["jf_std"] == pytest.approx(math.sqrt(0.02))
    assert b["n"] == 1 and math.isnan(b["jf_std"])
    assert format_mean_std(a["jf_mean"], a["jf_std"]) == "0.3000 ± 0.1414"
    assert format_mean_std(b["jf_mean"], b["jf_std"]) == "0.5000"


def _stored_result(spec, mlflow_run_id: str) -> dict:
    """A finished trial as the results store holds it (only what the MLflow runs read)."""
    return {"benchmark": "ytvos", "metrics": {"jf": 0.5, "j": 0.4, "f": 0.6, "jf_shuffled": math.nan, "device": "cpu",
                                              "amp": False, "num_expressions": 4},
            "wall_seconds": 3.5, "num_parameters": 10, "train_loss": 1.5, "checkpoint": "/runs/epoch_0000.pth",
            "mlflow_run_id": mlflow_run_id, "key": spec.key}


def test_trial_metrics_prefix_the_benchmark():
    from pipeline.tune import trial_metrics

    metrics = {"jf": 0.5, "P@0.5": 0.25, "device": "cpu"}
    assert trial_metrics({"benchmark": "a2d", "metrics": metrics, "wall_seconds": 2.0, "num_parameters": 7,
                          "train_loss": 0.5}) == {"a2d_jf": 0.5, "a2d_P@0.5": 0.25, "a2d_device": "cpu",
                                                  "wall_seconds": 2.0, "num_parameters": 7, "final_train_loss": 0.5}
    assert "ytvos_jf" in trial_metrics({"metrics": metrics, "wall_seconds": 0, "num_parameters": 0,
                                        "train_loss": 0})  # results stored before the benchmark was recorded


def test_sweep_runs_without_ray(tmp_path, monkeypatch):
    """The sweep's MLflow runs, from the MLflow side of pipeline.tune (no training): the parent run (resumed
    by a rerun), a trial's child run, a stored trial reported by another sweep as a child run of its own (made
    once), and the parent's end."""
    from pipeline import tracking, tune
    from pipeline.config import load_pipeline_config, resolve

    _hermetic_mlflow(monkeypatch)
    cfg = load_pipeline_config(_sweep_params(tmp_path))
    spec = tune.plan_trials(cfg)[1]  # inter_frame_layers=0, seed 1
    uri, c = cfg.mlflow.resolved_uri(), tracking.client(cfg.mlflow.resolved_uri())
    parent = tune.start_parent_run(cfg, "s1", tmp_path / "sweeps/s1")
    run = c.get_run(parent)
    assert (run.info.run_name, run.data.tags["kind"], run.data.tags["sweep"]) == ("sweep-s1", "sweep", "s1")
    assert run.data.params["seeds"] == "[0, 1]" and run.data.params["eval_max_expressions"] == "4"
    experiment = c.get_experiment(run.info.experiment_id)
    assert experiment.name == "toy-ablations"
    assert experiment.artifact_location == resolve(cfg.mlflow.artifact_location).as_uri()
    tracking.set_status(uri, parent, "FAILED")  # the sweep died
    assert tune.start_parent_run(cfg, "s1", tmp_path / "sweeps/s1") == parent  # resumed: the same run, running
    assert tracking.run_state(uri, parent) == "RUNNING"

    trained = tune.start_child_run(spec, parent, "s1", tmp_path / "train-run")  # the trial's run, as it trains
    assert tune.start_child_run(spec, parent, "s1", tmp_path / "train-run") == trained  # its id file
    run = c.get_run(trained)
    assert run.info.run_name == f"{spec.name} seed=1" and run.info.status == "RUNNING"
    assert {k: run.data.tags[k] for k in (tracking.PARENT_TAG, "stage", "kind", "sweep", "variant", "seed",
                                          "trial_key", "config_hash", "model.inter_frame_layers")} == {
        tracking.PARENT_TAG: parent, "stage": "tune", "kind": "trial", "sweep": "s1", "variant": spec.name,
        "seed": "1", "trial_key": spec.key, "config_hash": spec.cfg.training_hash(), "model.inter_frame_layers": "0"}
    assert run.data.params["model.inter_frame_layers"] == "0" and run.data.params["train.seed"] == "1"
    result = _stored_result(spec, trained)
    tracking.log_trial_result(uri, trained, tune.trial_metrics(result), result["checkpoint"])
    assert tune.child_run_of_sweep(spec, result, parent, "s1", tmp_path / "sweeps/s1") == trained  # its own child

    other = tune.start_parent_run(cfg, "s2", tmp_path / "sweeps/s2")
    reused = tune.child_run_of_sweep(spec, result, other, "s2", tmp_path / "sweeps/s2")
    assert reused not in (trained, other)
    assert tune.child_run_of_sweep(spec, result, other, "s2", tmp_path / "sweeps/s2") == reused  # linked once
    for run_id in (trained, reused):
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == "/runs/epoch_0000.pth"
        assert run.data.metrics == {"ytvos_jf": 0.5, "ytvos_j": 0.4, "ytvos_f": 0.6, "ytvos_num_expressions": 4.0,
                                    "wall_seconds": 3.5, "num_parameters": 10.0, "final_train_loss": 1.5}
    run = c.get_run(reused)
    assert (run.data.tags[tracking.PARENT_TAG], run.data.tags["sweep"], run.data.tags["reused_from"]) == (
        other, "s2", trained)
    assert (run.data.tags["variant"], run.data.tags["trial_key"]) == (spec.name, spec.key)
    assert (run.data.params["ytvos_eval_device"], run.data.params["ytvos_eval_amp"]) == ("cpu", "False")
    assert run.data.params["model.inter_frame_layers"] == "0"

    out = tmp_path / "tables"
    out.mkdir()
    for name in ("results.md", "trials.csv", "variants.csv", "summary.json"):
        (out / name).write_text(name)
    variants = [{"variant": "inter_frame_layers=0", "jf_mean": 0.5},
                {"variant": "inter_frame_layers=1", "jf_mean": math.nan}]
    tune._finish_parent_run(cfg, other, out, variants, [{"variant": "inter_frame_layers=1"}], ["jf", "j"])
    run = c.get_run(other)
    assert run.info.status == "FAILED"  # a trial failed
    assert run.data.metrics == {"best_jf_mean": 0.5, "num_failed_trials": 1.0}
    assert run.data.tags["best_variant"] == "inter_frame_layers=0"
    assert sorted(tracking.artifact_paths(c, other, "tables")) == [
        "tables/results.md", "tables/summary.json", "tables/trials.csv", "tables/variants.csv"]
    tune._finish_parent_run(cfg, parent, out, variants[1:], [], ["jf"])  # no finite J&F: no best variant
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and "best_variant" not in run.data.tags
    assert run.data.metrics == {"num_failed_trials": 0.0}


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _hermetic_mlflow(mp):
    """The toy params' MLflow store, whatever MLFLOW_TRACKING_URI the shell (or an earlier test) has set."""
    import pipeline.config

    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    if hasattr(pipeline.config, "USER_MLFLOW_TRACKING_URI"):
        mp.setattr(pipeline.config, "USER_MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from pipeline import generate, tune

    tmp = tmp_path_factory.mktemp("tune")
    params = _sweep_params(tmp)
    with pytest.MonkeyPatch.context() as mp:
        _hermetic_mlflow(mp)
        generate.main(["--params", str(params)])
        out = tune.main(["--params", str(params)])
        yield tmp, params, out


def test_sweep_table_has_every_trial_with_real_metrics(sweep):
    tmp, _, out = sweep
    trials = _read_csv(tmp / "tune-results/trials.csv")
    assert len(trials) == 4
    assert sorted((r["model.inter_frame_layers"], r["seed"]) for r in trials) == [
        ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for r in trials:
        for key in ("jf", "j", "f", "jf_shuffled"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["jf"]) == pytest.approx((float(r["j"]) + float(r["f"])) / 2, abs=1e-5)
        assert int(r["num_expressions"]) == 4 and int(r["train_steps"]) == 2
        assert float(r["wall_seconds"]) > 0 and float(r["train_loss"]) > 0
        assert (r["eval_device"], r["eval_amp"]) == (_auto_device(), "false")
    params = {r["model.inter_frame_layers"]: int(r["num_parameters"]) for r in trials}
    assert params["1"] > params["0"]  # the inter-frame layer has weights
    variants = _read_csv(tmp / "tune-results/variants.csv")
    assert [v["variant"] for v in variants] == ["inter_frame_layers=0", "inter_frame_layers=1"]
    for v in variants:
        jf = [float(r["jf"]) for r in trials if f"inter_frame_layers={r['model.inter_frame_layers']}" == v["variant"]]
        assert int(v["n"]) == 2
        assert float(v["jf_mean"]) == pytest.approx(np.mean(jf), abs=1e-5)
        assert float(v["jf_std"] or 0) == pytest.approx(np.std(jf, ddof=1), abs=1e-5)
    md = (tmp / "tune-results/results.md").read_text()
    assert "## Per variant" in md and "## Every trial" in md
    assert len([line for line in md.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]) == 6
    summary = json.loads((tmp / "tune-results/summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["num_failed"] == 0
    assert set(summary["variants"]) == {"inter_frame_layers=0", "inter_frame_layers=1"}


def test_sweep_mlflow_parent_and_tagged_children(sweep):
    from mlflow.tracking import MlflowClient

    tmp, _, out = sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "sweep"
    exp = client.get_experiment_by_name("toy-ablations")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 4
    by_id = {r["mlflow_run_id"]: r for r in out["trials"]}
    for child in children:
        row = by_id[child.info.run_id]
        assert child.info.status == "FINISHED"
        assert child.data.tags["variant"] == row["variant"] and child.data.tags["seed"] == str(row["seed"])
        assert child.data.tags["model.inter_frame_layers"] == str(row["model.inter_frame_layers"])
        assert child.data.metrics["ytvos_jf"] == pytest.approx(row["jf"])
        assert child.data.params["model.inter_frame_layers"] == str(row["model.inter_frame_layers"])
        assert "loss" in child.data.metrics  # per-step training loss logged by the Ray Train workers
        # how the trial was evaluated (eval.device auto: the GPU when the trial sees one), in the run and the table
        assert child.data.params["ytvos_eval_device"] == row["eval_device"] == _auto_device()
        assert child.data.params["ytvos_eval_amp"] == "False" and row["eval_amp"] is False
        assert "ytvos_amp" not in child.data.metrics and "ytvos_device" not in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert "tables/results.md" in artifacts and "tables/trials.csv" in artifacts


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    """One trial lost its stored result (as if the sweep died during its evaluation): the rerun trains nothing
    again, re-evaluates that trial from its final checkpoint and reports the others from the store."""
    from pipeline import tune

    tmp, params, out = sweep
    stored = sorted((tmp / "tune/results").glob("*.json"))
    assert len(stored) == 4
    victim = stored[0]
    keep = {p: p.stat().st_mtime_ns for p in stored[1:]}
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp / "tune/train").glob("*/epoch_*.pth")}
    assert len(ckpts) == 4
    victim.unlink()
    again = tune.main(["--params", str(params)])
    assert victim.exists()
    assert {p: p.stat().st_mtime_ns for p in keep} == keep
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts  # no trial was trained again
    assert again["sweep"] == out["sweep"] and again["parent_run_id"] == out["parent_run_id"]
    assert {r["mlflow_run_id"] for r in again["trials"]} == {r["mlflow_run_id"] for r in out["trials"]}
    assert len(_read_csv(tmp / "tune-results/trials.csv")) == 4


def test_a_sweep_over_fewer_seeds_reuses_the_stored_trials_as_its_own_children(sweep):
    """Another sweep (here: seed 0 only) whose trials were trained already trains nothing and gets its own
    parent run with one child per trial, pointing at the run that trained it."""
    from mlflow.tracking import MlflowClient

    from pipeline import tune
    from pipeline.config import load_pipeline_config

    tmp, params, out = sweep
    raw = yaml.safe_load(params.read_text())
    raw["tune"]["seeds"] = [0]
    raw["tune"]["max_concurrent_trials"] = 1  # resources do not make another sweep
    other = tmp / "params_seed0.yaml"
    other.write_text(yaml.safe_dump(raw))
    ckpts = {p: p.stat().st_mtime_ns for p in (tmp / "tune/train").glob("*/epoch_*.pth")}
    again = tune.main(["--params", str(other)])
    assert again["sweep"] != out["sweep"] and again["parent_run_id"] != out["parent_run_id"]
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    children = client.search_runs([client.get_run(again["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{again['parent_run_id']}'")
    first = {r["trial_key"]: r for r in out["trials"]}
    assert len(children) == 2 == len(again["trials"])
    for child in children:
        original = first[child.data.tags["trial_key"]]
        assert child.data.tags["seed"] == "0" and child.data.tags["reused_from"] == original["mlflow_run_id"]
        assert child.data.metrics["ytvos_jf"] == pytest.approx(original["jf"])
        assert child.data.params["ytvos_eval_device"] == original["eval_device"]
    assert {r["mlflow_run_id"] for r in again["trials"]} == {c.info.run_id for c in children}
    raw["tune"]["seeds"], raw["tune"]["max_concurrent_trials"] = [0, 1], 1
    other.write_text(yaml.safe_dump(raw))
    assert tune.sweep_hash(load_pipeline_config(other)) == out["sweep"]


def test_trials_can_be_evaluated_on_another_benchmark(sweep):
    """tune.benchmark: ytvos_proxy evaluates a trial's model on the held-out training videos instead."""
    from pipeline import preprocess, tune
    from pipeline.config import load_pipeline_config
    from pipeline.evaluate_dataset import load_eval_model

    tmp, params, _ = sweep
    cfg = load_pipeline_config(params, overrides={"tune.benchmark": "ytvos_proxy"})
    preprocess.preprocess(cfg, "ytvos", progress=False)
    spec = tune.plan_trials(cfg)[0]
    default_key = tune.plan_trials(load_pipeline_config(params))[0].key
    assert spec.key != default_key  # the benchmark is part of the trial's identity
    stored = json.loads((tmp / "tune/results" / f"{default_key}.json").read_text())
    loaded = load_eval_model(spec.cfg, Path(stored["checkpoint"]))
    model = loaded.model
    metrics, per_video = tune.evaluate_trial(spec.cfg, model, loaded.tokenizer, tmp / "proxy-eval")
    assert per_video is None and 0.0 <= metrics["jf"] <= 1.0
    assert (metrics["device"], metrics["amp"]) == (next(model.parameters()).device.type, False)
    assert metrics["jf"] == pytest.approx((metrics["j"] + metrics["f"]) / 2, abs=1e-6)
    names = tune.metric_names("ytvos_proxy", [{"metrics": metrics}])
    assert {"jf", "j", "f"} <= set(names) and not any(n.startswith("num_") for n in names)
    assert tune.metric_names("ytvos", []) == list(tune.YTVOS_METRICS)
