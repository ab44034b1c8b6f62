"""Fault injection helpers shared by the reliability tests and bench/reliability.py: wait for a training step to
be logged, find the Ray Train worker processes this process started."""

from __future__ import annotations

import time
from pathlib import Path

import psutil


def logged_steps(loss_csv: Path) -> list[int]:
    try:
        rows = loss_csv.read_text().splitlines()[1:]
    except FileNotFoundError:
        return []
    return [int(r.split(",")[0]) for r in rows if r.split(",")[0].isdigit()]


def wait_for_step(loss_csv: Path, step: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in logged_steps(loss_csv)):
        if time.time() > deadline or not alive():
            raise AssertionError(f"step {step} never reached in {loss_csv}")
        time.sleep(0.05)


def ray_train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes started by this test process (Ray's raylet is our child)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
