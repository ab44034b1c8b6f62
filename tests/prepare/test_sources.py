"""Dataset sources: instructions, the released-data manifests, and resumable fetching from a local HTTP server."""

import http.server
import threading

import pytest

from bifit.prepare.manifest import verify
from bifit.prepare.sources import SOURCES, YTVOS_PAGE, FetchError, fetch, instructions, real_manifest


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 400
    requests: list = []

    def do_GET(self):  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        if self.path == "/missing":
            self.send_error(404)
            return
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_resumes_a_partial_download_and_is_idempotent(server, tmp_path):
    dest = tmp_path / "sub/file.bin"
    dest.parent.mkdir()
    (tmp_path / "sub/file.bin.partial").write_bytes(RangeHandler.payload[:1000])
    fetch(f"{server}/file.bin", dest, progress=False)
    assert dest.read_bytes() == RangeHandler.payload and RangeHandler.requests == ["bytes=1000-"]
    assert not (tmp_path / "sub/file.bin.partial").exists()
    fetch(f"{server}/file.bin", dest, progress=False)  # already complete: no request
    assert RangeHandler.requests == ["bytes=1000-"]


def test_fetch_failure_keeps_the_partial_file(server, tmp_path):
    with pytest.raises(FetchError, match="download failed .*next run resumes it"):
        fetch(f"{server}/missing", tmp_path / "x.zip", progress=False)
    assert not (tmp_path / "x.zip").exists()


def test_instructions_name_every_file_and_where_it_goes(tmp_path):
    text = instructions("a2d", tmp_path / "a2d_sentences")
    for f in SOURCES["a2d"]:
        assert f"- {f.name} -> {tmp_path / 'a2d_sentences' / f.dest}" in text
    assert "fetchable: https://web.eecs.umich.edu/~jjcorso/bigshare/A2D_main_1_0.tar.bz" in text
    assert f"extracted into {tmp_path / 'a2d_sentences' / 'text_annotations'}" in text
    jhmdb = instructions("jhmdb", tmp_path)
    assert "never regenerate it" in jhmdb and "reported dead" in jhmdb


def test_released_data_counts():
    davis = {e.path: e for e in real_manifest("davis").items}
    assert davis["DAVIS/ImageSets/2017/val.txt"].lines == 30  # fixed by the release: exact
    assert davis["DAVIS/JPEGImages/480p"].min_count == 90 and davis["DAVIS/JPEGImages/480p"].count is None
    ytvos = {e.path: e for e in real_manifest("ytvos").items}
    assert ytvos["train/JPEGImages"].count == 3471  # one fixed train set: exact
    assert ytvos["valid/JPEGImages"].min_count == 202 and ytvos["valid/JPEGImages"].count is None
    assert "meta_expressions/test/meta_expressions.json" in ytvos
    jhmdb = {e.path: e for e in real_manifest("jhmdb").items}
    assert jhmdb["jhmdb_annotation.txt"].lines == 929  # header + 928 videos
    with pytest.raises(KeyError, match="unknown dataset"):
        real_manifest("coco")


def ytvos_download(root, valid_videos: int, train_meta: bool = True):
    """The real Ref-YouTube-VOS layout as the official archives leave it (empty video folders)."""
    for split in ("train", "valid", "test"):
        (root / f"meta_expressions/{split}").mkdir(parents=True)
        (root / f"meta_expressions/{split}/meta_expressions.json").write_text('{"videos": {}}')
    for i in range(3471):
        (root / f"train/JPEGImages/{i:010x}").mkdir(parents=True)
        (root / f"train/Annotations/{i:010x}").mkdir(parents=True)
    for i in range(valid_videos):
        (root / f"valid/JPEGImages/v{i:09x}").mkdir(parents=True)
    if train_meta:
        (root / "train/meta.json").write_text('{"videos": {}}')
    return root


@pytest.mark.parametrize("valid_videos", [202, 507])
def test_a_valid_zip_with_only_the_202_valid_videos_verifies(tmp_path, valid_videos):
    report = verify(real_manifest("ytvos"), ytvos_download(tmp_path, valid_videos))
    assert report.ok, report.problems
    assert report.checked["valid/JPEGImages"] == {"count": valid_videos, "expected": {"min_count": 202}}


def test_fewer_valid_videos_are_reported(tmp_path):
    report = verify(real_manifest("ytvos"), ytvos_download(tmp_path, 201))
    assert report.problems == [f"{tmp_path / 'valid/JPEGImages'}: 201 sub-folders matching '*', expected at least "
                               "202 (from valid.zip)"]


def test_a_missing_train_meta_json_says_where_it_comes_from(tmp_path):
    report = verify(real_manifest("ytvos"), ytvos_download(tmp_path, 202, train_meta=False))
    [problem] = report.problems
    meta = tmp_path / "train/meta.json"
    assert problem.startswith(f"{meta}: missing file (from train.zip or the competition page); train.zip is known "
                              "to lack it")
    assert f"distributed separately on {YTVOS_PAGE}" in problem
    assert problem.endswith(f"download meta.json for train from that page and place it at {meta}")
    text = instructions("ytvos", tmp_path)
    assert f"- meta.json (train) -> {meta} (by hand from {YTVOS_PAGE})" in text
