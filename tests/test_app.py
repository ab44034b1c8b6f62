"""The web demo (python -m bifit.app): in a real headless Chromium (the distribution's package, driven by Selenium)
a user uploads a clip, types a sentence, sees the overlay video and downloads masks equal to the API's; the
requests refuse bad input, serve nothing outside a job's folder and the page fetches nothing from elsewhere.

The browser test skips only when Chromium or its driver is not installed (`make browser` installs both from the
distribution's packages; .ci/run does before the tests)."""

import io
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

from bifit.app import STATIC, DemoApp, make_server
from bifit.video_io import write_video
from tests.segment_fixtures import *  # noqa: F403 (the fixtures checkpoint, clip, loaded)
from tests.segment_fixtures import CLIP_FRAMES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(loaded):
    """(base URL, app) of a demo server on a free loopback port."""
    app = DemoApp(loaded, "untrained.pth", examples=True)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", app
    httpd.shutdown()
    httpd.server_close()
    app.close()


def _request(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def _wait_job(base, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        _, body, _ = _request(f"{base}/api/jobs/{job_id}")
        job = json.loads(body)
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished after {timeout} s")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="the distribution's Chromium and chromedriver are not installed (`make browser`: "
                           "apt-get install chromium chromium-driver)")
def test_browser_upload_type_see_the_overlay_and_download_the_api_masks(server, loaded, clip, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = server
    rgb, texts = clip
    write_video(tmp_path / "walk.mp4", rgb, fps=6)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(lambda d: "untrained.pth" in d.find_element(By.ID, "checkpoint").text)
        assert driver.find_element(By.ID, "untrained").is_displayed()  # random weights: the page says so
        driver.find_element(By.ID, "video").send_keys(str(tmp_path / "walk.mp4"))
        driver.find_element(By.ID, "texts").send_keys(texts[0])
        driver.find_element(By.ID, "run").click()
        duration = WebDriverWait(driver, 120, 0.2).until(lambda d: d.execute_script(
            "const v = document.querySelector('#expressions video');"
            "return v && v.readyState >= 1 && v.duration > 0 ? v.duration : null;"))
        assert duration == pytest.approx(CLIP_FRAMES / 6, abs=0.2)  # 4 frames at 6 fps
        assert driver.find_element(By.ID, "status").text == f"done: {CLIP_FRAMES} frames"
        assert texts[0] in driver.find_element(By.CSS_SELECTOR, "#expressions h3").text
        plotted = driver.execute_script(  # the score plot drew something
            "const c = document.querySelector('#expressions canvas');"
            "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < px.length; i += 4) n += px[i] > 0; return n;")
        assert plotted > 100
        driver.find_element(By.ID, "download").click()
        zip_path = downloads / "masks.zip"
        WebDriverWait(driver, 60, 0.2).until(lambda d: zip_path.exists() and not list(downloads.glob("*.crdownload")))
    finally:
        driver.quit()
    expected = loaded.segment(tmp_path / "walk.mp4", [texts[0]])[0]
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        assert len(names) == CLIP_FRAMES and all(re.fullmatch(r"00_[a-z0-9-]+/masks/\d{5}\.png", n) for n in names)
        masks = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n)))) for n in names])
        record = json.loads(zf.read(names[0].split("/")[0] + "/result.json"))
    np.testing.assert_array_equal(masks == 255, expected.masks)
    np.testing.assert_allclose([f["score"] for f in record["frames"]], expected.frame_scores, atol=1e-6)


def test_requests_run_the_example_and_refuse_bad_input(server, loaded):
    base, app = server
    status, body, _ = _request(f"{base}/api/info")
    info = json.loads(body)
    assert status == 200 and info["untrained"] and len(info["examples"]) == 1
    example = info["examples"][0]
    # the bundled example, two sentences, every second frame
    status, body, _ = _request(f"{base}/api/segment", json.dumps(
        {"example": example["name"], "texts": example["sentences"][:2], "every": 2}).encode())
    assert status == 200, body
    job = _wait_job(base, json.loads(body)["job"])
    assert job["state"] == "done" and job["done"] == 12 and [e["text"] for e in job["expressions"]] == \
        example["sentences"][:2]
    assert all(len(e["scores"]) == 12 for e in job["expressions"])
    # the overlay video, whole and by byte range (what a <video> element asks for)
    status, whole, headers = _request(base + job["expressions"][0]["video"])
    assert status == 200 and headers["Content-Type"] == "video/webm" and whole[:4] == b"\x1a\x45\xdf\xa3"
    status, part, headers = _request(base + job["expressions"][0]["video"], headers={"Range": "bytes=10-19"})
    assert status == 206 and part == whole[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(whole)}"
    # bad input: named, nothing run
    cases = [
        ("/api/upload?name=notes.txt", b"hello", "expected a video"),
        ("/api/upload?name=clip.mp4", b"", "the file is empty"),
        ("/api/segment", json.dumps({"example": example["name"], "texts": ["  "]}).encode(),
         "expected one or more sentences"),
        ("/api/segment", json.dumps({"example": "nope", "texts": ["x"]}).encode(), "example 'nope': unknown"),
        ("/api/segment", b"{not json", "not JSON"),
    ]
    for path, data, message in cases:
        status, body, _ = _request(base + path, data)
        assert status == 400 and message in json.loads(body)["error"], (path, body)
    status, body, _ = _request(f"{base}/api/upload?name=junk.mp4", b"not a video" * 100)
    upload = json.loads(body)["upload"]
    status, body, _ = _request(f"{base}/api/segment", json.dumps({"upload": upload, "texts": ["x"]}).encode())
    assert status == 400 and "not a readable video" in json.loads(body)["error"]
    # nothing outside a job's folder is served
    for path in (f"/files/{job['job']}/../../etc/passwd", f"/files/{job['job']}/%2e%2e/%2e%2e/etc/hostname",
                 "/files/nojob/masks.zip", "/static/../app.py"):
        assert _request(base + path)[0] == 404, path


def test_the_page_works_offline_and_listens_on_loopback(loaded):
    for f in STATIC.iterdir():
        text = f.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{f.name} refers to another site"
    assert make_server.__defaults__ == ("127.0.0.1", 7860)
