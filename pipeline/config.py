"""Pipeline settings: the library sections of params.yaml plus the orchestration ones (Ray, MLflow,
the synthetic benchmark, paths). Everything is validated before Ray starts."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bifit.config import Config, ConfigError, load_config, to_dict
from bifit.data.synthetic import SyntheticConfig
from bifit.data.synthetic_a2d import SyntheticA2DConfig
from bifit.data.synthetic_davis import SyntheticDavisConfig
from bifit.data.synthetic_jhmdb import SyntheticJHMDBConfig
from bifit.data.text_encoder_assets import TinyTextEncoderConfig

REPO = Path(__file__).resolve().parents[1]
# the user's MLFLOW_TRACKING_URI, read at import: mlflow.set_tracking_uri() writes that variable itself, so reading
# it later would make every later run of a long-lived process (tests, a sweep) log to the first run's store
USER_MLFLOW_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


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
        uri = USER_MLFLOW_TRACKING_URI or self.tracking_uri
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


# --- tune: the ablation sweep (pipeline/tune.py) -------------------------------------------------------------
SWEEP_SECTIONS = ("model", "matcher", "loss", "data", "train")  # the sections a sweep may change per trial
GridValue = bool | int | float | str | list[int] | list[float] | None


def _default_grid() -> dict:
    return {"model.inter_frame_layers": [0, 1, 2], "model.bidirectional_vl": [False, True]}


@dataclass
class SweepConfig:
    grid: dict[str, list[GridValue]] = field(default_factory=_default_grid)  # dotted key -> values (product)
    seeds: list[int] = field(default_factory=lambda: [1, 2])  # repeats of every variant (train.seed)
    trial_overrides: dict[str, GridValue] = field(default_factory=dict)  # every trial: the training budget
    benchmark: str = "ytvos"  # where every trial is evaluated: one of EVALUATIONS (pipeline/evaluate_dataset.py)
    eval_max_expressions: int | None = None  # ytvos: the first N valid expressions (null: all)
    max_concurrent_trials: int = 2
    num_workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 1  # Tune retries of a failed trial
    experiment: str = "bifit-ablations"  # MLflow experiment of the sweep (parent run + one child per trial)
    storage_path: str = "runs/tune"  # Ray Tune storage, the trials' run folders and the results store
    results_dir: str = "metrics/tune"  # trials.csv, variants.csv, results.md, summary.json

    def validate(self, where="tune"):
        if not self.grid:
            raise ConfigError(f"{where}.grid: expected at least one key with a list of values")
        for key, values in {**self.grid, **{k: [v] for k, v in self.trial_overrides.items()}}.items():
            field_name = "grid" if key in self.grid else "trial_overrides"
            section, dot, name = key.partition(".")
            if not dot or section not in SWEEP_SECTIONS or not name:
                raise ConfigError(f"{where}.{field_name}.{key}: expected a dotted key of a training section "
                                  f"({', '.join(SWEEP_SECTIONS)}), e.g. model.inter_frame_layers")
            if key == "train.seed":
                raise ConfigError(f"{where}.{field_name}.train.seed: the seeds are set by {where}.seeds")
            if not values:
                raise ConfigError(f"{where}.grid.{key}: expected a non-empty list of values")
            if len({repr(v) for v in values}) != len(values):
                raise ConfigError(f"{where}.grid.{key}: expected distinct values, got {values}")
        both = sorted(set(self.grid) & set(self.trial_overrides))
        if both:
            raise ConfigError(f"{where}.trial_overrides: {both} are also searched in {where}.grid")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}.seeds: expected a non-empty list of distinct integers, got {self.seeds}")
        if self.benchmark not in EVALUATIONS:
            raise ConfigError(f"{where}.benchmark: expected one of {', '.join(EVALUATIONS)}, got {self.benchmark!r}")
        if self.eval_max_expressions is not None and self.eval_max_expressions < 1:
            raise ConfigError(f"{where}.eval_max_expressions: expected null or an integer >= 1, "
                              f"got {self.eval_max_expressions}")
        for name in ("max_concurrent_trials", "num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.max_failures < 0:
            raise ConfigError(f"{where}.max_failures: expected an integer >= 0, got {self.max_failures}")
        if not self.experiment:
            raise ConfigError(f"{where}.experiment: expected a non-empty MLflow experiment name")


# --- datasets: the four benchmarks (pipeline/download.py, preprocess.py, evaluate_dataset.py, summary.py) ------
# Each benchmark has `source: synthetic | real`. synthetic: the download stage writes a tiny copy in the official
# on-disk format to `root`, so the real preprocessing, loaders and metrics run on it unchanged. real: the files
# are placed by hand (the download stage prints where) and verified. `checkpoint` is the model evaluated there.
DATASET_NAMES = ("ytvos", "davis", "a2d", "jhmdb")
EVALUATIONS = ("ytvos", "ytvos_proxy", "davis", "a2d", "jhmdb")
DataSource = Literal["synthetic", "real"]


def _check_common(where: str, checkpoint: str, pins: str | None) -> None:
    if not checkpoint:
        raise ConfigError(f"{where}.checkpoint: expected the path of a checkpoint file, got an empty string")
    if pins is not None and not pins:
        raise ConfigError(f"{where}.pins: expected null or the path of a sha256sum-style file, got ''")


@dataclass
class YtvosDatasetConfig:
    """Ref-YouTube-VOS: the training set at `data.root` (synthetic: written by the generate stage)."""

    source: DataSource = "synthetic"
    checkpoint: str = "models/bifit.pth"  # paper: ytvos_r50.pth
    pins: str | None = None  # optional sha256sum-style file: pinned checksums verified by the download stage

    def validate(self, where="datasets.ytvos"):
        _check_common(where, self.checkpoint, self.pins)


@dataclass
class YtvosProxyConfig:
    """Local Ref-YouTube-VOS proxy: held-out training videos scored with J&F (bifit/eval/ytvos_proxy.py)."""

    fraction: float = 0.05  # of the training videos, by a fixed hash rule (3 of 60 here, 174 of 3,471 real)
    exclude_from_training: bool = True  # the train stage drops the held-out videos
    checkpoint: str = "models/bifit.pth"

    def validate(self, where="datasets.ytvos_proxy"):
        if not 0 < self.fraction < 1:
            raise ConfigError(f"{where}.fraction: expected a number in (0, 1), got {self.fraction}")
        _check_common(where, self.checkpoint, None)


@dataclass
class DavisDatasetConfig:
    source: DataSource = "synthetic"
    root: str = "data/synthetic-eval/ref-davis"  # real: data/ref-davis (the three zips, extracted there)
    checkpoint: str = "models/bifit.pth"  # paper: the Ref-YouTube-VOS model ytvos_r50.pth, zero-shot
    clip_length: int = 24  # inference clip length in frames (BIFIT 24, ReferFormer 36)
    pins: str | None = None
    synthetic: SyntheticDavisConfig = field(default_factory=SyntheticDavisConfig)

    def validate(self, where="datasets.davis"):
        _check_common(where, self.checkpoint, self.pins)
        if self.clip_length < 1:
            raise ConfigError(f"{where}.clip_length: expected an integer >= 1, got {self.clip_length}")


@dataclass
class A2DDatasetConfig:
    source: DataSource = "synthetic"
    root: str = "data/synthetic-eval/a2d_sentences"  # real: data/a2d_sentences
    checkpoint: str = "models/bifit.pth"  # paper: an A2D-trained model, a2d_r50.pth
    pins: str | None = None
    synthetic: SyntheticA2DConfig = field(default_factory=SyntheticA2DConfig)

    def validate(self, where="datasets.a2d"):
        _check_common(where, self.checkpoint, self.pins)


@dataclass
class JHMDBDatasetConfig:
    source: DataSource = "synthetic"
    root: str = "data/synthetic-eval/jhmdb_sentences"  # real: data/jhmdb_sentences (the folder name matters)
    checkpoint: str = "models/bifit.pth"  # paper: the A2D model a2d_r50.pth, zero-shot
    pins: str | None = None
    synthetic: SyntheticJHMDBConfig = field(default_factory=SyntheticJHMDBConfig)

    def validate(self, where="datasets.jhmdb"):
        _check_common(where, self.checkpoint, self.pins)
        if Path(self.root).name != "jhmdb_sentences":
            raise ConfigError(f"{where}.root: expected a folder named 'jhmdb_sentences' (the released metadata "
                              f"paths start with ./jhmdb_sentences/), got {self.root!r}")


@dataclass
class DatasetsConfig:
    prepared: str = "data/prepared"  # preprocess outputs, one folder per dataset
    status: str = "data/status"  # download reports, one JSON per dataset
    ytvos: YtvosDatasetConfig = field(default_factory=YtvosDatasetConfig)
    ytvos_proxy: YtvosProxyConfig = field(default_factory=YtvosProxyConfig)
    davis: DavisDatasetConfig = field(default_factory=DavisDatasetConfig)
    a2d: A2DDatasetConfig = field(default_factory=A2DDatasetConfig)
    jhmdb: JHMDBDatasetConfig = field(default_factory=JHMDBDatasetConfig)

    def validate(self, where="datasets"):
        for name in EVALUATIONS:
            getattr(self, name).validate(f"{where}.{name}")

    def resolve(self, path: str) -> Path:
        """A params path, relative to the repository unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else REPO / p


@dataclass
class PipelineConfig(Config):
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    text_encoder_assets: TinyTextEncoderConfig = field(default_factory=TinyTextEncoderConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)

    def validate(self):
        super().validate()
        if self.model.msda_backend == "cuda" and not self.ray.use_gpu:  # combinations that cannot work
            raise ConfigError("model.msda_backend: expected 'auto', 'cpu' or 'pytorch' while ray.use_gpu is false "
                              "(the 'cuda' kernels need GPU workers), got 'cuda'")
        return self

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
        out = {k: d[k] for k in ("model", "matcher", "loss", "data", "train", "synthetic", "text_encoder_assets")}
        proxy = self.datasets.ytvos_proxy
        out["ytvos_proxy_held_out"] = proxy.fraction if proxy.exclude_from_training else 0.0
        return out

    def training_hash(self) -> str:
        blob = json.dumps(self.training_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_pipeline_config(path: str | Path = REPO / "params.yaml", overrides: dict | None = None) -> PipelineConfig:
    return load_config(path, overrides=overrides, cls=PipelineConfig).resolve_paths()
