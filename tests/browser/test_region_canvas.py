"""The region canvas in a real headless Chromium against a small gradio page, on gradio 3.41 and 4.40.

Each gradio version runs from its own Python (``.venvs/gradio3``, ``.venvs/gradio4``, made
by ``.ci/run``; or OMG_GRADIO3_PYTHON / OMG_GRADIO4_PYTHON). Skipped, with the reason, when
that Python, Chromium or Playwright is missing.
"""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.gradio_venvs import gradio_python

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=[3, 4], ids=["gradio3", "gradio4"])
def page_url(request):
    python = gradio_python(request.param)
    if python is None:
        pytest.skip(f"no Python with gradio {request.param} (.venvs/gradio{request.param} or OMG_GRADIO{request.param}_PYTHON)")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    server = subprocess.Popen([python, str(Path(__file__).with_name("region_page.py")), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            if server.poll() is not None:
                pytest.fail(f"the gradio page exited: {server.stderr.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def _drag(page, canvas, start, end):
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + (start[0] + end[0]) / 2 * box["width"], box["y"] + (start[1] + end[1]) / 2 * box["height"], steps=3)
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=3)
    page.mouse.up()


def test_drawing_two_boxes_gives_their_regions(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(page_url, wait_until="domcontentloaded")  # gradio 3 asks for web fonts: no network here
            canvas = page.locator("#omg_regions_canvas canvas")
            canvas.wait_for(timeout=30000)
            page.locator("#omg_regions_canvas button[data-concept='1']").click()
            _drag(page, canvas, (0.1, 0.2), (0.4, 0.9))
            page.locator("#omg_regions_canvas button[data-concept='2']").click()
            _drag(page, canvas, (0.5, 0.05), (0.95, 0.6))
            page.locator("#echo_button").click()
            echo = page.locator("#echo textarea")
            page.wait_for_function("() => document.querySelector('#echo textarea').value.length > 0", timeout=15000)
            value = json.loads(echo.input_value())
        finally:
            browser.close()
    assert value["width"] == 512 and value["height"] == 512
    expected = {"1": [51, 102, 205, 461], "2": [256, 26, 486, 307]}
    for concept, box in expected.items():
        assert value["boxes"][concept] == pytest.approx(box, abs=2), value
