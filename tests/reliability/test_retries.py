"""Which worker errors Ray Train retries, and what a resumed run keeps.

- An error a retry would raise again (bad data, settings, checkpoint, a non-finite loss, a model file that cannot
  be loaded: `pipeline.faults.is_deterministic`) stops the run at once with its own message; only a lost worker
  process or node is retried from the last checkpoint.
- A rerun that resumes from Ray's copy of the checkpoint (the run folder's newest one unreadable) keeps the loss
  history: the loss CSV, the metrics and the weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from bifit.checkpoint import CheckpointError
from bifit.config import ConfigError
from bifit.data import SampleError
from bifit.data.ytvos import read_json
from bifit.engine import NonFiniteLossError
from pipeline.config import load_pipeline_config
from pipeline.faults import (
    fatal_error,
    is_deterministic,
    is_infrastructure,
    raised_in,
    read_events,
    read_fatal,
    unwrap_worker_error,
    write_fatal,
)
from tests.reliability.bad_inputs import CORRUPT_DATASETS, broken_copy
from tests.reliability.conftest import FAULT_TRAIN, assert_identical, comparable, write_params
from tests.reliability.injection import logged_steps

ONE_WORKER = dict(num_workers=1, max_failures=2)
TRUNCATED_JPEG = next(c for c in CORRUPT_DATASETS if c.name == "truncated JPEG")


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the error is what the test looks at
        return err
    raise AssertionError(f"{fn} raised nothing")


def _sample_error() -> SampleError:
    return SampleError("/data/train/JPEGImages/v1/00001.jpg", "video v1 exp_id 0 obj_id 1 frame 1",
                       "corrupt or unreadable image (truncated)")


# ---------------------------------------------------------------------------------------------------------------
# the classification (pipeline.faults.is_deterministic) and Ray's wrapped errors


class _Raises(Dataset):
    """A dataset whose items raise `fail()`'s error (or the one it returns): read in a DataLoader worker process,
    torch re-raises it in the loading process as a new exception with the original traceback as text."""

    def __init__(self, fail):
        self.fail = fail

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise self.fail()


def _from_dataloader_worker(fail) -> BaseException:
    return _raised(lambda: next(iter(DataLoader(_Raises(fail), num_workers=1))))


@pytest.mark.parametrize("error", [
    _sample_error(),
    ConfigError("params.yaml: train.lr: expected a finite number, got inf"),
    CheckpointError("checkpoint epoch_0001.pth: refused or unreadable"),
    NonFiniteLossError("epoch 0 step 2: non-finite loss term(s) loss_dice=nan on samples ['video v']"),
], ids=lambda e: type(e).__name__)
def test_errors_of_the_data_settings_checkpoints_and_values_are_deterministic(error):
    assert is_deterministic(error) and not is_infrastructure(error)


def test_value_errors_are_deterministic_when_the_data_layer_raised_them(tmp_path):
    (tmp_path / "meta.json").write_text('{"videos": {')
    assert is_deterministic(_raised(read_json, tmp_path / "meta.json"))  # ValueError raised by bifit.data.ytvos
    assert is_deterministic(_raised(read_json, tmp_path / "missing.json"))  # FileNotFoundError, from bifit.data
    assert not is_deterministic(ValueError("some other value"))  # not the data layer's
    assert not is_deterministic(_raised(int, "x"))


def test_model_files_that_cannot_be_loaded_are_deterministic_only_while_the_model_is_built(tmp_path, toy_data,
                                                                                          monkeypatch):
    """The real `_build` of the train stage with a text encoder folder that is not there, then with backbone
    weights that are not there (both also caught by the driver's preflight; a worker can still miss them)."""
    import huggingface_hub.constants

    from pipeline.train import _build

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub look-up of the missing folder

    missing_te = load_pipeline_config(write_params(tmp_path / "te", toy_data,
                                                   model=dict(text_encoder=str(tmp_path / "no-such-te"))))
    missing_weights = load_pipeline_config(write_params(tmp_path / "w", toy_data,
                                                        model=dict(backbone_weights=str(tmp_path / "r18.pth"))))
    for cfg, kind in ((missing_te, (OSError, ValueError)), (missing_weights, FileNotFoundError)):
        err = _raised(_build, cfg)
        assert isinstance(err, kind), repr(err)
        assert raised_in(err, _build) and is_deterministic(err, building_model=raised_in(err, _build))
    assert "r18.pth does not exist" in str(err)
    disk_full = OSError(28, "No space left on device")  # a failed write while training: retried
    assert not is_deterministic(disk_full) and not raised_in(disk_full, _build)


def test_errors_of_dataloader_worker_processes_are_classified_as_the_original(tmp_path):
    """With data.num_workers > 0, a SampleError reaches the training loop as torch's RuntimeError re-raise; it is
    classified, recorded and re-raised on the driver as the SampleError with its own message."""
    wrapped = _from_dataloader_worker(_sample_error)
    assert type(wrapped) is RuntimeError and str(wrapped).startswith("Caught SampleError in DataLoader worker")
    assert is_deterministic(wrapped)
    assert write_fatal(tmp_path, wrapped, rank=1)
    err = fatal_error(read_fatal(tmp_path), tmp_path)
    assert type(err) is SampleError and str(err) == str(_sample_error())
    assert "stopped on Ray Train worker rank 1" in err.__notes__[0]

    (tmp_path / "meta.json").write_text('{"videos": {')
    assert is_deterministic(_from_dataloader_worker(lambda: read_json(tmp_path / "meta.json")))  # bifit.data
    assert not is_deterministic(_from_dataloader_worker(lambda: ValueError("not the data layer")))
    assert not is_deterministic(_from_dataloader_worker(lambda: RuntimeError("Connection closed by peer")))


def _ray_errors() -> list[BaseException]:
    """What Ray Train puts in WorkerGroupError.worker_failures for a worker that died: Ray's death errors, wrapped
    by the health check that found them."""
    from ray.exceptions import ActorDiedError, NodeDiedError, RayActorError, WorkerCrashedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    deaths = [ActorDiedError(), RayActorError(), WorkerCrashedError(), NodeDiedError("node 10.0.0.2 died")]
    return deaths + [WorkerHealthCheckFailedError("Worker health check failed", failure=e) for e in deaths]


def test_worker_and_node_deaths_are_infrastructure_and_retried():
    for error in _ray_errors():
        assert is_infrastructure(error) and not is_deterministic(error), repr(error)
    echo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert not is_infrastructure(echo) and not is_deterministic(echo)  # retried, as before


def test_unwrap_worker_error_on_the_errors_ray_train_raises():
    from ray.train import WorkerGroupError

    def group(failures):  # as the driver receives it: pickled by the controller
        return pickle.loads(pickle.dumps(WorkerGroupError("rank errors", failures)))

    for death in _ray_errors():  # a worker died: Ray's error is the cause, the other rank's echo is not
        assert unwrap_worker_error(group({0: RuntimeError("Connection closed by peer"), 1: death}), "run") is None
    assert unwrap_worker_error(group({}), "run") is None

    found = unwrap_worker_error(group({0: _sample_error()}), "run")
    assert type(found) is SampleError and str(found) == str(_sample_error()) and found.file.endswith("00001.jpg")
    assert found.__notes__[0].startswith("(raised on Ray Train worker rank 0;")

    # rank 1 hit the bad sample; rank 0 only saw its peer go: the deterministic error is the one reported
    found = unwrap_worker_error(group({0: RuntimeError("Connection closed by peer"), 1: _sample_error()}), "run")
    assert type(found) is SampleError and "rank 1" in found.__notes__[0]
    found = unwrap_worker_error(group({0: ValueError("a"), 1: ValueError("b")}), "run")
    assert str(found) == "a" and "rank 0" in found.__notes__[0]


def test_the_first_rank_to_record_its_error_wins_and_the_driver_raises_it(tmp_path):
    assert write_fatal(tmp_path, _sample_error(), rank=1)
    assert not write_fatal(tmp_path, ConfigError("later"), rank=0)
    assert read_fatal(tmp_path)["rank"] == 1 and not list(tmp_path.glob(".fatal_error.json.*"))  # no temp left
    err = fatal_error(read_fatal(tmp_path), tmp_path)
    assert type(err) is SampleError and str(err) == str(_sample_error())
    assert (err.file, err.sample_id, err.reason) == (_sample_error().file, _sample_error().sample_id,
                                                     _sample_error().reason)
    assert pickle.loads(pickle.dumps(err)).file == err.file
    for original in (ConfigError("train.lr: bad"), NonFiniteLossError("epoch 0 step 2"), FileNotFoundError("x.pth"),
                     PermissionError("te/config.json")):
        (tmp_path / "fatal_error.json").unlink()
        write_fatal(tmp_path, original, rank=0)
        err = fatal_error(read_fatal(tmp_path), tmp_path)
        assert type(err) is type(original) and str(err) == str(original)
    (tmp_path / "fatal_error.json").write_text('{"type": "NoSuchError", "message": "m", "rank": 0}')
    assert type(fatal_error(read_fatal(tmp_path), tmp_path)) is RuntimeError


def test_loss_csv_keeps_the_whole_rows_up_to_the_resumed_step(tmp_path):
    from pipeline.train import LOSS_HEADER, truncate_loss_csv

    csv = tmp_path / "loss.csv"
    rows = [f"{s},{(s - 1) // 3},0.{s}00000,0.100000,0.200000\n" for s in range(1, 6)]
    csv.write_text(LOSS_HEADER + "".join(rows) + "1")  # step 6 (or 10, 11, ...) cut short by a kill: "1"
    truncate_loss_csv(csv, 3)
    assert csv.read_text() == LOSS_HEADER + "".join(rows[:3])
    truncate_loss_csv(csv, 0)  # a start without a checkpoint: the header only
    assert csv.read_text() == LOSS_HEADER


# ---------------------------------------------------------------------------------------------------------------
# Ray runs (one Ray Train worker, toy size)


def sigkill_after_step(step: int, marker: Path, wait_for: Path | None = None):
    """A `train_loop_per_worker` whose worker process SIGKILLs itself right after logging `step` to the loss CSV
    (a lost worker), once: the marker file records the kill, and a restarted worker trains normally. With
    `wait_for`, the kill waits (up to 2 minutes) until that file exists. Pickled by value to the Ray Train
    workers, where it patches the real module's step logger."""

    def loop(config):
        import os
        import signal
        import time

        from pipeline import train

        if not marker.exists():
            step_logger = train._step_logger

            def logger_then_kill(w, epoch):
                on_step, close = step_logger(w, epoch)

                def on_step_then_kill(s, values):
                    on_step(s, values)
                    if s == step:
                        deadline = time.time() + 120
                        while wait_for is not None and not wait_for.exists() and time.time() < deadline:
                            time.sleep(0.1)
                        marker.write_text(str(os.getpid()))
                        os.kill(os.getpid(), signal.SIGKILL)

                return on_step_then_kill, close

            train._step_logger = logger_then_kill
        train.train_loop_per_worker(config)

    return loop


@pytest.fixture(scope="module")
def reference_one_worker(tmp_path_factory, toy_data, fresh_ray):
    """The uninterrupted run (FAULT_TRAIN, one Ray Train worker) the faulty runs below are compared with."""
    from pipeline.train import run_training

    fresh_ray()
    params = write_params(tmp_path_factory.mktemp("reference1"), toy_data, train=FAULT_TRAIN, ray=ONE_WORKER)
    return comparable(run_training(load_pipeline_config(params)))


def _truncate_every_video(root: Path) -> None:
    """Every training JPEG cut to a third (bad_inputs.truncated_jpeg on all videos), so the first clip drawn fails."""
    for frame in (root / "train" / "JPEGImages").glob("*/*.jpg"):
        frame.write_bytes(frame.read_bytes()[: len(frame.read_bytes()) // 3])


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
@pytest.mark.parametrize("loader_workers", [0, 1], ids=["in-process loading", "DataLoader worker process"])
def test_a_corrupt_frame_stops_the_run_at_once_with_its_message(loader_workers, tmp_path, toy_data, fresh_ray):
    """Found while loading a clip (after the driver's preflight): not retried although ray.max_failures is 2."""
    from pipeline.train import run_dir, run_training

    fresh_ray()
    root, _ = broken_copy(toy_data / "ref-youtube-vos", tmp_path / "copy", TRUNCATED_JPEG)
    _truncate_every_video(root)
    cfg = load_pipeline_config(write_params(tmp_path / "run", toy_data, train=FAULT_TRAIN, ray=ONE_WORKER,
                                            data=dict(root=str(root), skip_bad_samples=False,
                                                      num_workers=loader_workers)))
    with pytest.raises(SampleError) as err:
        run_training(cfg)
    assert re.match(rf"{re.escape(str(root))}/train/JPEGImages/(\w+)/\d+\.jpg: corrupt or unreadable image "
                    r".*\[video \1 exp_id \d+ obj_id \d+ frame \d+\]", str(err.value)), str(err.value)
    assert "stopped on Ray Train worker rank 0, not retried" in err.value.__notes__[0]
    folder = run_dir(cfg)
    assert read_fatal(folder)["type"] == "SampleError"
    assert [e["event"] for e in read_events(folder)] == ["driver_start", "start"]  # trained once: no restart
    assert logged_steps(folder / "loss.csv") == [] and not list(folder.glob("epoch_*.pth"))


@pytest.mark.timeout(600)
def test_a_lost_worker_is_retried_and_the_run_finishes_as_if_uninterrupted(tmp_path, toy_data, fresh_ray,
                                                                          reference_one_worker, monkeypatch):
    from pipeline import train

    fresh_ray()
    marker = tmp_path / "killed"
    monkeypatch.setattr(train, "train_loop_per_worker", sigkill_after_step(4, marker))
    cfg = load_pipeline_config(write_params(tmp_path, toy_data, train=FAULT_TRAIN, ray=ONE_WORKER))
    out = train.run_training(cfg)

    assert marker.exists()  # the worker was killed once, mid second epoch
    events = [e for e in read_events(train.run_dir(cfg)) if e["event"] != "driver_start"]
    assert [(e["event"], e["epoch"]) for e in events] == [("start", 0), ("resume", 1)], events
    assert read_fatal(train.run_dir(cfg)) is None
    assert_identical(comparable(out), reference_one_worker)


@pytest.mark.timeout(900)
def test_rerun_from_rays_copy_of_a_truncated_checkpoint_keeps_the_loss_history(tmp_path, toy_data, fresh_ray,
                                                                              reference_one_worker, monkeypatch):
    """The stage dies mid second epoch (its worker lost, no retries left); the run folder's newest checkpoint is
    then truncated, so the rerun resumes from Ray's copy of it. The loss CSV keeps steps 1-3, drops the
    interrupted step 4 and appends 4-6 again: losses, metrics and weights equal the uninterrupted run's."""
    from ray.train import WorkerGroupError

    from bifit.checkpoint import load_checkpoint
    from pipeline import train
    from pipeline.config import resolve

    fresh_ray()
    params = write_params(tmp_path, toy_data, train=FAULT_TRAIN, ray=dict(num_workers=1, max_failures=0))
    cfg = load_pipeline_config(params)
    folder = train.run_dir(cfg)
    # Ray Train records a reported checkpoint when its controller next polls the worker: the kill waits for that
    # record (the run's checkpoint manager snapshot), or the rerun would find no copy at Ray's either
    ray_record = resolve(cfg.ray.storage_path) / f"bifit-train-{cfg.training_hash()}" / "checkpoint_manager_snapshot.json"
    with monkeypatch.context() as patch:
        patch.setattr(train, "train_loop_per_worker", sigkill_after_step(4, tmp_path / "killed", wait_for=ray_record))
        with pytest.raises(WorkerGroupError) as failed:
            train.run_training(cfg)
    # a real Ray failure: the dead worker's error is Ray's own, and the stage reports it as it is
    (death,) = failed.value.worker_failures.values()
    assert is_infrastructure(death) and not is_deterministic(death) and unwrap_worker_error(failed.value, folder) is None
    assert logged_steps(folder / "loss.csv") == [1, 2, 3, 4] and ray_record.exists()
    (newest,) = folder.glob("epoch_*.pth")
    assert newest.name == "epoch_0000.pth"
    newest.write_bytes(newest.read_bytes()[:-100])  # e.g. a disk that lost the end of the file

    out = train.run_training(load_pipeline_config(params))  # the rerun (dvc repro)

    resume = [e for e in read_events(folder) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["epoch"] == 1  # from Ray's copy, the run folder's being unreadable
    assert load_checkpoint(newest)["epoch"] == 0  # Ray's copy written back over the truncated file
    assert logged_steps(out["loss_csv"]) == [1, 2, 3, 4, 5, 6]
    assert_identical(comparable(out), reference_one_worker)
