"""Fault records of a training run folder (`runs/train/<config hash>/`), shared by the driver and the workers.

- `events.jsonl`: one line per driver start and per worker-group start or resume (Ray restarts included), so a
  run's history of faults survived can be read back (`read_events`).
- `is_deterministic`: which worker errors a retry would repeat (bad data, settings, checkpoints, a non-finite
  loss, a model file that cannot be loaded) and which are infrastructure failures worth Ray Train's retries.
- `fatal_error.json`: written by the first rank that stopped for a deterministic reason. A worker group restarted
  by Ray Train finds it and ends at once instead of repeating the failure `ray.max_failures` times; the driver
  then raises the recorded error (`fatal_error`).
- `unwrap_worker_error`: the error a worker raised, out of Ray's `WorkerGroupError`, so the stage ends with the
  message that names the file, the step or the key instead of a wrapped traceback.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import tempfile
import time
from pathlib import Path

from bifit.checkpoint import CheckpointError
from bifit.config import ConfigError
from bifit.data.ytvos import SampleError
from bifit.engine import NonFiniteLossError

EVENTS_FILE = "events.jsonl"
FATAL_FILE = "fatal_error.json"
SKIP_LOG_FILE = "skipped_samples.jsonl"

# Worker errors that a restart from the last checkpoint raises again (see is_deterministic): the inputs they come
# from (data files, settings, checkpoint files, seeded values) are the same on every retry.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    SampleError,  # a sample that cannot be loaded (truncated image, PNG of the wrong size, ...)
    ConfigError,  # a bad setting, named by its key
    CheckpointError,  # a checkpoint that cannot be loaded into the model
    NonFiniteLossError,  # a NaN/inf loss, output, gradient or weight: seeded, so it replays identically
)
DATA_LAYER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)  # raised by bifit.data code
MODEL_SOURCE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)  # raised while building the model
DATA_PACKAGE = "bifit.data"
# torch re-raises a DataLoader worker process's error in the loading process with the original traceback as text
_DATALOADER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback[^\n]*\n(.*)",
                               re.S)


def is_deterministic(error: BaseException, building_model: bool = False) -> bool:
    """Whether `error`, raised by the training code on a Ray Train worker, would be raised again by a retry, so
    the run must stop at once with its message instead of being replayed `ray.max_failures` times.

    Ray Train restarts the worker group from the last checkpoint after any worker error. That only helps when
    the cause lies outside the run's inputs: a worker process lost or a node gone, which Ray reports with its own
    errors (ActorDiedError, RayActorError, WorkerCrashedError, a SIGKILLed worker; see `is_infrastructure`). A
    restart replays the same data, settings, checkpoint files and seeds, so these errors come back every time:

    - `DETERMINISTIC_ERRORS`: SampleError (data), ConfigError (settings), CheckpointError, NonFiniteLossError;
    - `DATA_LAYER_ERRORS` (ValueError, FileNotFoundError) raised by the data layer (`bifit.data`): metadata that
      cannot be read, a dataset with no usable sample, clips that cannot be batched;
    - with `building_model` (the error was raised while the tokenizer and model were built),
      `MODEL_SOURCE_ERRORS`: a text encoder or backbone weights file that cannot be loaded (OSError,
      FileNotFoundError), or one that does not fit the model (ValueError). The driver's preflight checks these
      files, but a worker can still miss one (a file removed since, a cluster node without it).

    An error a DataLoader worker process raised counts as that original error. Everything else (a gloo error that
    echoes a lost peer, CUDA out of memory, a failed write) is retried as before."""
    wrapped = _dataloader_original(error)
    if wrapped is not None:
        name, traceback_text, _ = wrapped
        return (name in {c.__name__ for c in DETERMINISTIC_ERRORS}
                or (name in {c.__name__ for c in DATA_LAYER_ERRORS}
                    and f"/{DATA_PACKAGE.replace('.', '/')}/" in traceback_text))
    if isinstance(error, DETERMINISTIC_ERRORS):
        return True
    if isinstance(error, DATA_LAYER_ERRORS) and raised_in_module(error, DATA_PACKAGE):
        return True
    return building_model and isinstance(error, MODEL_SOURCE_ERRORS)


def is_infrastructure(error: BaseException) -> bool:
    """Ray's own error for a worker that died (ActorDiedError, RayActorError, WorkerCrashedError, NodeDiedError, Ray
    Train's WorkerHealthCheckFailedError wrapping one): the failures Ray Train's retries are for. Not a user error
    Ray wrapped (RayTaskError)."""
    from ray.exceptions import RayTaskError

    return type(error).__module__.split(".")[0] == "ray" and not isinstance(error, RayTaskError)


def _frames(error: BaseException):
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def raised_in(error: BaseException, function) -> bool:
    """Whether `function` is on `error`'s traceback (it raised the error or called the code that did)."""
    return any(frame.f_code is function.__code__ for frame in _frames(error))


def raised_in_module(error: BaseException, package: str) -> bool:
    """Whether code of `package` (or a module inside it) is on `error`'s traceback."""
    names = (frame.f_globals.get("__name__") or "" for frame in _frames(error))
    return any(name == package or name.startswith(package + ".") for name in names)


def _dataloader_original(error: BaseException) -> tuple[str, str, str] | None:
    """(class name, traceback text, message) of the error a DataLoader worker process raised, from the exception
    torch raises in its place ("Caught SampleError in DataLoader worker process 0. Original Traceback ..."); None
    for any other error."""
    match = _DATALOADER_ERROR.match(str(error))
    if match is None:
        return None
    name, text = match.groups()
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, re.M))  # the last is the raised error
    message = text[lines[-1].end():].strip() if lines else str(error)
    return name, text, message


def append_event(folder: str | Path, event: str, **fields) -> None:
    """Append `{"time", "event", **fields}` as one line (a single short write: safe from several processes)."""
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str) + "\n"
    with open(Path(folder) / EVENTS_FILE, "a") as fh:
        fh.write(line)


def read_events(folder: str | Path) -> list[dict]:
    path = Path(folder) / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_fatal(folder: str | Path, error: BaseException, rank: int) -> bool:
    """Record an error that must stop the run: its type, message, notes and plain fields (SampleError's file,
    sample id and reason), and the rank. Atomic and first-wins: the record is written to a temporary file, fsynced
    and hard-linked to `fatal_error.json`, which fails if another rank recorded its error first. Returns whether
    this record is the one kept."""
    wrapped = _dataloader_original(error)
    if wrapped is not None:  # the DataLoader worker's error, not torch's re-raise of it
        record = {"type": wrapped[0], "message": wrapped[2], "fields": {}, "notes": []}
    else:
        fields = {k: v for k, v in vars(error).items()
                  if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
        record = {"type": type(error).__name__, "message": str(error), "fields": fields,
                  "notes": list(getattr(error, "__notes__", []))}
    record.update(rank=rank, time=round(time.time(), 3))
    target = Path(folder) / FATAL_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{FATAL_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: still whole, first-wins short of a race
            if target.exists():
                return False
            os.replace(tmp, target)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_fatal(folder: str | Path) -> dict | None:
    path = Path(folder) / FATAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def clear_fatal(folder: str | Path) -> None:
    """A new run of the stage starts clean: the marker only stops Ray's retries within one run."""
    (Path(folder) / FATAL_FILE).unlink(missing_ok=True)


def _error_class(name: str) -> type[BaseException]:
    known = {c.__name__: c for c in (*DETERMINISTIC_ERRORS, *DATA_LAYER_ERRORS, *MODEL_SOURCE_ERRORS)}
    cls = known.get(name) or getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError


def fatal_error(record: dict, folder: str | Path) -> Exception:
    """The driver-side exception for a fatal record: the recorded type (SampleError, ConfigError, OSError, ...;
    RuntimeError for an unknown one) with the worker's message, fields and notes, and a note naming the rank."""
    cls = _error_class(record.get("type", ""))
    try:
        err = cls(record["message"])
    except TypeError:  # a constructor with other arguments (SampleError): the message, then the recorded fields
        err = cls.__new__(cls)
        err.args = (record["message"],)
    vars(err).update(record.get("fields") or {})
    err.add_note(f"(stopped on Ray Train worker rank {record.get('rank')}, not retried: a restart from the last "
                 f"checkpoint would raise it again; checkpoints up to the last finished epoch are kept in {folder})")
    for note in record.get("notes") or []:
        err.add_note(note)
    return err


def unwrap_worker_error(error: BaseException, folder: str | Path) -> BaseException | None:
    """The exception raised by the training code itself inside a Ray `WorkerGroupError` (a deterministic one,
    `is_deterministic`, first, then the lowest rank's), with a note naming the rank. None when a failure is Ray's
    own (a worker process that died, `is_infrastructure`): the other ranks' errors are then only its echo (a
    closed gloo connection), and Ray's error, which names the dead worker, is the cause."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures or any(is_infrastructure(exc) for exc in failures.values()):
        return None
    rank = min(failures, key=lambda r: (not is_deterministic(failures[r]), r))
    exc = failures[rank]
    exc.add_note(f"(raised on Ray Train worker rank {rank}; checkpoints up to the last finished epoch are kept in "
                 f"{folder}, and a rerun resumes from them)")
    return exc
