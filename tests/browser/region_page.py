"""A small gradio page with OMG's regions block and ``javascript/omg_regions.js``, for the browser test.

Run with a Python that has gradio (3.41 or 4.40): ``python region_page.py PORT``. The
"Echo" button sends the regions textbox's value through the gradio backend into
``#echo``, so the test reads what gradio itself received.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402

from omg_ext import ui  # noqa: E402

SCRIPT = (ROOT / "javascript" / "omg_regions.js").read_text()
ON_LOAD = "() => {" + SCRIPT + "}"
GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4

with gr.Blocks(**({"js": ON_LOAD} if GRADIO_4 else {})) as demo:
    regions = gr.Textbox(label="Regions", elem_id="omg_regions")
    ui.regions_block(regions, lambda image: '{"width": 8, "height": 8, "boxes": {"1": [0, 0, 4, 4]}}')
    echo = gr.Textbox(label="echo", elem_id="echo")
    gr.Button("Echo", elem_id="echo_button").click(fn=lambda value: value, inputs=[regions], outputs=[echo])
    if not GRADIO_4:
        demo.load(None, None, None, _js=ON_LOAD)

demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), prevent_thread_lock=False)
