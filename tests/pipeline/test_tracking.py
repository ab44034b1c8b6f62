"""pipeline.tracking without Ray: run statuses, the worker-side metric logger, the logged pyfunc model."""

import base64
import io

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
