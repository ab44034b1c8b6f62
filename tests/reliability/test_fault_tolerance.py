"""Fault injection on the train stage with Ray on CPU (toy size): a Ray Train worker SIGKILLed in the middle of
an epoch, and the stage's driver SIGKILLed and rerun. Every run must end with exactly the losses, metrics and
weights of one uninterrupted run with the same seed (the `reference` fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from pipeline.config import load_pipeline_config
from pipeline.faults import read_events
from tests.conftest import REPO
from tests.reliability.conftest import FAULT_TRAIN, assert_identical, comparable, write_params
from tests.reliability.injection import logged_steps, ray_train_workers, wait_for_step


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint_with_identical_result(tmp_path, toy_data, local_ray,
                                                                                    reference):
    from pipeline.train import run_dir, run_training

    local_ray()
    cfg = load_pipeline_config(write_params(tmp_path, toy_data, train=FAULT_TRAIN, ray=dict(max_failures=1)))
    folder = run_dir(cfg)
    killed = {}

    def kill_one_worker():  # after step 4, the first step of the second epoch, one checkpoint on disk
        wait_for_step(folder / "loss.csv", 4, timeout=300)
        victim = max(ray_train_workers(), key=lambda p: p.pid)
        killed["checkpoints"] = sorted(p.name for p in folder.glob("epoch_*.pth"))
        killed["step"] = max(logged_steps(folder / "loss.csv"))
        os.kill(victim.pid, signal.SIGKILL)
        killed["pid"] = victim.pid

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    out = run_training(cfg)
    killer.join(timeout=5)

    assert killed.get("pid") and not psutil.pid_exists(killed["pid"]), "the worker was not killed"
    assert killed["checkpoints"] and killed["step"] % 3 != 0, f"kill not mid-epoch: {killed}"
    events = [e for e in read_events(folder) if e["event"] in ("start", "resume")]
    assert [e["event"] for e in events] == ["start", "resume"], events
    resume = events[1]
    assert Path(resume["checkpoint"]).name == killed["checkpoints"][-1]  # the last checkpoint, not an older one
    assert resume["epoch"] == int(killed["checkpoints"][-1][6:10]) + 1
    assert_identical(comparable(out), reference)


@pytest.mark.timeout(600)  # a Ray run that hangs fails instead of blocking the suite
def test_driver_sigkill_then_rerun_resumes_with_identical_result(tmp_path, toy_data, local_ray, reference):
    """`python -m pipeline.train` (what `dvc repro` runs) is SIGKILLed mid-epoch; the rerun resumes from the
    newest checkpoint, every checkpoint on disk is whole, and the result equals the uninterrupted run."""
    from bifit.checkpoint import load_checkpoint
    from pipeline.train import run_dir, run_training

    params = write_params(tmp_path, toy_data, train=FAULT_TRAIN)
    folder = run_dir(load_pipeline_config(params))
    with open(tmp_path / "driver.log", "w") as log:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # set by mlflow in this process
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", str(params)], cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(folder / "loss.csv", 4, timeout=300, alive=lambda: driver.poll() is None)
        started_by_driver = psutil.Process(driver.pid).children(recursive=True)  # Ray's processes
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    for proc in started_by_driver:  # what a scheduler does to the killed job's process tree, by process id
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started_by_driver, timeout=30)
    assert driver.returncode == -signal.SIGKILL
    on_disk = sorted(folder.glob("epoch_*.pth"))
    assert on_disk and all(load_checkpoint(p)["epoch"] == int(p.stem[6:]) for p in on_disk)  # none half-written

    local_ray()
    out = run_training(load_pipeline_config(params))  # the rerun

    events = read_events(folder)
    assert [e["event"] for e in events].count("driver_start") == 2
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and Path(resume[0]["checkpoint"]).name == on_disk[-1].name
    assert_identical(comparable(out), reference)
