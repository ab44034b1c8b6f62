"""Pipeline settings: the library sections of params.yaml plus the orchestration ones (Ray, MLflow,
the synthetic benchmark, paths). Everything is validated before Ray starts (`validate` methods stating their rules
with `bifit.config.check`, as in bifit/config.py). Every path of params.yaml is relative to the repository unless
absolute; `resolve` is the one way to turn it into a Path."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from bifit.config import Config, check, from_dict, load_config, to_dict
from bifit.synthetic.a2d import SyntheticA2DConfig
from bifit.synthetic.config import SyntheticConfig
from bifit.synthetic.davis import SyntheticDavisConfig
from bifit.synthetic.jhmdb import SyntheticJHMDBConfig
from bifit.synthetic.refcoco import SyntheticRefCOCOConfig
from bifit.synthetic.text_encoder import TinyTextEncoderConfig

REPO = Path(__file__).resolve().parents[1]
# the user's MLFLOW_TRACKING_URI, read at import: mlflow.set_tracking_uri() writes that variable itself, so reading
# it later would make every later run of a long-lived process (tests, a sweep) log to the first run's store
USER_MLFLOW_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def resolve(path: str | Path) -> Path:
    """A path from params.yaml: relative to the repository unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def _portable(path: str | None) -> str | None:
    """A path inside the repository as a repository-relative one (so that moving the checkout keeps it); other
    paths and hub ids unchanged."""
    if path is None or not Path(path).is_absolute() or not Path(path).is_relative_to(REPO):
        return path
    return Path(path).relative_to(REPO).as_posix()


@dataclass
class RayConfig:
    address: str | None = None  # null: start a local Ray; RAY_ADDRESS in the environment joins a cluster
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    storage_path: str = "runs/ray"

    def validate(self, where="ray"):
        check(self.num_workers >= 1, f"{where}.num_workers", "an integer >= 1", self.num_workers)
        check(self.cpus_per_worker >= 1, f"{where}.cpus_per_worker", "an integer >= 1", self.cpus_per_worker)
        check(self.max_failures >= 0, f"{where}.max_failures", "an integer >= 0 (restarts after a lost worker)",
              self.max_failures)

    def resolved_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or self.address


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins
    experiment: str = "bifit"
    artifact_location: str = "mlartifacts"
    log_every_steps: int = 10

    def validate(self, where="mlflow"):
        check(self.log_every_steps >= 1, f"{where}.log_every_steps", "an integer >= 1", self.log_every_steps)

    def resolved_uri(self) -> str:
        uri = USER_MLFLOW_TRACKING_URI or self.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(resolve(uri[len("sqlite:///"):]))  # relative to the repository
        return uri


@dataclass
class PathsConfig:
    synthetic_root: str = "data/synthetic"
    text_encoder_dir: str = "data/synthetic/text-encoder"
    runs: str = "runs"
    model: str = "models/bifit.pth"
    pretrained: str = "models/pretrained"  # the pretrain stage's output folder (bifit.pth, or NOT_USED.txt)
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
        check(bool(self.grid), f"{where}.grid", "at least one key with a list of values", self.grid)
        for key, values in {**self.grid, **{k: [v] for k, v in self.trial_overrides.items()}}.items():
            at = f"{where}.{'grid' if key in self.grid else 'trial_overrides'}.{key}"
            section, dot, name = key.partition(".")
            check(bool(dot) and section in SWEEP_SECTIONS and bool(name), at,
                  f"a dotted key of a training section ({', '.join(SWEEP_SECTIONS)}), e.g. model.inter_frame_layers",
                  key)
            check(key != "train.seed", at, f"no such key (the seeds are set by {where}.seeds)", values)
            check(bool(values), at, "a non-empty list of values", values)
            check(len({repr(v) for v in values}) == len(values), at, "distinct values", values)
        both = sorted(set(self.grid) & set(self.trial_overrides))
        check(not both, f"{where}.trial_overrides", f"no key also searched in {where}.grid", both)
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), f"{where}.seeds",
              "a non-empty list of distinct integers", self.seeds)
        video = [e for e in EVALUATIONS if e != "refcoco"]  # trials are scored on a video benchmark
        check(self.benchmark in video, f"{where}.benchmark", f"one of {', '.join(video)}", self.benchmark)
        check(self.eval_max_expressions is None or self.eval_max_expressions >= 1, f"{where}.eval_max_expressions",
              "null or an integer >= 1", self.eval_max_expressions)
        for name in ("max_concurrent_trials", "num_workers", "cpus_per_worker"):
            check(getattr(self, name) >= 1, f"{where}.{name}", "an integer >= 1", getattr(self, name))
        check(self.max_failures >= 0, f"{where}.max_failures", "an integer >= 0", self.max_failures)
        check(bool(self.experiment), f"{where}.experiment", "a non-empty MLflow experiment name", self.experiment)


# --- datasets: the four benchmarks (pipeline/download.py, preprocess.py, evaluate_dataset.py, summary.py) ------
# Each benchmark has `source: synthetic | real`. synthetic: the download stage writes a tiny copy in the official
# on-disk format to `root`, so the real preprocessing, loaders and metrics run on it unchanged. real: the files
# are placed by hand (the download stage prints where) and verified. `checkpoint` is the model evaluated there.
DATASET_NAMES = ("ytvos", "davis", "a2d", "jhmdb", "refcoco")
EVALUATIONS = ("ytvos", "ytvos_proxy", "davis", "a2d", "jhmdb", "refcoco")
IMAGE_DATASETS = ("refcoco", "refcoco+", "refcocog")
DataSource = Literal["synthetic", "real"]


def _check_common(where: str, checkpoint: str, pins: str | None) -> None:
    check(bool(checkpoint), f"{where}.checkpoint", "the path of a checkpoint file", checkpoint)
    check(pins is None or bool(pins), f"{where}.pins", "null or the path of a sha256sum-style file", pins)


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
        check(0 < self.fraction < 1, f"{where}.fraction", "a number in (0, 1)", self.fraction)
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
        check(self.clip_length >= 1, f"{where}.clip_length", "an integer >= 1", self.clip_length)


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
        check(Path(self.root).name == "jhmdb_sentences", f"{where}.root",
              "a folder named 'jhmdb_sentences' (the released metadata paths start with ./jhmdb_sentences/)",
              self.root)


@dataclass
class RefcocoDatasetConfig:
    """RefCOCO/+/g: COCO train2014 images plus the refer release, converted by preprocess@refcoco; the image
    datasets of the pretrain stage and of joint training, evaluated on their val splits."""

    source: DataSource = "synthetic"
    root: str = "data/synthetic-eval/coco"  # real: data/coco (train2014/ and refcoco*/ from the refer release)
    checkpoint: str = "models/bifit.pth"  # the model evaluated on the val splits
    datasets: tuple[str, ...] = IMAGE_DATASETS  # the ones trained on (pretrain, joint) and evaluated
    pins: str | None = None
    synthetic: SyntheticRefCOCOConfig = field(default_factory=SyntheticRefCOCOConfig)

    def validate(self, where="datasets.refcoco"):
        _check_common(where, self.checkpoint, self.pins)
        check(bool(self.datasets) and len(set(self.datasets)) == len(self.datasets)
              and all(d in IMAGE_DATASETS for d in self.datasets), f"{where}.datasets",
              f"a non-empty list of distinct names among {list(IMAGE_DATASETS)}", self.datasets)
        if self.source == "synthetic":
            missing = sorted(set(self.datasets) - set(self.synthetic.datasets))
            check(not missing, f"{where}.datasets", f"names the synthetic copy generates ({where}.synthetic.datasets: "
                  f"{list(self.synthetic.datasets)})", self.datasets)


@dataclass
class DatasetsConfig:
    prepared: str = "data/prepared"  # preprocess outputs, one folder per dataset
    status: str = "data/status"  # download reports, one JSON per dataset
    ytvos: YtvosDatasetConfig = field(default_factory=YtvosDatasetConfig)
    ytvos_proxy: YtvosProxyConfig = field(default_factory=YtvosProxyConfig)
    davis: DavisDatasetConfig = field(default_factory=DavisDatasetConfig)
    a2d: A2DDatasetConfig = field(default_factory=A2DDatasetConfig)
    jhmdb: JHMDBDatasetConfig = field(default_factory=JHMDBDatasetConfig)
    refcoco: RefcocoDatasetConfig = field(default_factory=RefcocoDatasetConfig)

    def validate(self, where="datasets"):
        for name in EVALUATIONS:
            getattr(self, name).validate(f"{where}.{name}")


# --- pretrain: the image-dataset stage of train.recipe: pretrain_finetune (pipeline/train.py --stage pretrain) -----
PRETRAIN_SECTIONS = ("model", "data", "train")
FIXED_BY_RECIPE = ("train.recipe", "train.start_from", "data.root")


@dataclass
class PretrainConfig:
    """The pretrain stage trains on `datasets.refcoco.datasets` with the settings of the training sections, changed
    by `overrides` (dotted keys, e.g. train.epochs: 12; the official pretraining: 1-frame clips, 2 per GPU, 12
    epochs, drops at 8 and 10, the text encoder trained)."""

    overrides: dict[str, GridValue] = field(default_factory=dict)

    def validate(self, where="pretrain"):
        for key in self.overrides:
            section, dot, name = key.partition(".")
            check(bool(dot) and section in PRETRAIN_SECTIONS and bool(name), f"{where}.overrides.{key}",
                  f"a dotted key of {', '.join(PRETRAIN_SECTIONS)} (e.g. train.epochs)", key)
            check(key not in FIXED_BY_RECIPE, f"{where}.overrides.{key}",
                  "no such key here (set by the recipe: the pretrain stage trains on the image datasets from "
                  "random weights)", key)


@dataclass
class PipelineConfig(Config):
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    text_encoder_assets: TinyTextEncoderConfig = field(default_factory=TinyTextEncoderConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def validate(self):
        super().validate()
        image_data = self.train.recipe == "joint"
        check(not (image_data and self.data.dataset != "ytvos"), "data.dataset",
              "'ytvos' with train.recipe joint (joint training mixes Ref-YouTube-VOS with the image datasets)",
              self.data.dataset)
        check(not (image_data and self.data.batch_grouping == "video"), "data.batch_grouping",
              "'none' with train.recipe joint (a batch of one video's expressions needs a video-only training set)",
              self.data.batch_grouping)
        check(not (image_data and self.data.expressions_per_clip > 1), "data.expressions_per_clip",
              "1 with train.recipe joint (an image gives one expression per clip, and clips of one batch need the same "
              "number)", self.data.expressions_per_clip)
        check(not (self.model.msda_backend == "cuda" and not self.ray.use_gpu), "model.msda_backend",
              "'auto', 'cpu' or 'pytorch' while ray.use_gpu is false (the 'cuda' kernels need GPU workers)",
              self.model.msda_backend)
        return self

    # the training stage these settings are for: "train" (as loaded) or "pretrain" (made by for_stage); not a
    # params.yaml key: the stage is the DVC stage that runs
    stage: ClassVar[str] = "train"

    def for_stage(self, stage: str) -> PipelineConfig:
        """The settings of training stage `stage`: "train" as loaded; "pretrain" with `pretrain.overrides` applied
        and no start checkpoint (the pretrain stage trains the image datasets from random weights)."""
        check(stage in ("train", "pretrain"), "--stage", "'train' or 'pretrain'", stage)
        if stage == "train":
            return self
        d = to_dict(self)
        for key, value in self.pretrain.overrides.items():
            section, _, name = key.partition(".")
            check(name in d[section], f"pretrain.overrides.{key}", f"a key of the {section} section", key)
            d[section][name] = value
        d["train"].update(recipe="scratch", start_from=None)
        out = from_dict(PipelineConfig, d, "pretrain.overrides applied")
        out.validate()
        out.stage = "pretrain"
        return out

    def image_datasets(self) -> tuple[str, ...]:
        """The RefCOCO-family datasets this stage trains on (none for a video-only training)."""
        if self.stage == "pretrain" or self.train.recipe == "joint":
            return tuple(self.datasets.refcoco.datasets)
        return ()

    def trains_on_videos(self) -> bool:
        return self.stage == "train"

    def start_checkpoint(self) -> Path | None:
        """The checkpoint this stage starts from (class heads dropped), or None for random weights."""
        if self.stage == "pretrain":
            return None
        if self.train.recipe == "pretrain_finetune":
            return resolve(self.paths.pretrained) / "bifit.pth"
        return None if self.train.start_from is None else resolve(self.train.start_from)

    def resolve_paths(self) -> PipelineConfig:
        """Make the repository-relative paths the workers read absolute (Ray workers run in another working
        directory). The text encoder only when it is a local directory (else a hub id)."""
        if resolve(self.model.text_encoder).exists():
            self.model.text_encoder = str(resolve(self.model.text_encoder))
        if self.model.backbone_weights is not None:
            self.model.backbone_weights = str(resolve(self.model.backbone_weights))
        self.data.root = str(resolve(self.data.root))
        if self.train.start_from is not None and resolve(self.train.start_from).exists():  # else an MLflow run id
            self.train.start_from = str(resolve(self.train.start_from))
        return self

    def training_dict(self) -> dict:
        """The settings that determine a trained model (their hash keys the resumable run folder). Not
        model.msda_backend (kernels computing the same function); paths inside the repository as
        repository-relative ones, so that a moved checkout resumes its runs.

        `source`: a digest of the training code (`TRAINING_SOURCES`), so that a code change starts a new run.
        From `ray`: the world size (num_workers: the global batch and each rank's share of the data), use_gpu (CPU
        and GPU kernels round differently) and, on CPU, cpus_per_worker (every worker runs
        torch.set_num_threads(cpus_per_worker), and CPU reductions split over threads sum in another order).
        Not address, max_failures, storage_path: where and how robustly it runs, not what it trains."""
        d = to_dict(self)
        out = {k: d[k] for k in ("model", "matcher", "loss", "data", "train", "synthetic", "text_encoder_assets")}
        del out["model"]["msda_backend"]
        out["ray"] = {"num_workers": self.ray.num_workers, "use_gpu": self.ray.use_gpu}
        if not self.ray.use_gpu:
            out["ray"]["cpus_per_worker"] = self.ray.cpus_per_worker
        for section, key in (("model", "text_encoder"), ("model", "backbone_weights"), ("data", "root")):
            out[section][key] = _portable(out[section][key])
        proxy = self.datasets.ytvos_proxy
        out["ytvos_proxy_held_out"] = proxy.fraction if proxy.exclude_from_training else 0.0
        if self.trains_on_videos() and self.data.dataset == "a2d":  # the A2D train split, not data.root
            a2d = self.datasets.a2d
            del out["data"]["root"], out["synthetic"], out["ytvos_proxy_held_out"]
            out["a2d"] = {"prepared": _portable(str(resolve(self.datasets.prepared) / "a2d")), "root": _portable(
                str(resolve(a2d.root)))}
            if a2d.source == "synthetic":
                out["a2d"]["synthetic"] = to_dict(a2d.synthetic)
        if not self.trains_on_videos():  # the pretrain stage: its run folders apart from the train stage's
            out["stage"] = self.stage
            for key in ("synthetic", "ytvos_proxy_held_out"):
                del out[key]
            del out["data"]["root"]
        if self.image_datasets():
            refcoco = self.datasets.refcoco
            out["image_datasets"] = {"datasets": list(refcoco.datasets), "root": _portable(str(resolve(refcoco.root)))}
            if refcoco.source == "synthetic":
                out["image_datasets"]["synthetic"] = to_dict(refcoco.synthetic)
        start = self.start_checkpoint()
        if start is not None:  # a new pretrained model starts a new fine-tuning run
            out["start_from"] = {"path": _portable(str(start)), "sha256": file_digest(start)}
        # other code trains another model: after a change DVC reruns the stage, which must not resume the run
        # folder that the old code trained (it would report the old model as the new one's)
        out["source"] = source_digest()
        return out

    def training_hash(self) -> str:
        blob = json.dumps(self.training_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file (None when it does not exist yet), cached per (path, size, mtime)."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# the code that trains a model: the library (models, data, losses, engine), the deformable-attention kernels and the
# training stage; only source suffixes (caches and build outputs are not code)
TRAINING_SOURCES = ("bifit", "ops", "pipeline/train.py", "pipeline/preflight.py")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h")


def source_digest(sources: tuple[str, ...] = TRAINING_SOURCES) -> str:
    """SHA-256 (16 hex digits) over the repository-relative names and contents of the source files under
    `sources` (a folder: its files with a SOURCE_SUFFIXES suffix, recursively; a missing path adds nothing)."""
    h = hashlib.sha256()
    for rel in sources:
        path = REPO / rel
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
        else:
            files = [path] if path.is_file() else []
        for f in files:
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()[:16]


def load_pipeline_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """`path`: the params file (default: the repository's params.yaml)."""
    path = resolve("params.yaml") if path is None else path
    return load_config(path, overrides=overrides, cls=PipelineConfig).resolve_paths()
