"""A local web page to segment a video: ``python -m bifit.app [--checkpoint CKPT]``, then open the address it prints.

Upload a video (or pick the bundled generated example), type one or more sentences (one a line) and press
*Segment*: the page shows each sentence's overlay video and its per-frame score plot, and offers the masks as a zip.
The server is the standard library's (``http.server``) and the page is three files in ``bifit/app_static/`` (no
CDN, no framework: it works offline). It listens on 127.0.0.1 unless ``--host`` says otherwise.

Requests (JSON unless said):

    GET  /                         the page (app_static/index.html; /static/<file> for its script and style)
    GET  /api/info                 {"checkpoint", "untrained", "examples": [{"name", "sentences"}], "max_upload_mb"}
    POST /api/upload?name=F        the raw file as the body (streamed to disk, at most --max-upload-mb) -> {"upload"}
    POST /api/segment              {"upload": id | "example": name, "texts": [...], "every": n} -> {"job"}
                                   (the input is probed first: a bad video or an empty sentence is a 400 at once)
    GET  /api/jobs/<job>           {"state": queued|running|done|failed, "done", "total", "error", "expressions":
                                   [{"text", "video", "frames", "scores", "mean_score"}], "masks_zip"}
    GET  /files/<job>/<path>       a job's outputs (the overlay .webm videos, masks.zip), with Range support

Jobs run one at a time on one worker thread (one model in memory), writing with :func:`bifit.segment.
write_segmentation` (the command line's code) into a temporary folder removed when the server stops.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from bifit.segment import SegmentConfig, SegmentError, checked_texts, write_segmentation
from bifit.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoInputError, open_video

STATIC = Path(__file__).with_name("app_static")
DEFAULT_CHECKPOINT = "models/bifit.pth"  # what `make demo` trains
VIDEO_FORMAT = "webm"  # VP9: played by every browser, Chromium builds without H.264 included
CHUNK = 1 << 20
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css",
                 ".webm": "video/webm", ".mp4": "video/mp4", ".zip": "application/zip", ".json": "application/json",
                 ".png": "image/png"}


@dataclass
class Job:
    id: str
    source: object  # a probed VideoSource
    texts: list[str]
    every: int
    folder: Path
    state: str = "queued"
    done: int = 0
    total: int | None = None
    error: str = ""
    summary: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        out = {"job": self.id, "state": self.state, "done": self.done, "total": self.total, "error": self.error}
        if self.state == "done":
            out["expressions"] = []
            for e in self.summary["expressions"]:
                record = json.loads((self.folder / "out" / e["folder"] / "result.json").read_text())
                out["expressions"].append({
                    "text": e["text"], "mean_score": e["mean_score"],
                    "video": f"/files/{self.id}/out/{e['folder']}/overlay.{VIDEO_FORMAT}",
                    "frames": [f["name"] for f in record["frames"]], "scores": [f["score"] for f in record["frames"]]})
            out["masks_zip"] = f"/files/{self.id}/masks.zip"
        return out


class DemoApp:
    """The model, the bundled example, the uploads and the jobs of one server."""

    def __init__(self, loaded, checkpoint: str, config: SegmentConfig | None = None, max_upload_mb: int = 500,
                 examples: bool = True):
        self.loaded, self.checkpoint = loaded, checkpoint
        self.config = (config or SegmentConfig()).validate()
        self.max_upload = max_upload_mb << 20
        self.work = Path(tempfile.mkdtemp(prefix="bifit-app-"))
        self.uploads: dict[str, Path] = {}
        self.jobs: dict[str, Job] = {}
        self.examples: dict[str, tuple[Path, list[str]]] = {}
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="bifit-app-worker", daemon=True)
        self.worker.start()
        if examples:
            from bifit.example_clip import write_example

            written = write_example(self.work / "example")
            self.examples["generated shapes (24 frames)"] = (written["clip"], written["sentences"])

    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "untrained": bool(self.loaded.checkpoint.get("untrained")),
                "examples": [{"name": n, "sentences": s} for n, (_, s) in self.examples.items()],
                "max_upload_mb": self.max_upload >> 20, "window": self.config.window}

    def save_upload(self, name: str, body, length: int) -> str:
        suffix = Path(name).suffix.lower()
        if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            raise SegmentError(f"upload {name!r}: expected a video ({', '.join(VIDEO_SUFFIXES)}) or an image "
                               f"({', '.join(IMAGE_SUFFIXES)})")
        if length <= 0:
            raise SegmentError(f"upload {name!r}: the file is empty")
        if length > self.max_upload:
            raise SegmentError(f"upload {name!r}: {length >> 20} MB, more than the {self.max_upload >> 20} MB "
                               "this server accepts (--max-upload-mb)")
        upload_id = uuid.uuid4().hex
        path = self.work / "uploads" / f"{upload_id}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        left = length
        with path.open("wb") as fh:
            while left:
                chunk = body.read(min(CHUNK, left))
                if not chunk:
                    path.unlink()
                    raise SegmentError(f"upload {name!r}: the connection ended after {length - left} of {length} "
                                       "bytes")
                fh.write(chunk)
                left -= len(chunk)
        self.uploads[upload_id] = path
        return upload_id

    def submit(self, request: dict) -> Job:
        texts = checked_texts([t for t in request.get("texts", []) if isinstance(t, str) and t.strip()])
        if request.get("example") is not None:
            if request["example"] not in self.examples:
                raise SegmentError(f"example {request['example']!r}: unknown; expected one of {list(self.examples)}")
            path = self.examples[request["example"]][0]
        elif request.get("upload") in self.uploads:
            path = self.uploads[request["upload"]]
        else:
            raise SegmentError("expected an uploaded video ('upload') or an example ('example')")
        every = request.get("every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise SegmentError(f"every: expected an integer >= 1, got {every!r}")
        source = open_video(path)
        job_id = uuid.uuid4().hex
        job = Job(job_id, source, texts, every, self.work / "jobs" / job_id)
        job.total = None if source.num_frames is None else -(-source.num_frames // every)
        self.jobs[job.id] = job
        self.queue.put(job)
        return job

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            job.state = "running"
            try:
                config = replace(self.config, every=job.every)
                job.summary = write_segmentation(
                    self.loaded, job.source, job.texts, job.folder / "out", config, VIDEO_FORMAT,
                    on_window=lambda done, job=job: setattr(job, "done", done), checkpoint=self.checkpoint)
                write_masks_zip(job.folder / "out", job.summary, job.folder / "masks.zip")
                job.total = job.done
                job.state = "done"
            except Exception as err:  # noqa: BLE001 - reported to the page
                job.error, job.state = f"{type(err).__name__}: {err}", "failed"

    def job_file(self, job_id: str, relative: str) -> Path | None:
        """A file inside the job's folder (None for anything else, '..' included)."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        root = job.folder.resolve()
        path = (root / relative).resolve()
        return path if path.is_file() and path.is_relative_to(root) else None

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=60)
        shutil.rmtree(self.work, ignore_errors=True)


def write_masks_zip(out: Path, summary: dict, path: Path) -> Path:
    """``<NN_sentence>/masks/<frame>.png`` and ``<NN_sentence>/result.json`` of every sentence, in one zip."""
    tmp = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for e in summary["expressions"]:
            folder = out / e["folder"]
            zf.write(folder / "result.json", f"{e['folder']}/result.json")
            for png in sorted((folder / "masks").iterdir()):
                zf.write(png, f"{e['folder']}/masks/{png.name}")
    tmp.replace(path)
    return path


class Handler(BaseHTTPRequestHandler):
    app: DemoApp  # set on the subclass made by make_server
    server_version = "bifit-app"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # quiet: the page polls

    # -- responses
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _file(self, path: Path) -> None:
        size = path.stat().st_size
        ctype = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        start, end, status = 0, size - 1, 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].split(",")[0].partition("-")
            try:
                start, end = (int(first), int(last) if last else size - 1) if first else (size - int(last), size - 1)
            except ValueError:
                start, end = 0, size - 1
            if not 0 <= start <= end < size:
                self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        headers = {"Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if path.suffix == ".zip":
            headers["Content-Disposition"] = 'attachment; filename="masks.zip"'
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(end - start + 1))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    # -- routes
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802
        url = urlparse(self.path)
        route = unquote(url.path)
        try:
            if route in ("/", "/index.html"):
                return self._file(STATIC / "index.html")
            if route.startswith("/static/"):
                name = route[len("/static/"):]
                if name in {p.name for p in STATIC.iterdir()}:
                    return self._file(STATIC / name)
            elif route == "/api/info":
                return self._json(self.app.info())
            elif route.startswith("/api/jobs/"):
                job = self.app.jobs.get(route[len("/api/jobs/"):])
                if job is not None:
                    return self._json(job.as_json())
            elif route.startswith("/files/"):
                job_id, _, relative = route[len("/files/"):].partition("/")
                path = self.app.job_file(job_id, relative)
                if path is not None:
                    return self._file(path)
            self._error(404, f"{route}: not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser stopped reading (a video seek)

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            if url.path == "/api/upload":
                name = parse_qs(url.query).get("name", [""])[0]
                return self._json({"upload": self.app.save_upload(name, self.rfile, length)})
            if url.path == "/api/segment":
                if length > 1 << 20:
                    raise SegmentError("the request is too large for a list of sentences")
                try:
                    request = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as err:
                    raise SegmentError(f"the request is not JSON ({err})") from None
                return self._json({"job": self.app.submit(request).id})
            self._error(404, f"{url.path}: not found")
        except (SegmentError, VideoInputError) as err:
            self.close_connection = True  # an unread upload body is not left on the connection
            self._error(HTTPStatus.BAD_REQUEST, str(err))


def make_server(app: DemoApp, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The HTTP server of `app` (port 0: any free port; ``server.server_address`` says which)."""
    handler = type("DemoHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    from bifit.checkpoint import CheckpointError
    from bifit.config import ConfigError
    from bifit.loading import load_model

    p = argparse.ArgumentParser(prog="python -m bifit.app", description="A local web page to segment a video.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="our checkpoint, an official BIFIT/ReferFormer "
                   f"file or an MLflow run id (default {DEFAULT_CHECKPOINT}, what `make demo` trains)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true")
    p.add_argument("--window", type=int, default=SegmentConfig.window)
    p.add_argument("--text-encoder", help="a local copy of the text encoder (official files load roberta-base)")
    p.add_argument("--max-upload-mb", type=int, default=500)
    args = p.parse_args(argv)
    if args.checkpoint == DEFAULT_CHECKPOINT and not Path(DEFAULT_CHECKPOINT).is_file():
        print(f"bifit.app: error: no checkpoint at {DEFAULT_CHECKPOINT} (written by `make demo`); pass --checkpoint "
              "CKPT, or try the page with random weights: python -m bifit.example_clip example "
              "--untrained-checkpoint, then --checkpoint example/untrained.pth", file=sys.stderr)
        return 2
    try:
        config = SegmentConfig(window=args.window, amp=args.amp).validate()
        loaded = load_model(args.checkpoint, {"text_encoder": args.text_encoder} if args.text_encoder else None,
                            args.device)
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"bifit.app: error: {err}", file=sys.stderr)
        return 2
    app = DemoApp(loaded, str(args.checkpoint), config, args.max_upload_mb)
    server = make_server(app, args.host, args.port)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`: stop as Ctrl-C does, removing the temporary folder
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bifit.app: listening on {args.host}: other machines can reach this page", file=sys.stderr)
    print(f"bifit.app: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
