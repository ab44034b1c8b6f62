"""Pipeline settings: the library sections of params.yaml plus the orchestration ones (Ray, MLflow,
the synthetic benchmark, paths). Everything is validated before Ray starts."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bifit.config import Config, ConfigError, load_config, to_dict
from bifit.data.synthetic import SyntheticConfig
from bifit.data.text_encoder_assets import TinyTextEncoderConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RayConfig:
    address: str | None = None  # null: start a local Ray; RAY_ADDRESS in the environment joins a cluster
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    storage_path: str = "runs/ray"

    def validate(self, where="ray"):
        if self.num_workers < 1:
            raise ConfigError(f"{where}.num_workers: expected an integer >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"{where}.cpus_per_worker: expected an integer >= 1, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: expected -1 (unlimited) or >= 0, got {self.max_failures}")

    def resolved_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or self.address


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "bifit"
    artifact_location: str = "mlartifacts"
    log_every_steps: int = 10

    def validate(self, where="mlflow"):
        if self.log_every_steps < 1:
            raise ConfigError(f"{where}.log_every_steps: expected an integer >= 1, got {self.log_every_steps}")

    def resolved_uri(self) -> str:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(REPO / uri[len("sqlite:///"):])  # relative to the repository
        return uri


@dataclass
class PathsConfig:
    synthetic_root: str = "data/synthetic"
    text_encoder_dir: str = "data/synthetic/text-encoder"
    runs: str = "runs"
    model: str = "models/bifit.pth"
    metrics: str = "metrics"
    plots: str = "plots"
    predictions: str = "outputs/ytvos_valid"
    submission: str = "outputs/submission_ytvos.zip"


@dataclass
class PipelineConfig(Config):
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    text_encoder_assets: TinyTextEncoderConfig = field(default_factory=TinyTextEncoderConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def path(self, name: str) -> Path:
        p = Path(getattr(self.paths, name))
        return p if p.is_absolute() else REPO / p

    def resolve_paths(self) -> PipelineConfig:
        """Make repository-relative paths absolute (Ray workers run in another working directory)."""
        def absolute(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str(REPO / p)

        if (REPO / self.model.text_encoder).exists():
            self.model.text_encoder = absolute(self.model.text_encoder)
        self.model.backbone_weights = absolute(self.model.backbone_weights)
        self.data.root = absolute(self.data.root)
        return self

    def training_dict(self) -> dict:
        """The settings that determine a trained model (their hash keys the resumable run folder)."""
        d = to_dict(self)
        return {k: d[k] for k in ("model", "matcher", "loss", "data", "train", "synthetic", "text_encoder_assets")}

    def training_hash(self) -> str:
        blob = json.dumps(self.training_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_pipeline_config(path: str | Path = REPO / "params.yaml", overrides: dict | None = None) -> PipelineConfig:
    return load_config(path, overrides=overrides, cls=PipelineConfig).resolve_paths()
