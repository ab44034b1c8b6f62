"""The train stage's MLflow run as users see it: RUNNING while it trains, FINISHED with the final model logged as a
pyfunc model that loads and predicts, FAILED when the stage fails (a Ray failure here; a worker's error in
test_nonfinite.py), and RUNNING again when a rerun resumes it."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pipeline.config import load_pipeline_config
from tests.reliability.conftest import write_params

ONE_STEP = dict(epochs=1, max_steps_per_epoch=1)


def _run_id(cfg) -> str:
    from pipeline.train import run_dir

    return (run_dir(cfg) / "mlflow_run_id").read_text().strip()


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_run_is_running_while_training_then_finished_with_a_loadable_model(tmp_path, toy_data, fresh_ray,
                                                                           monkeypatch):
    import mlflow
    from ray.train.torch import TorchTrainer

    from pipeline import tracking, train

    fresh_ray()
    params = write_params(tmp_path, toy_data, train=ONE_STEP, ray=dict(num_workers=1))
    cfg = load_pipeline_config(params)
    uri, seen, fit = cfg.mlflow.resolved_uri(), [], TorchTrainer.fit

    def fit_and_look(self):
        seen.append(tracking.run_state(uri, _run_id(cfg)))  # Ray is up, the workers are about to train
        result = fit(self)
        seen.append(tracking.run_state(uri, _run_id(cfg)))  # trained; the model is not logged yet
        return result

    monkeypatch.setattr(TorchTrainer, "fit", fit_and_look)
    train.main(["--params", str(params)])
    run_id = _run_id(cfg)
    assert seen == ["RUNNING", "RUNNING"]
    assert tracking.run_state(uri, run_id) == "FINISHED"
    client = tracking.client(uri)
    assert tracking.artifact_paths(client, run_id, "model") == ["model/bifit.pth"]  # the plain checkpoint too
    assert client.get_run(run_id).data.tags["stage"] == "train"
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{tracking.MODEL_NAME}")
    out = model.predict(model.input_example)
    assert list(out.columns) == ["score", "masks"] and 0.0 <= out["score"][0] <= 1.0
    for mask in out["masks"][0]:
        assert Image.open(io.BytesIO(base64.b64decode(mask))).size == (96, 64)


@pytest.mark.timeout(600)
def test_ray_failure_marks_the_run_failed_and_a_rerun_resumes_it(tmp_path, toy_data, fresh_ray, monkeypatch):
    from ray.train.torch import TorchTrainer

    from pipeline import tracking, train

    fresh_ray()
    params = write_params(tmp_path, toy_data, train=ONE_STEP, ray=dict(num_workers=1))
    cfg = load_pipeline_config(params)
    uri = cfg.mlflow.resolved_uri()

    def lost_cluster(self):
        assert tracking.run_state(uri, _run_id(cfg)) == "RUNNING"
        raise RuntimeError("the Ray cluster went away")

    monkeypatch.setattr(TorchTrainer, "fit", lost_cluster)
    with pytest.raises(RuntimeError, match="went away"):
        train.main(["--params", str(params)])
    run_id = _run_id(cfg)
    assert tracking.run_state(uri, run_id) == "FAILED"
    assert train.start_mlflow_run(cfg, train.run_dir(cfg)) == (run_id, True)  # the rerun's run: the same one
    assert tracking.run_state(uri, run_id) == "RUNNING"
