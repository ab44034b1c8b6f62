"""pipeline.tracking without Ray: run statuses, the worker-side metric logger, evaluations, sweep runs, the logged
pyfunc model; and no other pipeline module importing MLflow."""

import ast
import base64
import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    return f"sqlite:///{tmp}/mlflow.db", tmp / "artifacts"


def _run(store, name):
    from pipeline import tracking

    uri, artifacts = store
    return tracking.create_run(uri, "toy", artifacts, name, params={"a": 1, "long": "x" * 600}, tags={"stage": "t"})


def test_runs_are_running_until_the_block_ends_finished_or_failed(store):
    from pipeline import tracking

    uri = store[0]
    ok, bad, later, foreign = (_run(store, n) for n in ("ok", "bad", "later", "foreign"))
    params = tracking.client(uri).get_run(ok).data.params
    assert params == {"a": "1", "long": "x" * 500}
    with tracking.run_status(uri, ok):
        assert tracking.run_state(uri, ok) == "RUNNING"
    assert tracking.run_state(uri, ok) == "FINISHED"
    with pytest.raises(KeyError), tracking.run_status(uri, bad):
        raise KeyError("boom")
    assert tracking.run_state(uri, bad) == "FAILED"
    with tracking.run_status(uri, later, finish=False):
        pass
    assert tracking.run_state(uri, later) == "RUNNING"  # a later step ends it
    with pytest.raises(KeyError), tracking.run_status(uri, foreign, enabled=False):
        raise KeyError("not ours")
    assert tracking.run_state(uri, foreign) == "RUNNING"  # another stage's run: its owner ends it
    tracking.set_status(uri, bad, "RUNNING")  # a resumed run
    assert tracking.run_state(uri, bad) == "RUNNING"
    with pytest.raises(tracking.RunNotFound, match="deadbeef"):
        tracking.run_tags(uri, "deadbeef")


def test_metric_logger_sends_every_n_steps_and_on_flush(store):
    from pipeline import tracking

    uri = store[0]
    run_id = _run(store, "metrics")
    assert tracking.metric_logger(uri, None, 10) is None
    log_metrics = tracking.metric_logger(uri, run_id, 3)
    client = tracking.client(uri)
    for step in (1, 2):
        log_metrics(step, {"loss": step / 10, "lr/backbone": 1e-5})
    assert client.get_metric_history(run_id, "loss") == []  # buffered
    log_metrics(3, {"loss": 0.3})
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run_id, "lr_backbone")] == [1e-5, 1e-5]
    log_metrics(4, {"epoch_loss": 0.25}, flush=True)
    assert [m.value for m in client.get_metric_history(run_id, "epoch_loss")] == [0.25]


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """One of our checkpoints of a toy model (random weights) with its generated text encoder."""
    from bifit.checkpoint import save_checkpoint
    from bifit.config import ModelConfig, to_dict
    from bifit.models import build_model
    from bifit.synthetic import TinyTextEncoderConfig, write_text_encoder_assets

    tmp = tmp_path_factory.mktemp("toy_model")
    te = write_text_encoder_assets(tmp / "te", ["the red circle moving to the right", "a small blue square"] * 4,
                                   TinyTextEncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, pretrain_steps=1))
    cfg = ModelConfig(backbone="resnet18", text_encoder=str(te), hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                      dim_feedforward=32, num_queries=3, msda_backend="pytorch")
    torch.manual_seed(0)
    path = tmp / "bifit.pth"
    saved = {"model": to_dict(cfg), "data": {"eval_short_side": 48}, "eval": {"threshold": 0.5, "num_frames": None}}
    save_checkpoint(path, build_model(cfg), saved, epoch=0)
    return path


@pytest.fixture(scope="module")
def logged(store, toy_checkpoint):
    """(run id, ModelInfo) of a run that logged the toy checkpoint as a file and as the pyfunc model."""
    from pipeline import tracking

    uri = store[0]
    run_id = _run(store, "model")
    with tracking.active_run(uri, run_id):
        assert tracking.run_state(uri, run_id) == "RUNNING"
        tracking.log_artifact(toy_checkpoint, "model")
        info = tracking.log_bifit_model(toy_checkpoint)
    return run_id, info


def test_logged_model_loads_with_pyfunc_and_predicts_on_its_input_example(store, logged):
    import mlflow

    from pipeline import tracking

    uri = store[0]
    run_id, info = logged
    assert tracking.run_state(uri, run_id) == "FINISHED"  # active_run ended it
    assert tracking.artifact_paths(tracking.client(uri), run_id, "model") == ["model/bifit.pth"]  # the plain file
    for model_uri in (info.model_uri, f"runs:/{run_id}/{tracking.MODEL_NAME}"):
        model = mlflow.pyfunc.load_model(model_uri)
        example = model.input_example
        assert list(example.columns) == ["frames", "expression"]
        assert model.metadata.signature.inputs.input_names() == ["frames", "expression"]
        assert model.metadata.signature.outputs.input_names() == ["score", "masks"]
        out = model.predict(example)
        assert list(out.columns) == ["score", "masks"] and len(out) == 1
        assert 0.0 <= out["score"][0] <= 1.0
        masks = [Image.open(io.BytesIO(base64.b64decode(m))) for m in out["masks"][0]]
        assert len(masks) == len(example["frames"][0]) == 2
        for mask in masks:
            assert mask.mode == "L" and mask.size == (96, 64)  # the frames' own size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_logged_model_refuses_frames_of_different_sizes(logged):
    import mlflow
    import pandas as pd

    from pipeline import tracking

    frames = [tracking.encode_image(np.zeros((64, 96, 3), np.uint8)),
              tracking.encode_image(np.zeros((32, 32, 3), np.uint8))]
    model = mlflow.pyfunc.load_model(logged[1].model_uri)
    with pytest.raises(ValueError, match="one size"):
        model.predict(pd.DataFrame({"frames": [frames], "expression": ["the red circle"]}))


# ---------------------------------------------------------------------------------------------------------------
# one module owns the MLflow calls


def _mlflow_imports(path) -> list[int]:
    """Lines of `path` that import mlflow (import / from-import / importlib.import_module / __import__)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        else:
            continue
        if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_tracking_and_the_model_code_import_mlflow():
    from tests.conftest import REPO

    found = {path.relative_to(REPO).as_posix(): _mlflow_imports(path) for path in (REPO / "pipeline").rglob("*.py")}
    assert found["pipeline/tracking.py"] and found["pipeline/mlflow_model.py"]  # the check sees real imports
    others = {name: lines for name, lines in found.items() if lines
              and name not in ("pipeline/tracking.py", "pipeline/mlflow_model.py")}
    assert others == {}, f"MLflow calls belong in pipeline/tracking.py; imported at {others}"


# ---------------------------------------------------------------------------------------------------------------
# metrics, evaluations, sweeps


def test_metric_names_keep_what_mlflow_accepts():
    from pipeline import tracking

    assert tracking.metric_name("a2d_mAP 0.5:0.95") == "a2d_mAP 0.5_0.95"
    assert tracking.metric_name("a2d_P@0.5") == "a2d_P_0.5"
    assert tracking.metric_name("best_jf_mean") == "best_jf_mean"
    assert tracking.metric_name("lr/backbone-1.x") == "lr/backbone-1.x"


def test_log_evaluation_into_the_training_run_or_a_new_run(store, tmp_path, caplog):
    from pipeline import tracking

    uri, artifacts = store
    c = tracking.client(uri)
    training = _run(store, "train-x")
    table = tmp_path / "davis.json"
    table.write_text("{}\n")
    metrics = {"davis_jf": 0.5, "davis_P@0.5": 0.25, "davis_mAP 0.5:0.95": 0.125, "davis_nan": math.nan,
               "davis_flag": True, "davis_device": "cpu", "davis_n": 3}
    got = tracking.log_evaluation(uri, "toy", artifacts, training, "davis", metrics, {"device": "cpu", "amp": False},
                                  {"checkpoint": "x.pth"}, [table, tmp_path / "missing.csv"])
    assert got == training
    run = c.get_run(training)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"davis_jf": 0.5, "davis_P_0.5": 0.25, "davis_mAP 0.5_0.95": 0.125, "davis_n": 3.0}
    assert run.data.params == {"a": "1", "long": "x" * 500, "davis_eval_device": "cpu", "davis_eval_amp": "False"}
    assert tracking.artifact_paths(c, training, "eval/davis") == ["eval/davis/davis.json"]

    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    new = tracking.log_evaluation(uri, "toy-eval", artifacts, "deadbeef", "a2d", {"a2d_mean_iou": 0.75},
                                  {"device": "cuda", "amp": True}, {"checkpoint": "x.pth", "dataset": "a2d"}, [])
    assert new != "deadbeef"
    assert f"training run deadbeef not in {uri}" in caplog.text and "logging to a new run" in caplog.text
    run = c.get_run(new)
    assert (run.info.run_name, run.info.status) == ("evaluate-a2d", "FINISHED")
    assert run.info.experiment_id == c.get_experiment_by_name("toy-eval").experiment_id
    assert run.data.params == {"checkpoint": "x.pth", "dataset": "a2d", "a2d_eval_device": "cuda",
                               "a2d_eval_amp": "True"}
    assert run.data.metrics == {"a2d_mean_iou": 0.75}
    caplog.clear()
    fresh = tracking.log_evaluation(uri, "toy-eval", artifacts, None, "jhmdb", {}, {"device": "cpu", "amp": False},
                                    {}, [])
    assert fresh not in (new, training) and c.get_run(fresh).info.run_name == "evaluate-jhmdb"
    assert "not in" not in caplog.text  # no recorded training run: no warning


def test_sweep_parent_and_trial_runs(store, tmp_path):
    from pipeline import tracking

    uri, artifacts = store
    c = tracking.client(uri)
    parent = tracking.create_sweep_run(uri, "toy-sweep", artifacts, "abc123", {"grid": '{"a": [0, 1]}'})
    run = c.get_run(parent)
    assert (run.info.run_name, run.info.status) == ("sweep-abc123", "RUNNING")
    assert {k: run.data.tags[k] for k in ("stage", "kind", "sweep")} == {"stage": "tune", "kind": "sweep",
                                                                         "sweep": "abc123"}
    assert run.data.params == {"grid": '{"a": [0, 1]}'}

    child = tracking.create_trial_run(uri, "toy-sweep", artifacts, parent, "abc123", "a=0 seed=1", {"model.a": 0},
                                      {"variant": "a=0", "seed": "1"})
    assert tracking.run_state(uri, child) == "RUNNING"
    assert tracking.is_child_of(uri, child, parent)
    assert not tracking.is_child_of(uri, _run(store, "unrelated"), parent)
    assert not tracking.is_child_of(uri, "deadbeef", parent)  # not in the store
    tracking.log_trial_result(uri, child, {"ytvos_jf": 0.5, "ytvos_device": "cpu", "wall_seconds": 12,
                                           "final_train_loss": math.nan}, "/runs/epoch_0000.pth")
    run = c.get_run(child)
    assert (run.info.run_name, run.info.status) == ("a=0 seed=1", "FINISHED")
    assert run.info.experiment_id == c.get_run(parent).info.experiment_id
    assert run.data.metrics == {"ytvos_jf": 0.5, "wall_seconds": 12.0}
    assert {k: run.data.tags[k] for k in (tracking.PARENT_TAG, "stage", "kind", "sweep", "variant", "seed",
                                          "checkpoint")} == {
        tracking.PARENT_TAG: parent, "stage": "tune", "kind": "trial", "sweep": "abc123", "variant": "a=0",
        "seed": "1", "checkpoint": "/runs/epoch_0000.pth"}
    assert run.data.params == {"model.a": "0"}
    assert [r.info.run_id for r in tracking.child_runs(c, c.get_run(parent))] == [child]

    table = tmp_path / "results.md"
    table.write_text("# sweep\n")
    tracking.finish_sweep_run(uri, parent, [table], {"best_jf_mean": 0.5, "num_failed_trials": 0},
                              {"best_variant": "a=0"}, failed=False)
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["best_variant"] == "a=0"
    assert run.data.metrics == {"best_jf_mean": 0.5, "num_failed_trials": 0.0}
    assert tracking.artifact_paths(c, parent, "tables") == ["tables/results.md"]
    broken = tracking.create_sweep_run(uri, "toy-sweep", artifacts, "def456", {})
    tracking.finish_sweep_run(uri, broken, [], {"num_failed_trials": 2}, {}, failed=True)
    assert tracking.run_state(uri, broken) == "FAILED"
    assert c.get_run(broken).data.metrics == {"num_failed_trials": 2.0}
