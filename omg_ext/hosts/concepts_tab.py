"""The "OMG concepts" tab (``on_ui_tabs``): "From pictures" (extraction) and "Merge LoRAs"."""
from __future__ import annotations


def concepts_tab():
    """The ``on_ui_tabs`` callback."""
    def tab():
        import gradio as gr

        from .extract_ui import extract_tab
        from .merge_ui import merge_tab

        with gr.Blocks(analytics_enabled=False) as blocks:
            with gr.Tab("From pictures"):
                extract_tab(gr)
            with gr.Tab("Merge LoRAs"):
                merge_tab(gr)
        return [(blocks, "OMG concepts", "omg_concepts")]
    return tab
