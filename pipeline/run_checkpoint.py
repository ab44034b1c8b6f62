"""The checkpoint of an MLflow run, for ``bifit.load_model("<run id>")`` and ``python -m bifit.segment --checkpoint
<run id>`` (the library imports this module by name only when given a run id: it never imports MLflow itself).

The store is the caller's `tracking_uri`, else MLFLOW_TRACKING_URI, else params.yaml's ``mlflow.tracking_uri``.
The checkpoint is the run's ``checkpoint`` tag when that file exists here (a sweep's trials), else its
``model/bifit.pth`` artifact (the train stage), downloaded once to ``runs/mlflow-downloads/<run id>/`` (a run's
artifacts do not change). The text encoder to fall back on (used only when the one the checkpoint records is not on
this machine) is the ``text_encoder`` folder of the run's logged ``bifit`` model, when it has one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bifit.checkpoint import CheckpointError
from pipeline import tracking
from pipeline.compare import CompareError, checkpoint_of_run
from pipeline.config import MlflowConfig, load_pipeline_config, resolve

log = logging.getLogger("pipeline.run_checkpoint")
DOWNLOADS = "runs/mlflow-downloads"


def default_tracking_uri() -> str:
    try:
        return load_pipeline_config().mlflow.resolved_uri()
    except (OSError, ValueError):  # no readable params.yaml (an installed copy): MLFLOW_TRACKING_URI or the default
        return MlflowConfig().resolved_uri()


def logged_text_encoder(uri: str, run_id: str, dst: Path) -> Path | None:
    """The run's logged model's text encoder folder (downloaded once), None when the run logged no model."""
    folder = dst / tracking.MODEL_NAME / "artifacts" / "text_encoder"  # where download_artifacts puts it
    if (folder / "config.json").is_file():
        return folder
    try:
        got = tracking.download_logged_model_file(uri, run_id, "artifacts/text_encoder", dst)
    except Exception as err:  # noqa: BLE001 - optional: the checkpoint's own text encoder is used
        log.info("run %s: no logged text encoder (%s)", run_id, err)
        return None
    return got


def checkpoint_of_run_id(run_id: str, tracking_uri: str | None = None) -> tuple[Path, Path | None]:
    """(the run's checkpoint file here, a text encoder folder to fall back on or None)."""
    uri = tracking_uri or default_tracking_uri()
    dst = resolve(DOWNLOADS) / run_id
    cached = dst / "bifit.pth"
    if cached.is_file():
        path = cached
    else:
        try:
            path = checkpoint_of_run(tracking.client(uri), run_id, dst)
        except (CompareError, tracking.RunNotFound) as err:
            raise CheckpointError(f"MLflow run {run_id} (store {uri}): {err}") from None
    return path, logged_text_encoder(uri, run_id, dst)
