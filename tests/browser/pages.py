"""A gradio page served by one of the hosts' gradio Pythons, and headless Chromium to look at it: what the
region canvas test and the accordion screenshot share. Each skips, saying why, when its gradio Python,
Chromium or Playwright is missing."""
import contextlib
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


@contextlib.contextmanager
def served_page(version: int, script: Path, *args: str):
    """The URL of ``script`` (its last argument the port) run with gradio ``version``'s Python on loopback."""
    python = gradio_python(version)
    if python is None:
        pytest.skip(f"no Python with gradio {version} (.venvs/gradio{version} or OMG_GRADIO{version}_PYTHON)")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    server = subprocess.Popen([python, str(script), *args, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
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


@contextlib.contextmanager
def browser_page(url: str, viewport=(1200, 1000)):
    """A headless Chromium page at ``url`` (no network: gradio 3's web fonts are not waited for)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()
