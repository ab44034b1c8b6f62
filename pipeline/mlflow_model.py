"""The code of the logged MLflow model (MLflow's "models from code", see pipeline/tracking.py): MLflow runs this file
when it loads the model, and the object given to `set_model` is the model."""

from mlflow.models import set_model

from pipeline.tracking import BifitSegmenter

set_model(BifitSegmenter())
