"""Fault records of a training run folder (`runs/train/<config hash>/`), shared by the driver and the workers.

- `events.jsonl`: one line per driver start and per worker-group start or resume (Ray restarts included), so a
  run's history of faults survived can be read back (`read_events`).
- `fatal_error.json`: written by rank 0 when training stopped for a reason a retry cannot fix (a non-finite
  loss replays identically from the same checkpoint). A worker group restarted by Ray Train finds it and ends at
  once instead of repeating the failure `ray.max_failures` times; the driver then raises the recorded error.
- `unwrap_worker_error`: the error a worker raised, out of Ray's `WorkerGroupError`, so the stage ends with the
  message that names the file, the step or the key instead of a wrapped traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"
FATAL_FILE = "fatal_error.json"
SKIP_LOG_FILE = "skipped_samples.jsonl"


def append_event(folder: str | Path, event: str, **fields) -> None:
    """Append `{"time", "event", **fields}` as one line (a single short write: safe from several processes)."""
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str) + "\n"
    with open(Path(folder) / EVENTS_FILE, "a") as fh:
        fh.write(line)


def read_events(folder: str | Path) -> list[dict]:
    path = Path(folder) / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_fatal(folder: str | Path, error: BaseException, rank: int) -> None:
    """Record an error that must stop the run (atomic: a temporary file, fsync, rename)."""
    record = {"type": type(error).__name__, "message": str(error), "rank": rank, "time": round(time.time(), 3)}
    fd, tmp = tempfile.mkstemp(prefix=f".{FATAL_FILE}.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, Path(folder) / FATAL_FILE)


def read_fatal(folder: str | Path) -> dict | None:
    path = Path(folder) / FATAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def clear_fatal(folder: str | Path) -> None:
    """A new run of the stage starts clean: the marker only stops Ray's retries within one run."""
    (Path(folder) / FATAL_FILE).unlink(missing_ok=True)


def fatal_error(record: dict, folder: str | Path) -> Exception:
    """The driver-side exception for a fatal record (NonFiniteLossError for a non-finite loss)."""
    from bifit.engine import NonFiniteLossError

    cls = NonFiniteLossError if record.get("type") == "NonFiniteLossError" else RuntimeError
    err = cls(record["message"])
    err.add_note(f"(stopped on Ray Train worker rank {record.get('rank')}; checkpoints up to the last finished "
                 f"epoch are kept in {folder})")
    return err


def unwrap_worker_error(error: BaseException, folder: str | Path) -> BaseException | None:
    """The lowest-rank exception raised by the training code itself inside a Ray `WorkerGroupError`, with a note
    naming the rank. None when a failure is Ray's own (a worker process that died): the other ranks' errors are
    then only its echo (a closed gloo connection), and Ray's error, which names the dead worker, is the cause."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures or any(type(exc).__module__.startswith("ray.") for exc in failures.values()):
        return None
    rank = min(failures)
    exc = failures[rank]
    exc.add_note(f"(raised on Ray Train worker rank {rank}; checkpoints up to the last finished epoch are kept in "
                 f"{folder}, and a rerun resumes from them)")
    return exc
