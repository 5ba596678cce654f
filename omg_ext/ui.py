"""The accordion, built from the settings tables; gradio 3.41 (A1111) and 4.40 (Forge) alike.

Components are returned in ``config.to_args`` order, so the positional values the WebUI
passes back parse with ``config.from_args``; ``infotext_fields`` pairs each component with
its infotext name from the same tables, so "Send to txt2img" restores the accordion.
"""
from __future__ import annotations

from typing import Callable

import gradio as gr

from .config import CONCEPT_FIELDS, FIELDS, MASK_SOURCES, MAX_CONCEPTS, ConceptSpec, OmgConfig, prefill_prompt

DEFAULTS = OmgConfig()


def _component(field, value, lora_choices: list[str]):
    if field.attr in ("blend_start", "self_attention_until"):
        return gr.Slider(0.0, 1.0, value=value, step=0.01, label=field.label)
    if field.attr in ("mask_dilation", "mask_feather"):
        return gr.Slider(0, 256, value=value, step=1, label=field.label)
    if field.attr == "mask_source":
        return gr.Dropdown(list(MASK_SOURCES), value=value, label=field.label)
    if field.attr in ("unet_weight", "te_weight"):
        return gr.Slider(-2.0, 2.0, value=value, step=0.05, label=field.label)
    if field.attr == "lora":
        return gr.Dropdown(["", *lora_choices], value="", label=field.label)
    if field.attr == "lora_hash":
        return gr.Textbox(value="", visible=False, label=field.label)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=field.label)
    return gr.Textbox(value=value, label=field.label, lines=2 if "prompt" in field.attr else 1)


def build(enable_accordion: Callable, lora_choices: Callable[[], list[str]],
          refresh_button: Callable[[object, int], None], prompt_box=None,
          trigger_words: Callable[[str], str] = lambda name: "") -> tuple[list, list]:
    """The accordion's components (``to_args`` order) and (component, infotext name) pairs.

    ``refresh_button(dropdown, n)`` adds the host's refresh button beside concept n's LoRA
    list; picking a LoRA fills an empty concept prompt from ``prompt_box`` (the global
    prompt) and the LoRA's ``trigger_words``.
    """
    components, infotext = [], []
    enabled = enable_accordion(FIELDS[0].label)
    components.append(enabled)
    infotext.append((enabled, FIELDS[0].infotext))
    with enabled:
        for row in (FIELDS[1:5], FIELDS[5:]):
            with gr.Row():
                for field in row:
                    comp = _component(field, getattr(DEFAULTS, field.attr), [])
                    components.append(comp)
                    infotext.append((comp, field.infotext))
        choices = lora_choices()
        for n in range(1, MAX_CONCEPTS + 1):
            with gr.Accordion(f"Concept {n}", open=n <= 2):
                with gr.Row():
                    row = {}
                    for field in CONCEPT_FIELDS:
                        row[field.attr] = comp = _component(field, getattr(ConceptSpec(), field.attr), choices)
                        if field.attr == "lora":
                            refresh_button(comp, n)
                        components.append(comp)
                        infotext.append((comp, field.infotext.format(n=n)))
                if prompt_box is not None:
                    row["lora"].change(
                        fn=lambda name, prompt, current: current or prefill_prompt(prompt, trigger_words(name) if name else ""),
                        inputs=[row["lora"], prompt_box, row["prompt"]], outputs=[row["prompt"]])
    return components, infotext
