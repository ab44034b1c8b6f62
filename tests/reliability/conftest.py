"""Toy set-up shared by the reliability tests: one generated benchmark per session, params files per run, a
private Ray temp folder (so no other Ray on this machine is joined by accident), and run comparisons."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.pipeline.test_chain import TOY

# what a run's metrics hold besides the losses and step counts: wall-clock figures that differ between runs
TIMING_KEYS = ("train_clips_per_s", "clips_per_s_total", "train_seconds", "wall_seconds_this_run")
# 2 epochs x 3 steps: a kill after step 4 lands in the middle of the second epoch, after the first checkpoint
FAULT_TRAIN = dict(epochs=2, max_steps_per_epoch=3, lr_drop=[1])


def write_params(folder: Path, bench: Path, **sections) -> Path:
    """A toy params.yaml in `folder` (its own runs and Ray storage) reading the benchmark in `bench`; the MLflow
    store next to `bench` is shared by the session's runs (a new SQLite store costs seconds of migrations).
    `sections` update TOY section by section, e.g. train=dict(epochs=3)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = copy.deepcopy(TOY)
    params["mlflow"] = dict(tracking_uri=f"sqlite:///{bench.parent}/mlflow.db",
                            artifact_location=f"{bench.parent}/mlartifacts")
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    text = yaml.safe_dump(params)
    text = text.replace("{te}", str(bench / "te")).replace("{root}", str(bench / "ref-youtube-vos"))
    text = text.replace("{tmp}/synthetic", str(bench)).replace("{tmp}", str(folder))
    path = folder / "params.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_ray_tmpdir():
    """Ray started by these tests (ray.init, Cluster, subprocesses) keeps its sockets, logs and the
    `ray_current_cluster` address file in a private folder; the short path keeps socket names valid."""
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bfr", dir="/tmp")
    yield os.environ["RAY_TMPDIR"]
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)  # Ray's session logs of these tests
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The generated toy benchmark and text encoder (DATA/ref-youtube-vos, DATA/te), made once per session."""
    from pipeline import generate

    tmp = tmp_path_factory.mktemp("toy_data")
    generate.main(["--params", str(write_params(tmp / "gen", tmp / "synthetic"))])
    return tmp / "synthetic"


def comparable(out: dict) -> dict:
    """What must be identical between two runs with the same seed: metrics without timings, every step's losses,
    the final weights."""
    final = out["final"]
    return {
        "metrics": {k: v for k, v in final["metrics"].items() if k not in TIMING_KEYS},
        "loss_csv": Path(out["loss_csv"]).read_text(),
        "model": final["model"],
        "epoch": final["epoch"],
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["loss_csv"] == b["loss_csv"]
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ at {key}"


@pytest.fixture(scope="module")
def one_thread():
    """In-process training uses one intra-op thread, as a Ray worker with ray.cpus_per_worker: 1 does (on a busy
    2-core machine, more threads make the toy steps ten times slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session (2 one-CPU workers + the controller); call it to (re)start it."""
    import ray

    def start():
        if not ray.is_initialized():
            ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)

    start()
    yield start
    ray.shutdown()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, toy_data, local_ray):
    """The uninterrupted run every faulty run is compared with."""
    from pipeline.config import load_pipeline_config
    from pipeline.train import run_training

    local_ray()
    params = write_params(tmp_path_factory.mktemp("reference"), toy_data, train=FAULT_TRAIN)
    return comparable(run_training(load_pipeline_config(params)))


@pytest.fixture(scope="module")
def fresh_ray(local_ray):
    """The session's local Ray restarted for this module: after the fault-injection runs (killed workers, a
    killed driver's rerun) a later worker group was seen waiting forever for its CPU in the same session."""
    import ray

    ray.shutdown()
    local_ray()
    return local_ray


def _gloo_rank(rank: int, world: int, init_file: str, fn, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, out)
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn, tmp_path: Path, world: int = 2) -> dict:
    """Run `fn(rank, out)` in `world` spawned processes joined by a gloo group; returns what they put in `out`
    (`fn` must be a module-level function so that it can be sent to the processes)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gloo_rank, args=(world, str(tmp_path / "init"), fn, out), nprocs=world, join=True)
        return dict(out)
