"""Regenerate the README's screenshot of the service's page (docs/images/serve_page.png).

Starts ``maskrcnn serve`` with a model on 127.0.0.1 and a free port, opens the page in headless Chromium (the
distribution's chromium and chromedriver, driven by Selenium), uploads an image, sets the score slider, hovers
over one row of the detections table and saves the window as a PNG. The defaults use detectron2's thin R50-FPN
fixture (trained on synthetic shapes) from ../shared/fixtures:

    python tools/serve_screenshot.py                       # -> docs/images/serve_page.png
    python tools/serve_screenshot.py --weights model.onnx --image photo.jpg --out page.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "detectron2" / "mask_rcnn_R_50_FPN"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str, port: int, extra: list[str]) -> subprocess.Popen:
    """``maskrcnn serve`` in a child process, returned once /v2/health/ready answers (RuntimeError after 180 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "maskrcnn", "serve", "--weights", weights, "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not become ready in 180 s")


def with_class_names(weights: str, names: list[str], folder: Path) -> str:
    """Save ``weights`` as a model folder whose config carries ``names`` (a detectron2 .pkl has none)."""
    import maskrcnn
    from maskrcnn.weights import save_model

    model = maskrcnn.load_model(weights).model
    m = model.cfg.model
    if len(names) != m.num_classes:
        raise SystemExit(f"{len(names)} class names for a model of {m.num_classes} classes")
    model.cfg = dataclasses.replace(model.cfg, model=dataclasses.replace(m, class_names=tuple(names)))
    return str(save_model(model, folder))


def chromium(width: int, height: int, scale: float) -> object:
    """Headless Chromium through the system chromedriver (apt-get install chromium chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--force-device-scale-factor={scale}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def main(argv: list[str] | None = None) -> int:
    """Parse the options, take the screenshot, print where it went."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(FIXTURE / "weights.pkl"), help="what `maskrcnn serve --weights` takes")
    p.add_argument("--class-names", default=str(FIXTURE / "config.json"),
                   help="a JSON file whose 'class_names' replace the model's ('' keeps the model's)")
    p.add_argument("--image", default=str(FIXTURE / "images" / "04.png"), help="the image to upload")
    p.add_argument("--min-size", type=int, default=320, help="the model's test size (not for .onnx files)")
    p.add_argument("--max-size", type=int, default=512, help="the model's largest side (not for .onnx files)")
    p.add_argument("--score", type=float, default=0.7, help="where to set the page's score slider")
    p.add_argument("--hover", type=int, default=-1, help="table row to hover over (-1: none)")
    p.add_argument("--width", type=int, default=1100, help="browser window width (CSS px)")
    p.add_argument("--height", type=int, default=760, help="browser window height (CSS px)")
    p.add_argument("--scale", type=float, default=1.0, help="device pixel ratio of the screenshot")
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "serve_page.png"), help="the PNG to write")
    args = p.parse_args(argv)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = tempfile.TemporaryDirectory()
    weights = args.weights
    if args.class_names and not weights.endswith(".onnx"):
        names = json.loads(Path(args.class_names).read_text())["class_names"]
        # The folder's name is the model's name on the page.
        weights = with_class_names(weights, names, Path(tmp.name) / Path(args.weights).parent.name)
    port = free_port()
    sizes = [] if args.weights.endswith(".onnx") else ["--min-size", str(args.min_size), "--max-size",
                                                       str(args.max_size), "--device", "cpu"]
    server = start_server(weights, port, sizes)
    driver = chromium(args.width, args.height, args.scale)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "file").send_keys(os.path.abspath(args.image))
        WebDriverWait(driver, 120).until(lambda d: "detections shown" in d.find_element(By.ID, "status").text)
        driver.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                              "s.dispatchEvent(new Event('input'));", f"{args.score:.2f}")
        rows = driver.find_elements(By.CSS_SELECTOR, "#table tbody tr")
        if 0 <= args.hover < len(rows):
            ActionChains(driver).move_to_element(rows[args.hover]).perform()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out}: {len(rows)} detections shown at score >= {args.score}")
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
