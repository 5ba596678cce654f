"""A small gradio page with the extraction tab's canvas over a picture (``omg_ext.picture_canvas``) and
``javascript/omg_regions.js``, for the browser test: a 96x64 picture, red on its left half, blue on its right.

Run with a Python that has gradio (3.41 or 4.40): ``python picture_canvas_page.py PORT``. The "Echo" button
sends the boxes textbox's value through the gradio backend into ``#echo``.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from omg_ext.picture_canvas import picture_canvas  # noqa: E402

SCRIPT = (ROOT / "javascript" / "omg_regions.js").read_text()
ON_LOAD = "() => {" + SCRIPT + "}"
GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4
PICTURE = Image.new("RGB", (96, 64), (255, 0, 0))
PICTURE.paste((0, 0, 255), (48, 0, 96, 64))

with gr.Blocks(**({"js": ON_LOAD} if GRADIO_4 else {})) as demo:
    gr.HTML(picture_canvas("omg_extract_regions", PICTURE), elem_id="omg_extract_canvas")
    boxes = gr.Textbox(label="Boxes drawn on the first picture", elem_id="omg_extract_regions")
    echo = gr.Textbox(label="echo", elem_id="echo")
    gr.Button("Echo", elem_id="echo_button").click(fn=lambda value: value, inputs=[boxes], outputs=[echo])
    if not GRADIO_4:
        demo.load(None, None, None, _js=ON_LOAD)

demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), prevent_thread_lock=False)
