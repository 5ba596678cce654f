"""The accordion, built from the settings tables; gradio 3.41 (A1111) and 4.40 (Forge) alike.

Components are returned in ``config.to_args`` order, so the positional values the WebUI
passes back parse with ``config.from_args``; ``infotext_fields`` pairs each component with
its infotext name from the same tables, so "Send to txt2img" restores the accordion.
"""
from __future__ import annotations

from typing import Callable

import gradio as gr

from .config import (CHOICES, CONCEPT_FIELDS, FIELDS, MAX_CONCEPTS, MAX_CONTROL_UNIT, NO_CONTROL_UNIT, ConceptSpec, OmgConfig,
                     prefill_prompt)

DEFAULTS = OmgConfig()


def _component(field, value, lora_choices: list[str], prefix: str = "omg"):
    """``prefix``: the elements' id prefix, one per WebUI tab (``omg`` in txt2img, ``omg_img2img`` in img2img)."""
    if field.attr in ("blend_start", "self_attention_until"):
        return gr.Slider(0.0, 1.0, value=value, step=0.01, label=field.label)
    if field.attr in ("mask_dilation", "mask_feather"):
        return gr.Slider(0, 256, value=value, step=1, label=field.label)
    if field.attr in CHOICES:
        return gr.Dropdown(list(CHOICES[field.attr]), value=value, label=field.label, elem_id=f"{prefix}_{field.attr}")
    if field.attr == "regions":
        return gr.Textbox(value=value, label=field.label, elem_id=f"{prefix}_regions", lines=1)
    if field.attr in ("unet_weight", "te_weight"):
        return gr.Slider(-2.0, 2.0, value=value, step=0.05, label=field.label)
    if field.attr == "lora":
        return gr.Dropdown(["", *lora_choices], value="", label=field.label)
    if field.attr == "lora_hash":
        return gr.Textbox(value="", visible=False, label=field.label)
    if field.attr == "control_unit":  # a number, not a dropdown of pairs: gradio 3.41 (reForge, Forge Classic) has none
        return gr.Number(value=value, precision=0, minimum=NO_CONTROL_UNIT, maximum=MAX_CONTROL_UNIT,
                         label=f"{field.label} (-1: none)")
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=field.label)
    return gr.Textbox(value=value, label=field.label, lines=2 if "prompt" in field.attr else 1)


def _add(field, infotext: list, by_attr: dict, prefix: str):
    comp = by_attr[field.attr] = _component(field, getattr(DEFAULTS, field.attr), [], prefix)
    infotext.append((comp, field.infotext))
    return comp


def model_status_line(by_attr: dict, model_status: Callable[[str, str, str], str], prefix: str) -> None:
    """A line saying which model files the picked mask source needs and where they are (or go)."""
    inputs = [by_attr["mask_source"], by_attr["sam_model"], by_attr["detector"]]
    line = gr.Markdown(model_status(DEFAULTS.mask_source, DEFAULTS.sam_model, DEFAULTS.detector), elem_id=f"{prefix}_model_status")
    for comp in inputs:
        comp.change(fn=model_status, inputs=inputs, outputs=[line])


def regions_block(regions_box, image_to_regions: Callable, free_models: Callable | None = None, prefix: str = "omg",
                  tab: str = "txt2img") -> None:
    """The drawing canvas (``javascript/omg_regions.js`` fills ``#<prefix>_regions_canvas``, the shape of ``tab``'s
    width and height), the mask image upload (turned into the regions text) and the button that frees the mask models."""
    gr.HTML(f'<div id="{prefix}_regions_canvas" class="omg-regions-canvas" data-textbox="{prefix}_regions" data-tab="{tab}" '
            'data-width="512" data-height="512"></div>', elem_id=f"{prefix}_regions_html")
    with gr.Row():
        upload = gr.Image(label="Or upload a mask image (concept 1 red, 2 blue, 3 green, 4 yellow, 5 purple)",
                          type="numpy", elem_id=f"{prefix}_mask_image")
        if free_models is not None:
            gr.Button("Free OMG mask models", elem_id=f"{prefix}_free_models").click(fn=free_models, inputs=[], outputs=[])
    def uploaded(image, text):
        if image is None:
            return text
        try:
            return image_to_regions(image)
        except ValueError as e:  # a colour that is no concept's: say which
            raise gr.Error(str(e)) from e

    upload.change(fn=uploaded, inputs=[upload, regions_box], outputs=[regions_box])


def build(enable_accordion: Callable, lora_choices: Callable[[], list[str]],
          refresh_button: Callable[[object, int], None], prompt_box=None,
          trigger_words: Callable[[str], str] = lambda name: "",
          image_to_regions: Callable = lambda image: "", free_models: Callable | None = None,
          model_status: Callable[[str, str, str], str] | None = None, tab: str = "txt2img") -> tuple[list, list]:
    """The accordion's components (``to_args`` order) and (component, infotext name) pairs.

    ``refresh_button(dropdown, n)`` adds the host's refresh button beside concept n's LoRA
    list; picking a LoRA fills an empty concept prompt from ``prompt_box`` (the global
    prompt) and the LoRA's ``trigger_words``; ``model_status(source, sam model, detector)``
    says which model files the mask source needs. ``tab``: the WebUI tab it is built in (``txt2img`` or
    ``img2img``), which prefixes its elements' ids.
    """
    prefix = "omg" if tab == "txt2img" else f"omg_{tab}"
    components, infotext, by_attr = [], [], {}
    enabled = enable_accordion(FIELDS[0].label)
    components.append(enabled)
    infotext.append((enabled, FIELDS[0].infotext))
    with enabled:
        with gr.Row():  # shown first, passed last (``to_args`` order)
            mode = _add(FIELDS[13], infotext, by_attr, prefix)
            guidance = _add(FIELDS[14], infotext, by_attr, prefix)
            background = _add(FIELDS[15], infotext, by_attr, prefix)
        with gr.Row():
            components += [_add(field, infotext, by_attr, prefix) for field in FIELDS[1:5]]
        with gr.Row():
            components += [_add(field, infotext, by_attr, prefix) for field in FIELDS[5:9]]
            show_layout = _add(FIELDS[17], infotext, by_attr, prefix)  # beside "show masks", passed last
        with gr.Accordion("Mask sources: Segment Anything, detector, drawn regions", open=False):
            with gr.Row():
                for field in FIELDS[9:12]:
                    components.append(_add(field, infotext, by_attr, prefix))
                mask_split = _add(FIELDS[16], infotext, by_attr, prefix)  # passed last
            if model_status is not None:
                model_status_line(by_attr, model_status, prefix)
            regions_box = _add(FIELDS[12], infotext, by_attr, prefix)
            components.append(regions_box)
            regions_block(regions_box, image_to_regions, free_models, prefix, tab)
        components += [mode, guidance, background, mask_split, show_layout]
        choices = lora_choices()
        for n in range(1, MAX_CONCEPTS + 1):
            with gr.Accordion(f"Concept {n}", open=n <= 2):
                with gr.Row():
                    row = {}
                    for field in CONCEPT_FIELDS:
                        row[field.attr] = comp = _component(field, getattr(ConceptSpec(), field.attr), choices, prefix)
                        if field.attr == "lora":
                            refresh_button(comp, n)
                        components.append(comp)
                        infotext.append((comp, field.infotext.format(n=n)))
                if prompt_box is not None:
                    row["lora"].change(
                        fn=lambda name, prompt, current: current or prefill_prompt(prompt, trigger_words(name) if name else ""),
                        inputs=[row["lora"], prompt_box, row["prompt"]], outputs=[row["prompt"]])
    return components, infotext
