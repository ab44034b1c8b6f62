"""Reliability figures: faults injected into toy Ray training runs, and the bad-input corpus with the outcome of
each case. Prints both tables and writes them to bench/results/reliability.json.

    python -m bench.reliability            # faults (a few minutes of Ray runs on 2 CPU cores) + bad inputs
    python -m bench.reliability --no-faults  # bad inputs only (seconds)

A fault is "survived" when the run finishes and its losses, metrics and weights equal those of the uninterrupted
run with the same seed (or, for a NaN loss, when it stops with the message naming the step, term and samples).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "reliability.json"


def _identical(a: dict, b: dict) -> bool:
    import torch

    return (a["metrics"] == b["metrics"] and a["loss_csv"] == b["loss_csv"] and a["epoch"] == b["epoch"]
            and a["model"].keys() == b["model"].keys()
            and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()))


def _checkpoints_whole(folder: Path, epochs: int) -> bool:
    from bifit.checkpoint import load_checkpoint

    files = sorted(folder.glob("epoch_*.pth"))
    return len(files) == epochs and all(load_checkpoint(p)["epoch"] == i for i, p in enumerate(files))


def _restarts(folder: Path) -> int:
    from pipeline.faults import read_events

    return sum(e["event"] == "resume" for e in read_events(folder))


def _samples_lost(folder: Path) -> int:
    from bifit.data.ytvos import read_skip_log
    from pipeline.faults import SKIP_LOG_FILE

    return len(read_skip_log(folder / SKIP_LOG_FILE))


# ---------------------------------------------------------------------------------------------------------------
# faults


def run_faults(tmp: Path, bench: Path) -> list[dict]:
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from bifit.engine import NonFiniteLossError
    from pipeline.config import load_pipeline_config
    from pipeline.train import run_dir, run_training
    from tests.reliability.conftest import FAULT_TRAIN, comparable, write_params
    from tests.reliability.injection import ray_train_workers, wait_for_step

    epochs = FAULT_TRAIN["epochs"]
    rows = []

    def row(fault, folder, out, reference, t0, note=""):
        same = out is not None and _identical(comparable(out), reference)
        rows.append({"fault": fault, "survived": out is not None, "identical_to_uninterrupted": same,
                     "restarts": _restarts(folder), "checkpoints_lost": epochs - len(list(folder.glob("epoch_*.pth"))),
                     "checkpoints_whole": _checkpoints_whole(folder, epochs), "samples_lost": _samples_lost(folder),
                     "seconds": round(time.time() - t0, 1), "note": note})

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        reference = comparable(run_training(load_pipeline_config(write_params(tmp / "reference", bench,
                                                                              train=FAULT_TRAIN))))
        # 1. one Ray Train worker SIGKILLed after step 4 (mid second epoch)
        t0 = time.time()
        cfg = load_pipeline_config(write_params(tmp / "worker", bench, train=FAULT_TRAIN, ray={"max_failures": 1}))
        folder = run_dir(cfg)

        def kill():
            wait_for_step(folder / "loss.csv", 4, timeout=600)
            os.kill(max(ray_train_workers(), key=lambda p: p.pid).pid, signal.SIGKILL)

        threading.Thread(target=kill, daemon=True).start()
        row("Ray Train worker SIGKILLed mid-epoch (ray.max_failures: 1)", folder, run_training(cfg), reference, t0)

        # 2. the stage's driver SIGKILLed mid-epoch; the newest run-folder checkpoint then truncated; rerun
        t0 = time.time()
        params = write_params(tmp / "driver", bench, train=FAULT_TRAIN)
        folder = run_dir(load_pipeline_config(params))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", str(params)], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_step(folder / "loss.csv", 4, timeout=600, alive=lambda: driver.poll() is None)
        family = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()
        driver.wait()
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        newest = sorted(folder.glob("epoch_*.pth"))[-1]
        newest.write_bytes(newest.read_bytes()[:-100])
        row("driver SIGKILLed mid-epoch, newest run-folder checkpoint truncated, stage rerun", folder,
            run_training(load_pipeline_config(params)), reference, t0,
            note=f"{newest.name} skipped with a warning; Ray's copy restored")

        # 3. non-finite loss (lr 1e30): stop with the message, no retries
        exploding = {"lr": 1e30, "lr_backbone": 1e30, "lr_text_encoder": 1e30, "lr_text_fusion": 1e30, "epochs": 1,
                     "max_steps_per_epoch": 3}
        t0 = time.time()
        cfg = load_pipeline_config(write_params(tmp / "nan", bench, train=exploding,
                                                ray={"num_workers": 1, "max_failures": 1}))
        try:
            run_training(cfg)
            message = "not stopped"
        except NonFiniteLossError as err:
            message = str(err)
        ok = bool(re.search(r"epoch 0 step \d: non-finite .* on samples \['video", message))
        rows.append({"fault": "loss becomes NaN/inf (train.lr 1e30), default: stop", "survived": ok,
                     "identical_to_uninterrupted": None, "restarts": _restarts(run_dir(cfg)),
                     "checkpoints_lost": 0, "checkpoints_whole": True, "samples_lost": 0,
                     "seconds": round(time.time() - t0, 1), "note": message[:160]})
        t0 = time.time()
        cfg = load_pipeline_config(write_params(tmp / "nanskip", bench, train={**exploding,
                                                                              "skip_nonfinite_batches": True},
                                                ray={"num_workers": 1}))
        out = run_training(cfg)
        rows.append({"fault": "loss becomes NaN/inf, train.skip_nonfinite_batches: true", "survived": True,
                     "identical_to_uninterrupted": None, "restarts": 0, "checkpoints_lost": 0,
                     "checkpoints_whole": True, "samples_lost": 0, "seconds": round(time.time() - t0, 1),
                     "note": f"skipped_nonfinite_batches={out['final']['metrics']['skipped_nonfinite_batches']} "
                             "(logged to MLflow)"})
    finally:
        ray.shutdown()

    # 4. two-node cluster, one worker per node
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_pipeline_config(write_params(tmp / "twonode", bench, train=FAULT_TRAIN))
        row("two-node local cluster, one worker per node (vs single node)", run_dir(cfg), run_training(cfg),
            reference, t0)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    """(exception type or "accepted", first line of its message) of fn(*args, **kwargs)."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every outcome is reported
        return type(err).__name__, str(err).splitlines()[0]
    return "accepted", ""


def run_bad_inputs(tmp: Path, data: Path) -> list[dict]:
    """`data`: the generated toy benchmark folder (ref-youtube-vos/ and the text encoder te/)."""
    import torch
    import yaml

    from bifit.checkpoint import load_checkpoint, load_official, to_official_state_dict
    from bifit.data import YTVOSDataset
    from bifit.data.ytvos import read_skip_log
    from bifit.synthetic import SYNTHETIC_CATEGORIES
    from pipeline.config import load_pipeline_config
    from pipeline.preflight import check_local_resources, check_training_data
    from tests.conftest import tiny_model
    from tests.reliability.bad_inputs import (
        BAD_PARAMS,
        BAD_PARAMS_PREFLIGHT,
        CORRUPT_DATASETS,
        FATAL_DATASETS,
        broken_copy,
        code_running_checkpoint,
    )
    from tests.reliability.conftest import write_params

    rows, bench = [], data / "ref-youtube-vos"
    tmp.mkdir(parents=True, exist_ok=True)

    def dataset(root, **kw):
        return YTVOSDataset(root, "train", 2, categories=SYNTHETIC_CATEGORIES, rng=random.Random(0), **kw)

    def read_all(root, **kw):
        ds = dataset(root, **kw)
        for j in range(len(ds)):
            ds[j]

    clean = len(dataset(bench))
    for i, case in enumerate(CORRUPT_DATASETS + FATAL_DATASETS):
        root, message = broken_copy(bench, tmp / f"data{i}", case)
        kind, text = _outcome(read_all, root)
        log = tmp / f"data{i}.skips.jsonl"
        skip_kind, _ = _outcome(read_all, root, skip_bad_samples=True, skip_log=log)
        recorded = read_skip_log(log)
        rows.append({"group": "dataset", "case": case.name, "outcome": kind, "message": text,
                     "expected_message": bool(re.search(message, text)),
                     "with_skip_bad_samples": (f"{len(recorded)} skip(s) recorded" if skip_kind == "accepted"
                                               else f"{skip_kind} (whole file unreadable)"),
                     "samples_lost_silently": 0 if (recorded or skip_kind != "accepted") else clean})
    for name, sections, message in BAD_PARAMS + BAD_PARAMS_PREFLIGHT:
        path = write_params(tmp / f"params_{len(rows)}", data)
        params = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            params.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(params))

        def check(path=path):
            cfg = load_pipeline_config(path)
            check_local_resources(cfg, local_ray=True)
            check_training_data(cfg)

        kind, text = _outcome(check)
        rows.append({"group": "params", "case": name, "outcome": kind, "message": text,
                     "expected_message": bool(re.search(message, text)), "before_ray": True})
    code_running_checkpoint(tmp / "evil.pth", tmp / "code_ran.txt")
    kind, text = _outcome(lambda: load_checkpoint(tmp / "evil.pth"))
    rows.append({"group": "checkpoint", "case": "pickle that runs code", "outcome": kind, "message": text,
                 "expected_message": "weights_only=True" in text and not (tmp / "code_ran.txt").exists()})
    other = tiny_model(hidden_dim=96, inter_frame_layers=0, bidirectional_vl=False)
    torch.save({"model": to_official_state_dict(other.state_dict())}, tmp / "other.pth")
    kind, text = _outcome(lambda: load_official(tmp / "other.pth", tiny_model()))
    rows.append({"group": "checkpoint", "case": "another architecture's checkpoint", "outcome": kind,
                 "message": text, "expected_message": "does not match the model" in text})
    rows += _archive_and_h5_rows(tmp)
    return rows


def _archive_and_h5_rows(tmp: Path) -> list[dict]:
    """Cases of the other helpers' modules (archive extraction, A2D .h5), when those modules exist."""
    rows = []
    try:
        from bifit.prepare.archive import ExtractLimits, extract
    except ImportError:
        extract = None
    if extract is not None:
        made = iter(range(100))

        def zip_with(name, data=b"x"):
            path = tmp / f"archive{next(made)}.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
            return path

        def tar_link(kind, target):
            path = tmp / f"archive{next(made)}.tar"
            with tarfile.open(path, "w") as tf:
                info = tarfile.TarInfo("link")
                info.type, info.linkname = kind, target
                tf.addfile(info)
            return path

        cases = [("absolute path", zip_with("/etc/evil"), {}), ("'..' component", zip_with("a/../../evil"), {}),
                 ("symlink leaving the target", tar_link(tarfile.SYMTYPE, "../../etc/passwd"), {}),
                 ("hard link leaving the target", tar_link(tarfile.LNKTYPE, "/etc/passwd"), {}),
                 ("size bomb (ratio)", zip_with("bomb.bin", bytes(8 << 20)), {"ratio_min_bytes": 1 << 10})]
        for name, archive, limits in cases:
            target = tmp / f"extract{len(rows)}"
            kind, text = _outcome(extract, archive, target, limits=ExtractLimits(**limits), progress=False)
            written = [p for p in target.rglob("*") if p.is_file() and ".extracted" not in p.parts] \
                if target.exists() else []
            rows.append({"group": "archive", "case": name, "outcome": kind, "message": text,
                         "expected_message": kind == "ArchiveError" and not written})
    try:
        import h5py
        import numpy as np

        from bifit.prepare.a2d import read_h5
    except ImportError:
        read_h5 = None
    if read_h5 is not None:
        path = tmp / "00010.h5"
        with h5py.File(path, "w") as f:
            f["instance"] = np.array([1.0])
        kind, text = _outcome(lambda: read_h5(path, "video v frame 10"))
        rows.append({"group": "h5", "case": ".h5 with missing datasets", "outcome": kind, "message": text,
                     "expected_message": "missing dataset(s)" in text})
    return rows


# ---------------------------------------------------------------------------------------------------------------


def print_tables(faults: list[dict], bad: list[dict]) -> None:
    if faults:
        print("\nFaults injected (toy Ray runs on CPU)")
        print(f"{'fault':<78} {'survived':>8} {'identical':>9} {'restarts':>8} {'ckpt lost':>9} "
              f"{'samples lost':>12} {'s':>6}")
        for r in faults:
            same = "-" if r["identical_to_uninterrupted"] is None else ("yes" if r["identical_to_uninterrupted"]
                                                                          else "NO")
            print(f"{r['fault']:<78} {('yes' if r['survived'] else 'NO'):>8} {same:>9} {r['restarts']:>8} "
                  f"{r['checkpoints_lost']:>9} {r['samples_lost']:>12} {r['seconds']:>6}")
    print("\nBad inputs tried")
    print(f"{'group':<10} {'case':<48} {'outcome':<18} {'as expected':>11}  message / with skip")
    for r in bad:
        extra = f" | skip: {r['with_skip_bad_samples']}" if "with_skip_bad_samples" in r else ""
        print(f"{r['group']:<10} {r['case']:<48} {r['outcome']:<18} {('yes' if r['expected_message'] else 'NO'):>11}"
              f"  {r['message'][:90]}{extra}")
    lost = sum(r.get("samples_lost_silently", 0) for r in bad) + sum(r["checkpoints_lost"] for r in faults)
    print(f"\nsamples or checkpoints lost: {lost}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-faults", action="store_true", help="bad inputs only (no Ray runs)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bifit.data.ytvos").setLevel(logging.ERROR)  # skips are counted in the table instead
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="bfr", dir="/tmp"))  # a private Ray address file
    from pipeline import generate
    from tests.reliability.conftest import write_params

    with tempfile.TemporaryDirectory(prefix="bifit-reliability-") as tmp:
        tmp = Path(tmp)
        generate.main(["--params", str(write_params(tmp / "gen", tmp / "synthetic"))])
        bench = tmp / "synthetic"
        t0 = time.time()
        bad = run_bad_inputs(tmp / "bad", bench)
        faults = [] if args.no_faults else run_faults(tmp / "faults", bench)
        seconds = time.time() - t0
    print_tables(faults, bad)
    result = {"faults": faults, "bad_inputs": bad, "seconds": round(seconds, 1),
              "all_as_expected": all(r["expected_message"] for r in bad) and all(
                  r["survived"] and r["identical_to_uninterrupted"] is not False for r in faults)}
    if not args.no_faults:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten to {RESULTS}")
    return result


if __name__ == "__main__":
    main()
