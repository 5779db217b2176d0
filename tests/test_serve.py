"""``maskrcnn serve``: the real server on 127.0.0.1 and a free port, started and stopped inside the tests.

A small ResNet-18 model with random weights keeps each request fast; the service does not care what it serves.
``python -m pytest -q -s tests/test_serve.py`` prints the bounded load test's requests/s and p50/p95 latency.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx", reason="needs the [dev] extra")
pytest.importorskip("starlette", reason="needs the [serve] extra")
pytest.importorskip("uvicorn", reason="needs the [serve] extra")

from conftest import require_or_skip  # noqa: E402
from PIL import Image  # noqa: E402

from maskrcnn.config import apply_overrides, get_preset  # noqa: E402
from maskrcnn.modeling.mask_rcnn import MaskRCNN  # noqa: E402
from maskrcnn.serve.app import decode_image, mask_to_polygons  # noqa: E402
from maskrcnn.serve.load import run_load  # noqa: E402
from maskrcnn.weights import save_model  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ResNet-18-FPN (random weights) whose detections score around 1/4."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("r18_fpn_demo"), ["model.box_head.detections_per_img=10"])
    path = tmp_path_factory.mktemp("serve") / "small"
    save_model(MaskRCNN(cfg).eval(), path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``maskrcnn serve`` in a child process; ``url`` once it answers /v2/health/ready."""

    def __init__(self, weights: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "maskrcnn", "serve", "--weights", str(weights),
                                      "--port", str(self.port), "--device", "cpu", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 120 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def server(small_model: Path) -> Iterator[Server]:
    """The default service (no key, default limits except a 1 MB upload limit)."""
    srv = Server(small_model, "--max-body-mb", "1", "--score-threshold", "0.0")
    yield srv
    srv.stop()


def _png(width: int = 160, height: int = 120, seed: int = 0, flat: bool = False) -> bytes:
    """A PNG of noise (or, ``flat``, of a few flat shapes: a big image in a small body) with a red rectangle."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    if flat:
        img[:] = (60 + 10 * seed, 120, 180)
        img[height // 2:, width // 3:] = (30, 200, 90)
    img[height // 4: height // 2, width // 4: width // 2] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 160, height: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_predict_raw_and_multipart(server: Server) -> None:
    """Raw body and multipart give the same JSON: size, model, detections with box, score, name, RLE mask."""
    data = _png()
    raw = httpx.post(server.url + "/v1/predict", content=data, headers={"content-type": "image/png"}, timeout=60)
    form = httpx.post(server.url + "/v1/predict", files={"image": ("a.png", data, "image/png")}, timeout=60)
    assert raw.status_code == 200 and form.status_code == 200
    a, b = raw.json(), form.json()
    assert a["image"] == {"width": 160, "height": 120} and a["model"] == "small"
    assert a["detections"] == b["detections"] and 0 < len(a["detections"]) <= 10
    det = a["detections"][0]
    assert set(det) == {"category_id", "label", "name", "score", "box", "mask"}
    assert det["mask"]["format"] == "rle" and det["mask"]["size"] == [120, 160]
    x1, y1, x2, y2 = det["box"]
    assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120
    assert [d["score"] for d in a["detections"]] == sorted((d["score"] for d in a["detections"]), reverse=True)


def test_predict_parameters(server: Server) -> None:
    """score_threshold, max_detections and mask_format (polygon, none) act; bad values are 400s."""
    data = _png()
    url = server.url + "/v1/predict"
    some = httpx.post(url, content=data, params={"max_detections": 2, "mask_format": "none"}, timeout=60).json()
    assert len(some["detections"]) == 2 and all("mask" not in d for d in some["detections"])
    poly = httpx.post(url, content=data, params={"mask_format": "polygon", "max_detections": 3}, timeout=60).json()
    for d in poly["detections"]:
        assert d["mask"]["format"] == "polygon" and all(len(p) % 2 == 0 for p in d["mask"]["polygons"])
    none = httpx.post(url, content=data, params={"score_threshold": 1.0}, timeout=60).json()
    assert none["detections"] == []
    for params, word in (({"score_threshold": "2"}, "score_threshold"), ({"mask_format": "png"}, "mask_format"),
                         ({"max_detections": "-1"}, "max_detections")):
        r = httpx.post(url, content=data, params=params, timeout=60)
        assert r.status_code == 400 and word in r.json()["error"]


def test_bad_inputs_get_clear_errors_and_the_service_keeps_serving(server: Server) -> None:
    """Truncated JPEG 400, text 415, empty 400, decompression bomb 413, oversize upload 413; then a good 200."""
    url = server.url + "/v1/predict"
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # a few kB that declare 900 megapixels
    cases = [
        (_jpeg()[:300], "image/jpeg", 400, "truncated or corrupt"),
        (b"hello, this is text\n", "text/plain", 415, "not an image"),
        (b"hello, this is text\n", "application/octet-stream", 415, "not an image format"),
        (b"", "image/png", 400, "empty body"),
        (bomb.getvalue(), "image/png", 413, "pixels"),
        (os.urandom(1_200_000), "image/png", 413, "larger than the limit"),
    ]
    for body, ctype, status, words in cases:
        r = httpx.post(url, content=body, headers={"content-type": ctype}, timeout=60)
        assert r.status_code == status, (ctype, status, r.text)
        assert words in r.json()["error"], r.json()
    r = httpx.post(url, files={"image": ("big.png", os.urandom(1_200_000), "image/png")}, timeout=60)
    assert r.status_code == 413
    r = httpx.post(url, files={"other": ("a.png", _png(), "image/png")}, timeout=60)
    assert r.status_code == 400 and "'image'" in r.json()["error"]
    assert httpx.post(url, content=_png(), timeout=60).status_code == 200


def test_kserve_v2_endpoints(server: Server) -> None:
    """Health, model metadata and infer (image as a UINT8 tensor) of the Open Inference Protocol v2."""
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(server.url + "/v2/models/small").json()
    assert meta["name"] == "small" and meta["inputs"][0]["datatype"] == "UINT8"
    assert meta["parameters"]["class_names"] == ["square", "circle", "triangle"]
    assert httpx.get(server.url + "/v2/models/other").status_code == 404
    img = np.asarray(Image.open(io.BytesIO(_png())).convert("RGB"))
    body = {"id": "r1", "inputs": [{"name": "image", "shape": list(img.shape), "datatype": "UINT8",
                                    "data": img.reshape(-1).tolist()}]}
    r = httpx.post(server.url + "/v2/models/small/infer", json=body, timeout=60).json()
    assert r["model_name"] == "small" and r["id"] == "r1"
    out = {o["name"]: o for o in r["outputs"]}
    ref = httpx.post(server.url + "/v1/predict", content=_png(), timeout=60).json()["detections"]
    n = len(ref)
    assert out["boxes"]["shape"] == [n, 4] and out["scores"]["shape"] == [n]
    np.testing.assert_allclose(sorted(out["scores"]["data"], reverse=True), [d["score"] for d in ref], atol=1e-4)
    bad = httpx.post(server.url + "/v2/models/small/infer", json={"inputs": []}, timeout=60)
    assert bad.status_code == 400 and "v2 inference request" in bad.json()["error"]


def test_page_is_served_offline(server: Server) -> None:
    """The page at / is one HTML file with no external scripts, styles or fonts."""
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/v1/predict" in html and "<canvas" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_cors_off_by_default(server: Server) -> None:
    """No Access-Control-Allow-Origin unless --cors-origin is given."""
    r = httpx.options(server.url + "/v1/predict", headers={"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_bounded_load(server: Server) -> None:
    """4 clients x 25 requests (``maskrcnn.serve.load.run_load``, the bench's serve task): every request answered
    correctly for its own image or with a 503 and Retry-After, none lost or crossed; prints requests/s and p50/p95
    (``maskrcnn bench --only serve`` records them in the bench results)."""
    images = [_png(120 + 16 * c, 100 + 8 * c, seed=c) for c in range(4)]
    expected = [httpx.post(server.url + "/v1/predict", content=img, params={"mask_format": "none"}, timeout=60).json()
                for img in images]

    def check(c: int, status: int, headers: dict[str, str], body: bytes) -> None:
        if status == 200:
            # The answer is this client's own image's (size and detections), not another client's.
            got = json.loads(body)
            assert got["image"] == expected[c]["image"]
            assert [d["box"] for d in got["detections"]] == [d["box"] for d in expected[c]["detections"]]
        else:
            assert status == 503 and "retry-after" in {k.lower() for k in headers}, (status, body)

    figs = run_load(server.url, images, 25, check)
    assert figs["requests"] == 100 and figs["ok"] + figs["busy"] == 100 and figs["other"] == 0
    assert figs["ok"] >= 96  # 4 clients never fill a queue of 8
    print(f"\n[serve load] 4 clients x 25 requests: {figs['ok']} answered 200, {figs['busy']} 503; "
          f"{figs['requests_per_s']:.1f} requests/s, p50 {1000 * figs['p50_s']:.0f} ms, "
          f"p95 {1000 * figs['p95_s']:.0f} ms")


def test_health_answers_while_the_model_is_busy(server: Server) -> None:
    """Inference runs off the event loop: /v2/health/live answers before queued predictions finish."""
    big = _png(1200, 900, seed=9, flat=True)
    done: list[float] = []

    def predict() -> None:
        r = httpx.post(server.url + "/v1/predict", content=big, params={"mask_format": "none"}, timeout=120)
        assert r.status_code == 200
        done.append(time.monotonic())

    threads = [threading.Thread(target=predict) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    live = httpx.get(server.url + "/v2/health/live", timeout=30)
    answered = time.monotonic()
    for t in threads:
        t.join()
    assert live.status_code == 200
    assert len(done) == 4 and max(done) > answered


def test_api_key_and_full_queue(small_model: Path) -> None:
    """With --api-key: 401 without it, 200 with it (Bearer or X-API-Key); health open. A full queue gives 503."""
    srv = Server(small_model, "--api-key", KEY, "--max-queue", "0", "--score-threshold", "0.0")
    try:
        url = srv.url + "/v1/predict"
        data = _png()
        r = httpx.post(url, content=data, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.post(url, content=data, headers={"X-API-Key": "wrong"}, timeout=60).status_code == 401
        assert httpx.post(url, content=data, headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200
        assert httpx.post(url, content=data, headers={"X-API-Key": KEY}, timeout=60).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
        assert httpx.get(srv.url + "/v2/models/small").status_code == 401
        big = _png(1200, 900, seed=3, flat=True)
        with ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda _: httpx.post(url, content=big, headers={"X-API-Key": KEY}, timeout=120),
                               range(6)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]
    finally:
        assert srv.stop() in (0, -signal.SIGTERM)


def test_sigterm_drains_requests_in_flight(small_model: Path) -> None:
    """On SIGTERM the requests already accepted are answered, then the process exits cleanly."""
    srv = Server(small_model, "--score-threshold", "0.0")
    big = _png(1200, 900, seed=5, flat=True)
    results: list[int] = []

    def predict() -> None:
        r = httpx.post(srv.url + "/v1/predict", content=big, params={"mask_format": "none"}, timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=predict) for _ in range(3)]
    for t in threads:
        t.start()
    while not results:  # one answered: the other two are queued or running inside the server
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    # uvicorn re-raises the signal once it has drained, so the exit status reports SIGTERM.
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_keypoint_model_answers_with_keypoints(tmp_path: Path) -> None:
    """A Keypoint R-CNN's detections carry (K, 3) keypoints [x, y, score] in input pixels, the response its keypoint
    names, skeleton and drawing threshold, and the v2 infer answer a keypoints output."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("r18_fpn_keypoint_demo"), ["model.box_head.detections_per_img=5"])
    save_model(MaskRCNN(cfg).eval(), tmp_path / "people")
    srv = Server(tmp_path / "people", "--score-threshold", "0.0")
    try:
        body = httpx.post(srv.url + "/v1/predict", content=_png(), timeout=60).json()
        assert 0 < len(body["detections"]) <= 5
        assert body["keypoint_names"] == list(cfg.model.keypoint_head.names)
        assert body["skeleton"] == [list(p) for p in cfg.model.keypoint_head.skeleton]
        assert body["keypoint_threshold"] == cfg.model.keypoint_head.draw_threshold
        for det in body["detections"]:
            assert "mask" not in det and len(det["keypoints"]) == 17 and all(len(k) == 3 for k in det["keypoints"])
            x1, y1, x2, y2 = det["box"]
            assert all(x1 - 0.5 <= x <= x2 + 0.5 and y1 - 0.5 <= y <= y2 + 0.5 for x, y, _ in det["keypoints"])
        img = np.asarray(Image.open(io.BytesIO(_png())).convert("RGB"))
        req = {"inputs": [{"name": "image", "shape": list(img.shape), "datatype": "UINT8",
                           "data": img.reshape(-1).tolist()}]}
        out = {o["name"]: o for o in httpx.post(srv.url + "/v2/models/people/infer", json=req, timeout=60
                                                 ).json()["outputs"]}
        assert out["keypoints"]["shape"] == [len(body["detections"]), 17, 3]
        meta = httpx.get(srv.url + "/v2/models/people").json()
        assert meta["outputs"][-1] == {"name": "keypoints", "datatype": "FP32", "shape": [-1, 17, 3]}
    finally:
        srv.stop()


def test_non_local_bind_needs_a_key(small_model: Path, capsys: pytest.CaptureFixture) -> None:
    """Binding to 0.0.0.0 without --api-key or --insecure-no-api-key is refused with an explanation."""
    from maskrcnn.cli import main

    assert main(["serve", "--weights", str(small_model), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_decode_and_polygons() -> None:
    """decode_image applies the limits on the header; polygons trace a square's outline in pixel coordinates."""
    img = decode_image(_png(40, 30), max_pixels=10_000)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    with pytest.raises(Exception, match="larger than the limit"):
        decode_image(_png(200, 100), max_pixels=10_000)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 4:12] = True
    (poly,) = mask_to_polygons(mask)
    xs, ys = poly[0::2], poly[1::2]
    # Pixel i covers [i, i + 1): columns 4..11 span x in [4, 12], rows 5..9 span y in [5, 10].
    assert (min(xs), max(xs), min(ys), max(ys)) == (4.0, 12.0, 5.0, 10.0)
    assert json.dumps(poly)


# ---------------------------------------------------------------------------------------------------------------
# The page in a real browser: headless Chromium from the distribution, driven by Selenium through its chromedriver

# CI sets it (.ci/run), so that a missing browser fails the suite instead of skipping the page's test.
REQUIRE_BROWSER = "MASKRCNN_REQUIRE_BROWSER"

# Canvas pixels that differ from the uploaded image drawn alone, and at each [x, y] of ``points``: whether the
# page drew over it. Globals of the page's script (``image``) are visible to injected scripts.
CANVAS_DIFF_JS = """
const points = arguments[0];
const c = document.getElementById("canvas");
const plain = document.createElement("canvas");
plain.width = c.width; plain.height = c.height;
plain.getContext("2d").drawImage(image, 0, 0);
const a = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const b = plain.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const differs = (i) => a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2];
let changed = 0;
for (let i = 0; i < a.length; i += 4) if (differs(i)) changed++;
return {width: c.width, height: c.height, changed: changed,
        at: points.map(([x, y]) => differs(4 * (Math.floor(y) * c.width + Math.floor(x))))};
"""


def chromium_driver(width: int = 1280, height: int = 900, scale: float = 1.0) -> Any:
    """A headless Chromium WebDriver (system chromium + chromedriver, no download); skips, or fails under
    $MASKRCNN_REQUIRE_BROWSER, when selenium or the browser is missing."""
    try:
        from selenium import webdriver  # noqa: PLC0415
        from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    except ImportError:
        require_or_skip("the browser test needs selenium (pip install -e '.[dev]')", REQUIRE_BROWSER)
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        require_or_skip("the browser test needs chromium and chromedriver from the distribution "
                        "(apt-get install chromium chromium-driver)", REQUIRE_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium's sandbox refuses to run as root (CI containers).
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", f"--force-device-scale-factor={scale}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _set_slider(driver: Any, value: float) -> None:
    """Move the score slider as a person would: set its value and fire the input event."""
    driver.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", f"{value:.2f}")


def _rows(driver: Any) -> list[tuple[str, str]]:
    """The detections table's (class name, score text) rows, top to bottom."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    rows = driver.find_elements(By.CSS_SELECTOR, "#table tbody tr")
    return [(r.find_elements(By.TAG_NAME, "td")[1].text, r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]


def test_page_in_a_browser_draws_the_detections(server: Server, tmp_path: Path) -> None:
    """Headless Chromium uploads an image on the page; the table lists the model's detections, the canvas draws
    them, the slider filters rows without a new request, and hovering a row highlights its instance."""
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    driver = chromium_driver()
    try:
        data = _png(200, 150, seed=11)
        path = tmp_path / "upload.png"
        path.write_bytes(data)
        # What the page asks for (everything, polygons): the same model and bytes give the same detections.
        expected = httpx.post(server.url + "/v1/predict", files={"image": ("upload.png", data, "image/png")},
                              params={"mask_format": "polygon", "score_threshold": 0}, timeout=60).json()
        dets = expected["detections"]
        assert len(dets) >= 2
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 60).until(lambda d: "detections shown" in d.find_element(By.ID, "status").text)
        assert driver.execute_script("return data.detections.length") == len(dets)

        # Every detection: one row each, in the JSON's order, with its name and score.
        _set_slider(driver, 0.0)
        assert _rows(driver) == [(d["name"], f"{d['score']:.3f}") for d in dets]
        x1, y1, x2, y2 = dets[0]["box"]
        left_edge, right_edge = [x1, (y1 + y2) / 2], [min(x2, 199.0), (y1 + y2) / 2]
        drawn = driver.execute_script(CANVAS_DIFF_JS, [left_edge, right_edge])
        assert (drawn["width"], drawn["height"]) == (200, 150)
        assert drawn["changed"] > 0 and all(drawn["at"]), drawn

        # A threshold between the scores keeps exactly the detections at or above it, without asking again.
        scores = sorted({d["score"] for d in dets})
        cut = next((t / 100 for t in range(1, 100) if scores[0] < t / 100 <= scores[-1]), None)
        assert cut is not None, scores
        _set_slider(driver, cut)
        assert _rows(driver) == [(d["name"], f"{d['score']:.3f}") for d in dets if d["score"] >= cut]
        requests = driver.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.name.includes('/v1/predict')).length")
        assert requests == 1

        # Hovering a row highlights it and redraws the canvas (its instance strong, the others faded).
        before = driver.execute_script(CANVAS_DIFF_JS, [])["changed"]
        row = driver.find_elements(By.CSS_SELECTOR, "#table tbody tr")[0]
        ActionChains(driver).move_to_element(row).perform()
        assert "hl" in row.get_attribute("class")
        assert driver.execute_script(CANVAS_DIFF_JS, [])["changed"] != before

        # Above every score: no rows and the canvas is the image alone.
        assert scores[-1] < 1.0
        _set_slider(driver, 1.0)
        assert _rows(driver) == []
        assert driver.execute_script(CANVAS_DIFF_JS, [])["changed"] == 0
    finally:
        driver.quit()
