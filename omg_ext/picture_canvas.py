"""The region canvas over a picture (``javascript/omg_regions.js`` draws on it): the extraction tab's way of
drawing each concept's box on the first picture. Plain HTML, so the browser tests build it without torch."""
from __future__ import annotations

import base64
import io

def picture_canvas(textbox_id: str, picture=None) -> str:
    """The region canvas's HTML for drawing each concept's box on ``picture`` (a PIL image, shown under the
    boxes, which are in its pixels) into the textbox ``textbox_id``; an empty 512x512 canvas without one."""
    width, height = picture.size if picture is not None else (512, 512)
    shown = ""
    if picture is not None:
        small = picture.convert("RGB")
        small.thumbnail((640, 640))
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        shown = f'<img alt="" style="display:none" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    return (f'<div class="omg-regions-canvas" data-textbox="{textbox_id}" data-fixed="1" data-width="{width}" '
            f'data-height="{height}">{shown}</div>')
