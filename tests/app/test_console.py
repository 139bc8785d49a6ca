"""The inspection console (app/console.py, app/static/console/): served at ``/`` without a key, and driven
in a real headless Chromium (Debian's chromium + chromium-driver through Selenium; nothing downloads a
browser): upload, overlays read back and compared with the JSON answer, errors shown readably."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from support.data import dataset
from support.harness import API_KEY, MAIN_SERVER_ENV, running_server
from support.images import encode, exif_rotated, pattern
from support.weights import DET_NMS_IOU, make_weights

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# ------------------------------------------------------------------------------------------------------
# the page over plain HTTP


def test_console_is_served_without_a_key_and_the_api_is_unchanged(server, anon):
    page = anon.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="console/console.js">' in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text  # nothing fetched from outside
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        r = anon.get(f"/console/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 500
        assert "https://" not in r.text and r.text.count("http://") == r.text.count("http://www.w3.org/2000/svg")
    missing = anon.get("/console/../main.py")
    assert missing.status_code == 404
    assert anon.get("/console/secret.py").headers["content-type"] == "application/problem+json"
    assert anon.get("/docs").status_code == 200
    assert anon.post("/detect", files={"file": ("a.png", encode(pattern(64, 64)))}).status_code == 401
    assert "/" not in anon.get("/openapi.json").json()["paths"]  # the page is not part of the API


# ------------------------------------------------------------------------------------------------------
# a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 30.0, what: str = "the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {condition}")


def _open(driver, url: str, task: str, key: str | None = API_KEY, model: str | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    if key:
        driver.find_element(By.ID, "api-key").send_keys(key)
    _wait(driver, "return document.getElementById('model').options.length > 0 || "
                  "!document.getElementById('error').hidden", what="the model list")
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    if model:
        Select(driver.find_element(By.ID, "model")).select_by_value(model)


def _set_conf(driver, value: float) -> None:
    driver.execute_script(
        "const s = document.getElementById('conf'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));", value)


def _upload(driver, path: Path, previous: str | None = None) -> dict:
    """Choose ``path`` in the file input; wait until the answer is drawn; return the JSON answer."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "files").send_keys(str(path))
    drawn = _wait(driver, "const d = document.body.dataset.drawn; return d && d !== arguments[0] ? d : null;"
                          .replace("arguments[0]", json.dumps(previous or "")), what="the overlay")
    body = json.loads(driver.find_element(By.ID, "json").get_attribute("textContent"))
    assert body["result_id"] == drawn
    return body


def _drawn(driver) -> dict:
    return driver.execute_script("""
        const svg = document.getElementById('overlay');
        const img = document.getElementById('photo');
        const ib = img.getBoundingClientRect();
        return {
          verdict: document.getElementById('verdict').dataset.verdict,
          verdictShown: !document.getElementById('verdict').hidden,
          viewBox: svg.getAttribute('viewBox'),
          natural: [img.naturalWidth, img.naturalHeight],
          shown: [ib.left, ib.top, ib.width, ib.height],
          rects: [...svg.querySelectorAll('rect')].map(r => {
            const b = r.getBoundingClientRect();
            return {box: r.dataset.box.split(',').map(Number), index: Number(r.dataset.index),
                    screen: [b.left, b.top, b.width, b.height]};
          }),
          masks: [...svg.querySelectorAll('image.mask')].map(m => ({index: Number(m.dataset.index),
                                                                  href: m.getAttribute('href')})),
          rows: document.querySelectorAll('#defects tbody tr').length,
        };""")


def _inspect(driver, server, path: Path, task: str, conf: float | None = None) -> tuple[dict, dict]:
    """Open the console, choose ``task``, optionally set conf, upload ``path``: (JSON answer, what is drawn)."""
    _open(driver, server.url, task)
    if conf is not None:
        _set_conf(driver, conf)
    body = _upload(driver, path)
    return body, _drawn(driver)


def _assert_boxes_on_screen(drawn: dict, body: dict, width: int, height: int) -> None:
    """Every drawn box stands where the JSON puts it, scaled with the image as the page shows it."""
    left, top, shown_w, shown_h = drawn["shown"]
    sx, sy = shown_w / width, shown_h / height
    for rect in drawn["rects"]:
        d = body["defects"][rect["index"]]["box"]
        want = [d["x1"], d["y1"], d["x2"], d["y2"]]
        assert rect["box"] == pytest.approx(want, abs=1e-6)
        x, y, w, h = rect["screen"]
        assert x - left == pytest.approx(want[0] * sx, abs=1.5) and y - top == pytest.approx(want[1] * sy, abs=1.5)
        assert w == pytest.approx((want[2] - want[0]) * sx, abs=1.5)
        assert h == pytest.approx((want[3] - want[1]) * sy, abs=1.5)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory) -> Iterator:
    weights = make_weights(tmp_path_factory.mktemp("console-weights"))
    with running_server("embedded", weights, **MAIN_SERVER_ENV) as s:
        yield s


def test_detect_boxes_are_drawn_where_the_json_puts_them(browser, console_server, tmp_path):
    img = tmp_path / "part.png"
    Image.fromarray(pattern(96, 64, seed=3)).save(img)
    body, drawn = _inspect(browser, console_server, img, "detect", conf=0.0)
    assert drawn["verdictShown"] and drawn["verdict"] == body["verdict"]
    assert drawn["viewBox"] == "0 0 96 64" and drawn["natural"] == [96, 64]
    assert body["defects"] and len(drawn["rects"]) == len(body["defects"]) == drawn["rows"]
    _assert_boxes_on_screen(drawn, body, 96, 64)
    curl = browser.find_element("id", "curl").get_attribute("textContent")
    assert curl.startswith("curl -F file=@part.png") and "/detect?" in curl and "conf=0.00" in curl
    assert API_KEY not in curl  # the key is never printed
    # the IoU slider starts at the model's own NMS threshold, which the service applies when none is sent
    assert "iou=" not in curl
    assert browser.execute_script("return document.getElementById('iou').value") == str(DET_NMS_IOU)
    assert browser.find_element("id", "iou-value").get_attribute("textContent") == f"{DET_NMS_IOU:.2f}"
    browser.execute_script("const s = document.getElementById('iou'); s.value = 0.3;"
                           "s.dispatchEvent(new Event('input'));")
    _wait(browser, "return document.getElementById('curl').textContent.includes('iou=0.30')", what="iou sent")


def test_segment_masks_are_drawn_pixel_for_pixel(browser, console_server, tmp_path):
    from pycocotools import mask as coco_mask

    img = tmp_path / "tile.png"
    Image.fromarray(pattern(80, 64, seed=5)).save(img)
    body, drawn = _inspect(browser, console_server, img, "segment", conf=0.0)
    assert drawn["verdict"] == body["verdict"]
    assert body["defects"] and len(drawn["masks"]) == len(body["defects"])
    for m in drawn["masks"]:
        want = coco_mask.decode({"size": body["defects"][m["index"]]["mask"]["size"],
                                 "counts": body["defects"][m["index"]]["mask"]["counts"].encode()}).astype(bool)
        png = Image.open(io.BytesIO(base64.b64decode(m["href"].split(",", 1)[1])))
        got = np.asarray(png.convert("RGBA"))[..., 3] > 0
        assert got.shape == want.shape and (got == want).all()


def test_classify_shows_the_verdict_and_mes_fields_are_echoed(browser, console_server, tmp_path):
    from selenium.webdriver.common.by import By

    img = tmp_path / "tile.jpg"
    Image.fromarray(pattern(64, 64, seed=7)).save(img)
    _open(browser, console_server.url, "classify")
    browser.find_element(By.ID, "station_id").send_keys("ST-04")
    browser.find_element(By.ID, "part_id").send_keys("4711")
    body = _upload(browser, img)
    assert body["station_id"] == "ST-04" and body["part_id"] == "4711" and body["top_k"]
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.is_displayed() and verdict.text.lower() == body["verdict"]
    assert "-F station_id=ST-04" in browser.find_element(By.ID, "curl").get_attribute("textContent")


def test_errors_are_shown_as_problem_title_and_detail(browser, console_server, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, console_server.url, "detect", key=None)
    img = tmp_path / "part.png"
    Image.fromarray(pattern(64, 64)).save(img)
    browser.find_element(By.ID, "files").send_keys(str(img))
    _wait(browser, "return document.getElementById('error').dataset.status", what="the 401")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.get_attribute("data-status") == "401"
    assert "API key" in error.text and not browser.find_element(By.ID, "verdict").is_displayed()

    _open(browser, console_server.url, "detect")
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image, whatever its name says")
    browser.find_element(By.ID, "files").send_keys(str(text))
    _wait(browser, "return document.getElementById('error').dataset.status === '415'", what="the 415")
    error = browser.find_element(By.ID, "error")
    assert "Unsupported media type" in error.text and "not a supported image format" in error.text


def test_an_exif_rotated_photo_gets_its_boxes_on_the_upright_image(browser, console_server, tmp_path):
    upright = pattern(48, 96, seed=9)  # portrait as a viewer shows it; stored landscape + orientation 6
    img = tmp_path / "rotated.jpg"
    img.write_bytes(exif_rotated(upright))
    body, drawn = _inspect(browser, console_server, img, "detect", conf=0.0)
    assert (body["image"]["width"], body["image"]["height"]) == (48, 96)
    assert drawn["natural"] == [48, 96] and drawn["viewBox"] == "0 0 48 96"
    assert drawn["shown"][3] > drawn["shown"][2]  # shown upright
    _assert_boxes_on_screen(drawn, body, 48, 96)


# ------------------------------------------------------------------------------------------------------
# the README's screenshot: the shipped detector on a real NEU-DET image


def test_console_on_a_real_defect_image(browser, tmp_path):
    """With S2AMNET_CONSOLE_SCREENSHOT=path, the screenshot is written there (docs/console.png is made so)."""
    folder = dataset("neu-det")
    image = folder / "IMAGES" / "scratches_10.jpg"
    if not image.exists():
        image = sorted((folder / "IMAGES").glob("scratches_*.jpg"))[0]
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "neu-det-detect").symlink_to(ROOT / "weights" / "neu-det-detect")
    with running_server("embedded", weights) as s:
        _open(browser, s.url, "detect", key=None)
        body = _upload(browser, image)
        drawn = _drawn(browser)
        assert body["verdict"] == "fail" and drawn["verdict"] == "fail" and drawn["rects"]
        out = os.environ.get("S2AMNET_CONSOLE_SCREENSHOT")
        if out:
            browser.set_window_size(1200, 900)
            time.sleep(0.3)
            browser.save_screenshot(out)
        with httpx.Client(base_url=s.url) as c:
            assert c.get("/").status_code == 200
