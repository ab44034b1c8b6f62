"""Every MLflow call of the pipeline stages, in one place (the library `bifit` never imports MLflow).

Runs. A stage makes its run with :func:`create_run`; the run is RUNNING from then on, and any process logs to it by
id (:func:`metric_logger` on the Ray Train workers). :func:`run_status` ends it: FINISHED when its block completes,
FAILED when the block raises (any exception: a Ray failure, a worker's error, an interrupt). A resumed run is
marked RUNNING again (:func:`set_status`). :func:`active_run` makes a run the process's active run for the calls
that need one (the model logging), ending it the same way.

The model. :func:`log_bifit_model` logs a checkpoint as an MLflow pyfunc model (:class:`BifitSegmenter`, named
``bifit``; MLflow 3 keeps it as a logged model of the run, ``runs:/<run id>/bifit`` or ``models:/<model id>``):

- input: a DataFrame, one row per (video, expression): ``frames`` (list of strings: the video's frames in order,
  each a base64-encoded JPEG or PNG file, all of one size) and ``expression`` (string: the referring text);
- output: a DataFrame, one row per input row: ``score`` (double: the chosen query's mean referring score, the
  model's confidence that the expression is in the video; the mean over windows when the saved ``eval.num_frames``
  splits the video) and ``masks`` (list of strings: one base64-encoded PNG per frame, 0/255 "L" at the frame's own
  size, the chosen query's mask thresholded at the saved ``eval.threshold``: what the Ref-YouTube-VOS evaluation,
  ``bifit.eval.ytvos``, writes).

Frames are resized to the saved ``data.eval_short_side`` and segmented in float32 on the GPU when torch sees one,
else on the CPU. The checkpoint is read with ``torch.load(weights_only=True)`` (:func:`bifit.load_model`). The
model folder holds the checkpoint and the text encoder (its tokenizer, configuration and weights, as the
checkpoint has them: the architecture is built from it, then the checkpoint's weights are loaded strictly), so it
loads on a machine without the training's text-encoder folder or the hub; the `bifit` project must be installed
there: the model's code is pipeline/mlflow_model.py (MLflow's "models from code": no pickled Python object), which
makes :class:`BifitSegmenter` the model.

Evaluations. :func:`log_evaluation` logs an evaluation stage's metrics, settings and files into the training run its
checkpoint records (a new run ``evaluate-<name>`` when the store does not have it).

Sweeps. A sweep (pipeline.tune) has a parent run (:func:`create_sweep_run`, ended by :func:`finish_sweep_run`) and
one child run per trial (:func:`create_trial_run`, ended by :func:`log_trial_result`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import re
import tempfile
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger("pipeline.tracking")
MODEL_NAME = "bifit"  # the logged model's name
PARENT_TAG = "mlflow.parentRunId"  # MLflow's parent-run tag (a sweep's trials)
PARAM_CHARS = 500  # MLflow's limit on a param value
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # the logged model's code (MLflow's models from code)


class RunNotFound(LookupError):
    """A run id the tracking store does not know; the message says which store and why."""


# ---------------------------------------------------------------------------------------------------------------
# store, experiments, runs


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, artifact_location: Path | str) -> str:
    """The id of experiment `name`, created with its artifacts in `artifact_location` when it does not exist."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=Path(artifact_location).absolute().as_uri())


def create_run(uri: str, experiment: str, artifact_location: Path | str, run_name: str, params: dict,
               tags: dict) -> str:
    """A new run of `experiment`, RUNNING until :func:`run_status` or :func:`set_status` ends it; `params` values
    are logged as text (cut at MLflow's 500 characters), `tags` beside MLflow's own (user, source, git commit)."""
    from mlflow.tracking.context.registry import resolve_tags

    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment, artifact_location), run_name=run_name,
                       tags=resolve_tags({k: str(v) for k, v in tags.items()}))
    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()])
    return run.info.run_id


def run_tags(uri: str, run_id: str) -> dict:
    try:
        return client(uri).get_run(run_id).data.tags
    except MlflowException as err:
        raise RunNotFound(f"MLflow run {run_id!r}: not found at {uri} ({err.message})") from None


def run_state(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    return client(uri).get_run(run_id).info.status


def set_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING (a resumed run), or an end: FINISHED, FAILED or KILLED (with the end time)."""
    if status == "RUNNING":
        client(uri).update_run(run_id, status="RUNNING")
    else:
        client(uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def run_status(uri: str, run_id: str, finish: bool = True, enabled: bool = True):
    """The run ends FAILED when the block raises (any exception), FINISHED when it completes and `finish` (false:
    a later step ends it). `enabled` false: the status is someone else's (the block only runs)."""
    try:
        yield
    except BaseException:
        if enabled:
            set_status(uri, run_id, "FAILED")
        raise
    if enabled and finish:
        set_status(uri, run_id, "FINISHED")


@contextlib.contextmanager
def active_run(uri: str, run_id: str):
    """`run_id` as this process's active run (RUNNING), for the calls below that log to the active run; on leaving
    the block the run ends FINISHED, or FAILED when the block raises."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_artifact(path: Path | str, folder: str) -> None:
    """A file into the active run's artifacts, under `folder`."""
    mlflow.log_artifact(str(path), artifact_path=folder)


def metric_logger(uri: str, run_id: str | None, every_steps: int):
    """`log_metrics(step, values, flush=False)` into run `run_id` (None: no logging, returns None), for the training
    workers: values are buffered and sent every `every_steps` steps, at 200 values, or on `flush`; "/" in a name
    becomes "_"."""
    if run_id is None:
        return None
    c = client(uri)
    buffer: list = []

    def log_metrics(step: int, values: dict, flush: bool = False):
        ts = int(time.time() * 1000)
        buffer.extend(Metric(k.replace("/", "_"), float(v), ts, step) for k, v in values.items())
        if flush or len(buffer) >= 200 or step % every_steps == 0:
            c.log_batch(run_id, metrics=buffer[:])
            buffer.clear()

    return log_metrics


# ---------------------------------------------------------------------------------------------------------------
# metrics and evaluation settings


def metric_name(name: str) -> str:
    """`name` with each character MLflow refuses in a metric name as "_" ("mAP 0.5:0.95" -> "mAP 0.5_0.95")."""
    return re.sub(r"[^A-Za-z0-9_.\- /]", "_", name)


def _metrics(values: dict, step: int = 0) -> list[Metric]:
    """The finite numbers of `values` (bools and text left out) as MLflow metrics at `step`, named by
    :func:`metric_name`."""
    ts = int(time.time() * 1000)
    named = {metric_name(k): float(v) for k, v in values.items()
             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    return [Metric(k, v, ts, step) for k, v in named.items()]


def log_metrics(uri: str, run_id: str, values: dict) -> None:
    """The finite numbers of `values` as metrics of run `run_id` at step 0 (:func:`metric_name` names)."""
    client(uri).log_batch(run_id, metrics=_metrics(values))


def log_eval_settings(uri: str, run_id: str, name: str, settings: dict) -> None:
    """How evaluation `name` was computed (`settings`: device, amp) as params `<name>_eval_<key>` of run `run_id`.
    MLflow params cannot change: a rerun computed another way records its values as tags of the same names
    instead, with a warning."""
    c = client(uri)
    values = {f"{name}_eval_{k}": str(v) for k, v in settings.items()}
    try:
        c.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    except MlflowException as err:
        log.warning("run %s already records other evaluation settings (%s); this evaluation's are tags: %s",
                    run_id, err, values)
        for k, v in values.items():
            c.set_tag(run_id, k, v)


# ---------------------------------------------------------------------------------------------------------------
# evaluations (pipeline.evaluate_dataset)


def log_evaluation(uri: str, experiment: str, artifact_location: Path | str, run_id: str | None, name: str,
                   metrics: dict, settings: dict, params: dict, artifacts: list[Path]) -> str:
    """Evaluation `name` into run `run_id` (the training run its checkpoint records) when the store has it, else
    (with a warning when `run_id` is not None) into a new run `evaluate-<name>` of `experiment` with `params`: the
    finite numbers of `metrics`, `settings` (:func:`log_eval_settings`) and the files of `artifacts` that exist,
    under `eval/<name>`. The run ends FINISHED (FAILED when logging raises). Returns its id."""
    mlflow.set_tracking_uri(uri)
    run = None
    if run_id:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException as err:
            log.warning("training run %s not in %s (%s); logging to a new run", run_id, uri, err)
    if run is None:
        run = mlflow.start_run(run_id=create_run(uri, experiment, artifact_location, f"evaluate-{name}", params,
                                                 tags={}))
    with run:
        log_metrics(uri, run.info.run_id, metrics)
        log_eval_settings(uri, run.info.run_id, name, settings)
        for path in artifacts:
            if Path(path).is_file():
                log_artifact(path, f"eval/{name}")
        return run.info.run_id


# ---------------------------------------------------------------------------------------------------------------
# sweeps (pipeline.tune): a parent run per sweep, a child run per trial


def create_sweep_run(uri: str, experiment: str, artifact_location: Path | str, sweep: str, params: dict) -> str:
    """The parent run `sweep-<sweep>` of a sweep (tags `stage` tune, `kind` sweep, `sweep`), RUNNING until
    :func:`finish_sweep_run`; a resumed sweep marks it RUNNING again (:func:`set_status`)."""
    return create_run(uri, experiment, artifact_location, f"sweep-{sweep}", params,
                      tags={"stage": "tune", "sweep": sweep, "kind": "sweep"})


def create_trial_run(uri: str, experiment: str, artifact_location: Path | str, parent_run_id: str, sweep: str,
                     run_name: str, params: dict, tags: dict) -> str:
    """A trial's run, a child of the sweep's run `parent_run_id` (tags `stage` tune, `kind` trial, `sweep` and
    `tags`), RUNNING until :func:`log_trial_result` (or :func:`run_status` on a failure) ends it."""
    return create_run(uri, experiment, artifact_location, run_name, params,
                      tags={PARENT_TAG: parent_run_id, "stage": "tune", "kind": "trial", "sweep": sweep, **tags})


def is_child_of(uri: str, run_id: str, parent_run_id: str) -> bool:
    """Whether the store has run `run_id` and it is a child of run `parent_run_id`."""
    try:
        return run_tags(uri, run_id).get(PARENT_TAG) == parent_run_id
    except RunNotFound:
        return False


def log_trial_result(uri: str, run_id: str, metrics: dict, checkpoint: str) -> None:
    """A finished trial: the finite numbers of `metrics`, its final checkpoint as tag `checkpoint`; the run ends
    FINISHED."""
    log_metrics(uri, run_id, metrics)
    client(uri).set_tag(run_id, "checkpoint", checkpoint)
    set_status(uri, run_id, "FINISHED")


def finish_sweep_run(uri: str, run_id: str, tables: list[Path], metrics: dict, tags: dict, failed: bool) -> None:
    """The sweep's `tables` (files) under `tables/`, its `metrics` and `tags`; the run ends FAILED when a trial
    `failed`, else FINISHED."""
    c = client(uri)
    for path in tables:
        c.log_artifact(run_id, str(path), artifact_path="tables")
    log_metrics(uri, run_id, metrics)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))
    set_status(uri, run_id, "FAILED" if failed else "FINISHED")


# ---------------------------------------------------------------------------------------------------------------
# queries (pipeline.compare)


def get_run(c: MlflowClient, run_id: str):
    try:
        return c.get_run(run_id)
    except MlflowException as err:
        raise RunNotFound(f"not found at {c.tracking_uri} ({err.message})") from None


def find_experiment(c: MlflowClient, name: str) -> str | None:
    """The id of experiment `name`, None when the store has none of that name."""
    exp = c.get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def search_runs(c: MlflowClient, experiment: str, tags: dict | None = None, newest_first: bool = False,
                max_results: int = 1000) -> list:
    """Runs of experiment id `experiment` with these exact tag values."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items())
    order = ["attributes.start_time DESC"] if newest_first else None
    return c.search_runs([experiment], where, order_by=order, max_results=max_results)


def child_runs(c: MlflowClient, parent) -> list:
    """The runs whose parent is run `parent` (a sweep's trials)."""
    return search_runs(c, parent.info.experiment_id, {PARENT_TAG: parent.info.run_id})


def artifact_paths(c: MlflowClient, run_id: str, folder: str) -> list[str]:
    return [a.path for a in c.list_artifacts(run_id, folder)]


def download_artifact(c: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(c.download_artifacts(run_id, path, str(dst)))


def download_logged_model_file(uri: str, run_id: str, path: str, dst: Path) -> Path:
    """`path` inside the run's logged model (`runs:/<run id>/bifit/<path>`), downloaded to `dst`; raises
    MlflowException (or OSError) when the run logged no such model or file."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{MODEL_NAME}/{path}",
                                                    dst_path=str(dst), tracking_uri=uri))


# ---------------------------------------------------------------------------------------------------------------
# the model as an MLflow pyfunc model


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(Array("string"), "frames"), ColSpec("string", "expression")]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec(Array("string"), "masks")]))


def encode_image(array) -> str:
    """uint8 [H, W] or [H, W, 3] -> a base64-encoded PNG file (the model's frame and mask format)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, mode: str = "RGB"):
    """A base64-encoded image file -> PIL image in `mode`."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return img.convert(mode)


def input_example():
    """A synthetic two-frame 64x96 clip (a red disk moving right on grey) and one expression: the input format."""
    import numpy as np

    yy, xx = np.mgrid[:64, :96]
    frames = []
    for cx in (30, 40):
        frame = np.full((64, 96, 3), 90, np.uint8)
        frame[(yy - 32) ** 2 + (xx - cx) ** 2 <= 12 ** 2] = (220, 40, 40)
        frames.append(encode_image(frame))
    return pd.DataFrame({"frames": [frames], "expression": ["the red circle moving to the right"]})


def _load(checkpoint: str, text_encoder: str | None = None, device=None):
    """(model in eval mode on `device` (None: the GPU when torch sees one), tokenizer, the saved pipeline
    configuration) of one of our checkpoints; its text encoder read from `text_encoder` (None: the one the
    checkpoint records)."""
    from bifit import load_model

    loaded = load_model(checkpoint, overrides={"text_encoder": text_encoder} if text_encoder else None, device=device)
    return loaded.model, loaded.tokenizer, loaded.checkpoint.get("config", {})


class BifitSegmenter(mlflow.pyfunc.PythonModel):
    """Referring video object segmentation as an MLflow pyfunc model (module docstring: input and output)."""

    def load_context(self, context):
        self.model, self.tokenizer, saved = _load(context.artifacts["checkpoint"], context.artifacts["text_encoder"])
        self.threshold = float(saved.get("eval", {}).get("threshold", 0.5))
        self.window = saved.get("eval", {}).get("num_frames") or None
        self.short_side = int(saved.get("data", {}).get("eval_short_side", 360))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import numpy as np

        from bifit.data import make_video_eval_transform
        from bifit.inference import predict_video

        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        out = []
        for i, row in enumerate(rows):
            frames = [decode_image(f) for f in row["frames"]]
            if not frames or any(f.size != frames[0].size for f in frames):
                raise ValueError(f"row {i}: 'frames' must hold one or more images of one size, got sizes "
                                 f"{[f.size for f in frames]}")
            w, h = frames[0].size
            clip, _ = make_video_eval_transform(self.short_side)(frames, {})
            [pred] = predict_video(self.model, self.tokenizer, clip, [str(row["expression"])], (h, w), self.window,
                                   self.threshold, batch=1)
            out.append({"score": float(np.mean(pred.scores)),
                        "masks": [encode_image(m.numpy().astype(np.uint8) * 255) for m in pred.masks]})
        return pd.DataFrame(out, columns=["score", "masks"])


def _requirements() -> list[str]:
    import numpy
    import pandas
    import PIL
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"numpy=={numpy.__version__}",
            f"pandas=={pandas.__version__}", f"pillow=={PIL.__version__}"]


def log_bifit_model(checkpoint: Path | str, text_encoder: str | None = None):
    """Log `checkpoint` (one of ours) as the pyfunc model `bifit` of the active run (:func:`active_run`), with its
    text encoder (read from `text_encoder`, None: the one the checkpoint records), signature and input example;
    returns MLflow's ModelInfo (`.model_uri`). MLflow loads the logged model and predicts on the example once."""
    model, tokenizer, _ = _load(str(checkpoint), text_encoder, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "text_encoder"
        tokenizer.save_pretrained(folder)
        model.text_encoder.save_pretrained(folder)  # the architecture; the checkpoint's weights are loaded over it
        del model
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint), "text_encoder": str(folder)},
            signature=_signature(), input_example=input_example(), pip_requirements=_requirements())
