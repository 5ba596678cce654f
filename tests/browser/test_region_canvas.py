"""The region canvas in a real headless Chromium against a small gradio page, on gradio 3.41 and 4.40.

Each gradio version runs from its own Python (``.venvs/gradio3``, ``.venvs/gradio4``, made
by ``.ci/run``; or OMG_GRADIO3_PYTHON / OMG_GRADIO4_PYTHON). Skipped, with the reason, when
that Python, Chromium or Playwright is missing.
"""
import json
from pathlib import Path

import pytest

from tests.browser.pages import browser_page, served_page


@pytest.fixture(params=[3, 4], ids=["gradio3", "gradio4"])
def page_url(request):
    with served_page(request.param, Path(__file__).with_name("region_page.py")) as url:
        yield url


def _drag(page, canvas, start, end):
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + (start[0] + end[0]) / 2 * box["width"], box["y"] + (start[1] + end[1]) / 2 * box["height"], steps=3)
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=3)
    page.mouse.up()


def test_drawing_two_boxes_gives_their_regions(page_url):
    with browser_page(page_url) as page:
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
    assert value["width"] == 512 and value["height"] == 512
    expected = {"1": [51, 102, 205, 461], "2": [256, 26, 486, 307]}
    for concept, box in expected.items():
        assert value["boxes"][concept] == pytest.approx(box, abs=2), value


@pytest.fixture(params=[3, 4], ids=["gradio3", "gradio4"])
def picture_page_url(request):
    with served_page(request.param, Path(__file__).with_name("picture_canvas_page.py")) as url:
        yield url


def test_a_box_drawn_on_the_extraction_pictures_canvas_is_in_the_pictures_pixels(picture_page_url):
    """The extraction tab's canvas: the picture (96x64) under the boxes, a box in its pixels in its own textbox."""
    with browser_page(picture_page_url) as page:
        canvas = page.locator("#omg_extract_canvas canvas")
        canvas.wait_for(timeout=30000)
        page.wait_for_function("() => { const c = document.querySelector('#omg_extract_canvas canvas');"
                               " return c.getContext('2d').getImageData(5, 5, 1, 1).data[0] > 200; }", timeout=15000)
        colours = page.evaluate("() => { const c = document.querySelector('#omg_extract_canvas canvas'); const x = c.getContext('2d');"
                                " return [Array.from(x.getImageData(5, c.height / 2, 1, 1).data),"
                                " Array.from(x.getImageData(c.width - 5, c.height / 2, 1, 1).data), c.width, c.height]; }")
        page.locator("#omg_extract_canvas button[data-concept='2']").click()
        _drag(page, canvas, (0.5, 0.25), (1.0, 1.0))
        page.locator("#echo_button").click()
        page.wait_for_function("() => document.querySelector('#echo textarea').value.length > 0", timeout=15000)
        value = json.loads(page.locator("#echo textarea").input_value())
    left, right, width, height = colours
    assert left[:3] == [255, 0, 0] and right[:3] == [0, 0, 255]  # the picture drawn, left red, right blue
    assert width / height == pytest.approx(96 / 64, rel=0.02)
    assert value["width"] == 96 and value["height"] == 64 and list(value["boxes"]) == ["2"]
    assert value["boxes"]["2"] == pytest.approx([48, 16, 96, 64], abs=1)
