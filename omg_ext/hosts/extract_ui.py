"""The "From pictures" part of the "OMG concepts" tab and ``POST /omg/concepts/extract``: an extraction as one
WebUI job (``concept_jobs``), stopped by the Interrupt before its next step, leaving no file.

The tab shows a progress bar over all rounds, then each round's masks over the first picture, the files
written, and a button that sends the new concepts to txt2img's OMG accordion through the host's own
"send to txt2img" (its infotext paste: the accordion's rows are filled from ``config.to_infotext``).
"""
from __future__ import annotations

import html
import json

import torch

from ..config import ConceptSpec, OmgConfig, to_infotext
from ..engine.masks import overlay
from ..masks.regions import parse_regions, scale_box
from ..picture_canvas import picture_canvas
from . import concept_jobs
from .errors import OmgUserError
from .extract_host import run_extract
from .extract_request import ExtractRequest
from .pictures import to_pil

INTERRUPTED = "OMG: the extraction was interrupted; nothing was written"
REGIONS_ID = "omg_extract_regions"
"""The textbox the first picture's canvas writes its boxes to (``javascript/omg_regions.js``)."""
ROWS = 4
"""Concept rows in the tab (the loop takes 1 to 4 concepts)."""


APP: dict = {}
"""The WebUI's FastAPI app, once started: Forge's API keeps an embedding list of its own, read again after a run."""


def extract_host():
    """This WebUI's side of an extraction."""
    from . import running_forge

    if running_forge():
        from .extract_forge import ForgeExtract

        return ForgeExtract(APP.get("app"))
    from .extract_a1111 import A1111Extract

    return A1111Extract()


def run_as_job(request: ExtractRequest, progress=lambda text, done: None):
    """``run_extract`` as the WebUI's current job, stopping at its Interrupt: (what was written, the extraction)."""
    return concept_jobs.run_as_job("omg_extract", "OMG extract", INTERRUPTED,
                                   lambda report, check: run_extract(extract_host(), request, report, check), progress)


def add_route(_demo, app) -> None:
    """``POST /omg/concepts/extract``: ``{"images": [base64…], "concepts": [{"name", "class_word", "boxes"}],
    "settings": {…}}``; answers what was written and each round's loss; a user's mistake answers 422."""
    from fastapi import Body

    APP["app"] = app

    def extract_endpoint(body: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's way of taking the JSON body
        return run_as_job(ExtractRequest.from_json(body))[0]

    app.add_api_route("/omg/concepts/extract", extract_endpoint, methods=["POST"])


def parse_boxes(text: str, pictures: int, what: str) -> list:
    """``x0 y0 x1 y1`` per picture, pictures separated by ';' (an empty part: no box in that picture)."""
    if not (text or "").strip():
        return []
    parts = text.split(";")
    if len(parts) > pictures:
        raise OmgUserError(f"{what}: {len(parts)} boxes for {pictures} pictures (separate pictures' boxes with ';')")
    boxes = []
    for part in parts:
        numbers = part.replace(",", " ").split()
        if numbers and len(numbers) != 4:
            raise OmgUserError(f"{what}: a box is four numbers 'x0 y0 x1 y1' in pixels, got {part.strip()!r}")
        boxes.append([float(n) for n in numbers] if numbers else None)
    return boxes


def paste_text(result: dict) -> str:
    """The new concepts as generation parameters for the host's "send to txt2img": a prompt naming them all, and
    the OMG accordion's rows (enabled, each concept's class word, prompt and LoRA)."""
    loras = result["loras"] or [""] * len(result["embeddings"])
    cfg = OmgConfig(enabled=True, concepts=[ConceptSpec(lora=lora, class_word=word, prompt=prompt)
                                            for lora, word, prompt in zip(loras, result["class_words"], result["concept_prompts"])])
    pairs = [f"{k}: {json.dumps(v) if isinstance(v, str) and (',' in v or ':' in v) else v}" for k, v in to_infotext(cfg).items()]
    return " and ".join(result["concept_prompts"]) + "\n" + ", ".join(pairs)


def round_pictures(extraction, picture) -> list:
    """Each round's masks over the first picture, captioned with the round's loss."""
    pixels = torch.from_numpy(__import__("numpy").asarray(picture, dtype="float32") / 255).permute(2, 0, 1)
    shown = []
    for r, result in enumerate(extraction.rounds):
        masks = torch.nn.functional.interpolate(result.masks[:1].float(), size=pixels.shape[-2:], mode="nearest")[0]
        caption = f"round {r}" + ("" if result.loss is None else f", loss {result.loss:.4f}")
        shown.append((to_pil(overlay(masks, pixels).clamp(0, 1)), caption))
    return shown


def uploaded_pictures(images) -> list:
    """The tab's uploads as pictures: gradio 3 hands over temporary files (``.name``), gradio 4 their paths."""
    from PIL import Image

    return [Image.open(getattr(item, "name", item)) for item in images or []]


def drawn_boxes(regions: str, size: tuple[int, int]) -> dict[int, list[float]]:
    """Concept row -> its box drawn on the first picture's canvas, in that picture's pixels."""
    if not (regions or "").strip():
        return {}
    try:
        drawn = parse_regions(regions, ROWS)
    except ValueError as e:
        raise OmgUserError(f"the boxes drawn on the first picture: {e}") from None
    return {j: list(scale_box(box, drawn.canvas_hw, (size[1], size[0]))) for j, box in drawn.boxes.items()}


def row_boxes(typed: str, drawn: list[float] | None, pictures: int, what: str) -> list:
    """A concept row's boxes: those typed (per picture), else the one drawn on the first picture."""
    boxes = parse_boxes(typed, pictures, what)
    return boxes or ([drawn] if drawn is not None else [])


def canvas_for(images) -> tuple[str, str]:
    """On a new upload: the canvas over the first picture, its drawn boxes cleared."""
    try:
        pictures = uploaded_pictures(images)
    except OSError:
        pictures = []
    return picture_canvas(REGIONS_ID, pictures[0] if pictures else None), ""


def extract_from_tab(images, regions, rounds, steps, vectors, learning_rate, lora, user_masks, *rows):
    """The tab's button (a generator): progress bar while it runs, then the masks, the files and the paste text."""
    try:
        pictures = uploaded_pictures(images)
        drawn = drawn_boxes(regions, pictures[0].size) if pictures else {}
        concepts = []
        for n in range(ROWS):
            name, word, boxes = rows[3 * n:3 * n + 3]
            if (name or "").strip() or (word or "").strip():
                concepts.append({"name": name, "class_word": word,
                                 "boxes": row_boxes(boxes, drawn.get(n), len(pictures), f"concept {n + 1}'s boxes")})
        request = ExtractRequest(pictures, concepts, dict(
            rounds=int(rounds), steps=int(steps), vectors=int(vectors), learning_rate=float(learning_rate),
            lora=bool(lora), user_masks=user_masks))
    except (OmgUserError, ValueError, OSError) as e:
        yield concept_jobs.error_html(e), [], ""
        return
    for bar, result, error in concept_jobs.streamed(lambda progress: run_as_job(request, progress)):
        if error is not None:
            yield concept_jobs.error_html(error), [], ""
        elif result is None:
            yield bar, [], ""
        else:
            written, extraction = result
            files = "".join(f"<li>{html.escape(f)}</li>" for f in written["files"])
            yield (f"Learnt {', '.join(html.escape(n) for n in written['embeddings'])} in {written['seconds']} s. "
                   f"Wrote:<ul>{files}</ul>Use them in a prompt as "
                   + ", ".join(f"<code>{html.escape(p)}</code>" for p in written["concept_prompts"])
                   + ", or send them to txt2img's OMG accordion with the button below.",
                   round_pictures(extraction, request.pictures()[0]), paste_text(written))


def extract_tab(gr) -> None:
    """The "From pictures" tab's components and events (inside the "OMG concepts" Blocks)."""
    from modules import shared

    from ..concepts.settings import USER_MASKS, ExtractSettings

    defaults = ExtractSettings()
    gr.Markdown("Learn each character of one to four pictures as an embedding and a small LoRA, with its "
                "mask, for OMG. Name each concept (its prompt word), give its class word (man, woman, dog…) and, "
                "if you like, draw its box on the first picture (pick the concept's number, then drag) or type a "
                "box per picture. The loaded checkpoint is used and left unchanged.")
    images = gr.File(label="Pictures of the same characters (1-4, one size)", file_count="multiple",
                     file_types=["image"], elem_id="omg_extract_images")
    canvas = gr.HTML(picture_canvas(REGIONS_ID), elem_id="omg_extract_canvas")
    regions = gr.Textbox(label="Boxes drawn on the first picture", elem_id=REGIONS_ID, lines=1)
    images.change(fn=canvas_for, inputs=[images], outputs=[canvas, regions])
    rows = []
    for n in range(1, ROWS + 1):
        with gr.Row():
            rows += [gr.Textbox(label=f"Concept {n}: name (a new word)", elem_id=f"omg_extract_name_{n}"),
                     gr.Textbox(label="Class word", elem_id=f"omg_extract_class_{n}"),
                     gr.Textbox(label="Or type a box per picture: 'x0 y0 x1 y1', pictures separated by ';'",
                                elem_id=f"omg_extract_boxes_{n}")]
    with gr.Row():
        rounds = gr.Number(value=defaults.rounds, precision=0, label="EM rounds")
        steps = gr.Number(value=defaults.steps, precision=0, label="Steps per round")
        vectors = gr.Number(value=defaults.vectors, precision=0, label="Vectors per concept")
        learning_rate = gr.Number(value=defaults.learning_rate, label="Learning rate")
        lora = gr.Checkbox(value=defaults.lora, label="Also a LoRA per concept")
        user_masks = gr.Dropdown(list(USER_MASKS), value=defaults.user_masks, label="Boxes are")
    with gr.Row():
        start = gr.Button("Extract", variant="primary", elem_id="omg_extract_start")
        stop = gr.Button("Interrupt")
    result = gr.HTML(elem_id="omg_extract_result")
    masks = gr.Gallery(label="Masks of each round", columns=4, height="auto", elem_id="omg_extract_masks")
    paste = gr.Textbox(label="The new concepts as generation parameters", lines=2, elem_id="omg_extract_paste")
    send = gr.Button("Send to txt2img's OMG", elem_id="omg_extract_send")
    register_send(send, paste)
    start.click(fn=extract_from_tab, inputs=[images, regions, rounds, steps, vectors, learning_rate, lora, user_masks, *rows],
                outputs=[result, masks, paste])
    stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])


def register_send(button, text) -> None:
    """The host's own "send to txt2img" for ``text``: its infotext paste fills the prompt and the OMG accordion."""
    try:
        from modules import infotext_utils as paste
    except ImportError:  # A1111 before 1.8 named it so
        from modules import generation_parameters_copypaste as paste
    paste.register_paste_params_button(paste.ParamBinding(paste_button=button, tabname="txt2img", source_text_component=text))
