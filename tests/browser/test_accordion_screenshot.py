"""The accordion as the hosts' gradio renders it (3.41: A1111, reForge, Forge Classic; 4.40: Forge), open, in
headless Chromium: it shows its settings and concept rows. With OMG_SCREENSHOT_DIR set, the picture is saved
there, small, as the README's ``docs/ui/accordion_gradio{3,4}.png``:

    OMG_SCREENSHOT_DIR=docs/ui python -m pytest tests/browser/test_accordion_screenshot.py
"""
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.browser.pages import browser_page, served_page

ROOT = Path(__file__).resolve().parents[2]


def small_png(png: bytes, width: int = 640) -> bytes:
    """A screenshot at ``width`` pixels wide in at most 64 colours: a few tens of KB for the repository."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    out = io.BytesIO()
    image.quantize(64).save(out, "PNG", optimize=True)
    return out.getvalue()


@pytest.mark.parametrize("version", [3, 4], ids=["gradio3", "gradio4"])
def test_the_open_accordion_shows_its_settings_and_concept_rows(version, tmp_path):
    script = tmp_path / "accordion_dump.py"  # a copy: gradio 4 writes a .pyi beside it
    shutil.copy(Path(__file__).with_name("accordion_dump.py"), script)
    with served_page(version, script, str(ROOT)) as url, browser_page(url, viewport=(900, 1200)) as page:
        accordion = page.locator("#omg")
        page.get_by_text("Blend start (fraction of steps)").first.wait_for(timeout=60000)
        text = accordion.inner_text()
        png = accordion.screenshot()
    for label in ("OMG multi-concept", "Blend start (fraction of steps)", "Mode", "Concept 1", "Concept 2", "Class word in the prompt"):
        assert label in text, label
    picture = Image.open(io.BytesIO(png))
    assert picture.width > 400 and picture.height > 400 and len(set(picture.convert("L").getdata())) > 8  # drawn, not blank
    folder = os.environ.get("OMG_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"accordion_gradio{version}.png").write_bytes(small_png(png))
