"""Reliability figures: faults injected into toy Ray training runs, and the bad-input corpus with the outcome of
each case. Prints both tables and writes them to bench/results/reliability.json.

    python -m bench.reliability            # faults (a few minutes of Ray runs on 2 CPU cores) + bad inputs
    python -m bench.reliability --no-faults  # bad inputs only (seconds)

Every cell is measured. A fault row says whether the fault was really injected (a kill that did not happen, or
came too late, fails the row), what the run did, and `as_expected`: for a lost worker or a killed stage, the run
finishes with losses, the loss history, metrics and weights equal to the uninterrupted run's with the same seed;
for a NaN loss, it stops with the message naming the step and samples, not retried; for corrupt data found by a
worker, it stops with the file named, not retried. A bad-input row runs the train stage itself on the bad
settings (with `ray.init` replaced by a tripwire) and records the outcome and whether Ray was started.
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


def _events(folder: Path) -> list[str]:
    from pipeline.faults import read_events

    return [e["event"] for e in read_events(folder)]


def _exported_finite(path: str) -> bool:
    import torch

    from bifit.checkpoint import safe_load

    state = safe_load(path)["model"]
    return bool(state) and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def run_faults(tmp: Path, bench: Path) -> list[dict]:
    """Each row: the fault, whether it was really injected (`injected`, measured: a fault that did not happen
    fails its row), what the run did (measured) and `as_expected`, computed from those measurements."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from bifit.checkpoint import load_checkpoint
    from bifit.data.ytvos import SampleError
    from bifit.engine import NonFiniteLossError
    from pipeline.config import load_pipeline_config, resolve
    from pipeline.faults import read_events
    from pipeline.train import run_dir, run_training
    from tests.reliability.bad_inputs import CORRUPT_DATASETS, broken_copy
    from tests.reliability.conftest import FAULT_TRAIN, comparable, write_params
    from tests.reliability.injection import logged_steps, ray_train_workers, wait_for_step

    epochs = FAULT_TRAIN["epochs"]
    rows = []

    def row(fault, folder, injected, out, reference, t0, expect_restarts, note=""):
        same = out is not None and _identical(comparable(out), reference)
        restarts = _restarts(folder)
        rows.append({"fault": fault, "injected": injected, "survived": out is not None,
                     "identical_to_uninterrupted": same, "restarts": restarts,
                     "checkpoints_lost": epochs - len(list(folder.glob("epoch_*.pth"))),
                     "checkpoints_whole": _checkpoints_whole(folder, epochs), "samples_lost": _samples_lost(folder),
                     "seconds": round(time.time() - t0, 1), "note": note,
                     "as_expected": injected and out is not None and same and restarts == expect_restarts})

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        reference = comparable(run_training(load_pipeline_config(write_params(tmp / "reference", bench,
                                                                              train=FAULT_TRAIN))))
        # 1. one Ray Train worker SIGKILLed after step 4 (mid second epoch)
        t0 = time.time()
        cfg = load_pipeline_config(write_params(tmp / "worker", bench, train=FAULT_TRAIN, ray={"max_failures": 1}))
        folder = run_dir(cfg)
        killed = {}

        def kill():
            try:
                wait_for_step(folder / "loss.csv", 4, timeout=600)
                victim = max(ray_train_workers(), key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed["pid"] = victim.pid
            except Exception as err:  # noqa: BLE001 - a failed injection is reported in the row
                killed["error"] = repr(err)

        thread = threading.Thread(target=kill, daemon=True)
        thread.start()
        out = run_training(cfg)
        thread.join(timeout=5)
        row("Ray Train worker SIGKILLed mid-epoch (ray.max_failures: 1)", folder, "pid" in killed, out, reference,
            t0, expect_restarts=1, note=f"killed pid {killed['pid']}" if "pid" in killed else
            f"not injected: {killed.get('error', 'the run ended first')}")

        # 2. the stage's driver SIGKILLed mid second epoch, once Ray has recorded the first epoch's checkpoint;
        #    the run folder's newest checkpoint then truncated; rerun
        t0 = time.time()
        params = write_params(tmp / "driver", bench, train=FAULT_TRAIN)
        cfg = load_pipeline_config(params)
        folder = run_dir(cfg)
        ray_record = resolve(cfg.ray.storage_path) / f"bifit-train-{cfg.training_hash()}" / \
            "checkpoint_manager_snapshot.json"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", str(params)], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_step(folder / "loss.csv", 4, timeout=600, alive=lambda: driver.poll() is None)
        deadline = time.time() + 120
        while not ray_record.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.1)
        family = psutil.Process(driver.pid).children(recursive=True)
        driver.kill()
        code = driver.wait()
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        steps_before = logged_steps(folder / "loss.csv")
        files = sorted(folder.glob("epoch_*.pth"))
        injected = code == -signal.SIGKILL and len(files) == 1 and ray_record.exists() and steps_before[-1:] >= [4]
        newest = files[-1] if files else None
        if newest is not None:
            newest.write_bytes(newest.read_bytes()[:-100])
        out = run_training(load_pipeline_config(params))
        resumed = [e for e in read_events(folder) if e["event"] == "resume"]
        from_ray = (newest is not None and bool(resumed) and resumed[-1]["epoch"] == 1
                    and load_checkpoint(newest)["epoch"] == 0)  # the run folder had no readable epoch 0
        row("driver SIGKILLed mid-epoch, newest run-folder checkpoint truncated, stage rerun", folder, injected, out,
            reference, t0, expect_restarts=1,
            note=(f"driver exit {code}; steps logged before the kill {steps_before}; "
                  f"{'resumed from' if from_ray else 'NOT resumed from'} Ray's copy of epoch 0; "
                  f"loss rows after the rerun {logged_steps(out['loss_csv'])}"))
        rows[-1]["as_expected"] = rows[-1]["as_expected"] and from_ray

        # 3. non-finite loss (lr 1e30): stop with the message, no retries, no checkpoint
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
        folder = run_dir(cfg)
        stopped = bool(re.search(r"epoch 0 step \d: non-finite .* on samples \['video", message))
        rows.append({"fault": "loss becomes NaN/inf (train.lr 1e30), default: stop", "injected": message != "not stopped",
                     "survived": False, "stopped_with_message": stopped, "identical_to_uninterrupted": None,
                     "restarts": _restarts(folder), "events": _events(folder),
                     "checkpoints_written": len(list(folder.glob("epoch_*.pth"))), "samples_lost": _samples_lost(folder),
                     "seconds": round(time.time() - t0, 1), "note": message[:160],
                     "as_expected": stopped and _events(folder) == ["driver_start", "start"]})
        # 4. the same with train.skip_nonfinite_batches: finishes, counts the skips, exports finite weights
        t0 = time.time()
        cfg = load_pipeline_config(write_params(tmp / "nanskip", bench, train={**exploding,
                                                                              "skip_nonfinite_batches": True},
                                                ray={"num_workers": 1}))
        try:
            out, message = run_training(cfg), ""
        except NonFiniteLossError as err:  # e.g. every batch skipped: stopped with a message instead
            out, message = None, str(err)
        skipped = out["final"]["metrics"]["skipped_nonfinite_batches"] if out else 0
        finite = out is not None and _exported_finite(out["final"]["path"])
        rows.append({"fault": "loss becomes NaN/inf, train.skip_nonfinite_batches: true", "injected": skipped > 0 or
                     bool(message), "survived": out is not None, "identical_to_uninterrupted": None,
                     "restarts": _restarts(run_dir(cfg)), "skipped_nonfinite_batches": skipped,
                     "exported_weights_finite": finite, "samples_lost": _samples_lost(run_dir(cfg)),
                     "seconds": round(time.time() - t0, 1),
                     "note": message[:160] or f"skipped_nonfinite_batches={skipped}, exported weights finite: {finite}",
                     "as_expected": (out is not None and skipped > 0 and finite) or
                                    (out is None and "the model has diverged" in message)})

        # 5. a corrupt frame found by a worker (every training JPEG truncated): not retried although max_failures 2
        t0 = time.time()
        case = next(c for c in CORRUPT_DATASETS if c.name == "truncated JPEG")
        root, _ = broken_copy(bench / "ref-youtube-vos", tmp / "corrupt", case)
        for frame in (root / "train" / "JPEGImages").glob("*/*.jpg"):
            frame.write_bytes(frame.read_bytes()[: len(frame.read_bytes()) // 3])
        cfg = load_pipeline_config(write_params(tmp / "corrupt-run", bench, train=FAULT_TRAIN,
                                                ray={"num_workers": 1, "max_failures": 2},
                                                data={"root": str(root), "skip_bad_samples": False}))
        try:
            run_training(cfg)
            message = "not stopped"
        except SampleError as err:
            message = str(err)
        folder = run_dir(cfg)
        rows.append({"fault": "corrupt frames found by a worker (ray.max_failures: 2)", "injected": True,
                     "survived": False, "stopped_with_message": "corrupt or unreadable image" in message,
                     "identical_to_uninterrupted": None, "restarts": _restarts(folder), "events": _events(folder),
                     "seconds": round(time.time() - t0, 1), "note": message[:160],
                     "as_expected": "corrupt or unreadable image" in message
                                    and _events(folder) == ["driver_start", "start"]})
    finally:
        ray.shutdown()

    # 6. two-node cluster, one worker per node
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        cfg = load_pipeline_config(write_params(tmp / "twonode", bench, train=FAULT_TRAIN))
        row("two-node local cluster, one worker per node (vs single node)", run_dir(cfg), nodes == 2,
            run_training(cfg), reference, t0, expect_restarts=0, note=f"{nodes} live nodes")
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
    import huggingface_hub.constants
    import ray

    from pipeline import train

    class RayStarted(Exception):  # noqa: N818 - a signal, not an error
        pass

    def refuse_ray(*args, **kwargs):
        raise RayStarted("the train stage started Ray")

    offline, real_init = huggingface_hub.constants.HF_HUB_OFFLINE, ray.init
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # a mistyped hub id is answered from the cache, not the network
    ray.init = refuse_ray  # the train stage itself runs: the row says whether it stopped before starting Ray
    try:
        for name, sections, message in BAD_PARAMS + BAD_PARAMS_PREFLIGHT:
            path = write_params(tmp / f"params_{len(rows)}", data)
            params = yaml.safe_load(path.read_text())
            for section, values in sections.items():
                params.setdefault(section, {}).update(values)
            path.write_text(yaml.safe_dump(params))
            kind, text = _outcome(train.main, ["--params", str(path)])
            rows.append({"group": "params", "case": name, "outcome": kind, "message": text,
                         "expected_message": bool(re.search(message, text)), "before_ray": kind != "RayStarted"})
        path = write_params(tmp / f"params_{len(rows)}", data)  # YAML keeps the last of two equal keys silently
        path.write_text(path.read_text() + "train:\n  epochs: 7\n")
        kind, text = _outcome(train.main, ["--params", str(path)])
        rows.append({"group": "params", "case": "a section written twice", "outcome": kind, "message": text,
                     "expected_message": "key 'train' written twice" in text, "before_ray": kind != "RayStarted"})
    finally:
        ray.init, huggingface_hub.constants.HF_HUB_OFFLINE = real_init, offline
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

        def tar_link(kind, target, members=None):
            path = tmp / f"archive{next(made)}.tar"
            with tarfile.open(path, "w") as tf:
                for name, link in members or [("link", target)]:
                    info = tarfile.TarInfo(name)
                    info.type, info.linkname = kind, link
                    tf.addfile(info)
            return path

        cases = [("absolute path", zip_with("/etc/evil"), {}), ("'..' component", zip_with("a/../../evil"), {}),
                 ("symlink leaving the target", tar_link(tarfile.SYMTYPE, "../../etc/passwd"), {}),
                 ("hard link leaving the target", tar_link(tarfile.LNKTYPE, "/etc/passwd"), {}),
                 ("chain of symlinks leaving the target (a/l -> .., m -> a/l/..)",
                  tar_link(tarfile.SYMTYPE, None, [("a/l", ".."), ("m", "a/l/..")]), {}),
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
        print(f"{'fault':<70} {'injected':>8} {'survived':>8} {'identical':>9} {'restarts':>8} {'ckpt lost':>9} "
              f"{'as expected':>11} {'s':>6}")
        for r in faults:
            same = "-" if r["identical_to_uninterrupted"] is None else ("yes" if r["identical_to_uninterrupted"]
                                                                          else "NO")
            print(f"{r['fault']:<70} {('yes' if r['injected'] else 'NO'):>8} {('yes' if r['survived'] else 'no'):>8} "
                  f"{same:>9} {r['restarts']:>8} {r.get('checkpoints_lost', '-'):>9} "
                  f"{('yes' if r['as_expected'] else 'NO'):>11} {r['seconds']:>6}")
            if r.get("note"):
                print(f"    {r['note'][:150]}")
    print("\nBad inputs tried")
    print(f"{'group':<10} {'case':<48} {'outcome':<18} {'as expected':>11}  message / with skip")
    for r in bad:
        extra = f" | skip: {r['with_skip_bad_samples']}" if "with_skip_bad_samples" in r else ""
        ok = r["expected_message"] and r.get("before_ray", True)
        print(f"{r['group']:<10} {r['case']:<48} {r['outcome']:<18} {('yes' if ok else 'NO'):>11}"
              f"  {r['message'][:90]}{extra}")
    lost = sum(r.get("samples_lost_silently", 0) for r in bad) + sum(r.get("checkpoints_lost", 0) for r in faults)
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
              "all_as_expected": all(r["expected_message"] and r.get("before_ray", True) for r in bad)
              and all(r["as_expected"] for r in faults)}
    if not args.no_faults:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten to {RESULTS}")
    return result


if __name__ == "__main__":
    main()
