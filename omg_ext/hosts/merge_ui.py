"""The "Merge LoRAs" part of the "OMG concepts" tab and ``POST /omg/concepts/merge``: a merge as one WebUI job
(``concept_jobs``), stopped by the Interrupt before the next recorded step or fitted layer, leaving no file."""
from __future__ import annotations

import html

from . import concept_jobs
from .errors import OmgUserError
from .loras import lora_names, lora_trigger_words, refresh_loras
from .merge_host import MergeRequest, merge_host, run_merge

INTERRUPTED = "OMG: the merge was interrupted; nothing was written"


def run_as_job(request: MergeRequest, progress=lambda text, done: None) -> dict:
    """``run_merge`` as the WebUI's current job, stopping at its Interrupt."""
    return concept_jobs.run_as_job("omg_merge", "OMG merge", INTERRUPTED, lambda report, check: run_merge(merge_host(), request, report, check),
                                   progress)


def add_route(_demo, app) -> None:
    """``POST /omg/concepts/merge`` with a JSON body of ``MergeRequest``'s fields; a user's mistake answers 422."""
    from fastapi import Body

    def merge_endpoint(body: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's way of taking the JSON body
        return run_as_job(MergeRequest.from_json(body))

    app.add_api_route("/omg/concepts/merge", merge_endpoint, methods=["POST"])


def _parse_lines(text: str, names: list[str], what: str, parse) -> list:
    """``name: value`` lines (any order) as one value per LoRA in ``names``; a LoRA left out gets None."""
    values = {}
    for line in text.splitlines():
        if line.strip():
            name, sep, value = line.partition(":")
            if not sep or name.strip() not in names:
                raise OmgUserError(f"the {what} line {line.strip()!r} must be 'LoRA name: {what}' for a picked LoRA")
            values[name.strip()] = parse(value.strip())
    return [values.get(name) for name in names]


def merge_from_tab(loras, triggers, weights, method, energy, steps, distil_steps, size, output):
    """The tab's button: the merge in a thread, its progress bar refreshed until it ends (a generator)."""
    try:
        request = MergeRequest(loras=list(loras or []), output=output, method=method, energy=float(energy), steps=int(steps),
                               distil_steps=int(distil_steps), size=int(size), triggers=[t or "" for t in _parse_lines(triggers, list(loras or []), "trigger", str)],
                               weights=[1.0 if w is None else w for w in _parse_lines(weights, list(loras or []), "weight", float)])
    except (OmgUserError, ValueError) as e:
        yield concept_jobs.error_html(e)
        return
    for bar, result, error in concept_jobs.streamed(lambda progress: run_as_job(request, progress)):
        if error is not None:
            yield concept_jobs.error_html(error)
        elif result is None:
            yield bar
        else:
            yield (f"Wrote <b>{html.escape(result['lora'])}</b> ({html.escape(result['file'])}): {result['layers']} layers, "
                   f"largest relative SVD error {result['largest relative error']}, {result['seconds']} s. Use it as "
                   f"<code>&lt;lora:{html.escape(result['lora'])}:1&gt;</code> with the triggers "
                   f"{html.escape(', '.join(result['triggers']))}.")


def merge_tab(gr) -> None:
    """The "Merge LoRAs" tab's components and events (inside the "OMG concepts" Blocks)."""
    from modules import shared

    from ..merge.fit import METHODS

    gr.Markdown("Merge 2–12 character LoRAs into one file (LoRACLR: each keeps its identity for its own trigger; "
                "`sum` is what loading them all at once does). The loaded checkpoint is used and left unchanged.")
    with gr.Row():
        loras = gr.Dropdown(lora_names(), multiselect=True, label="LoRAs to merge", elem_id="omg_merge_loras")
        refresh = gr.Button("Refresh the LoRA list")
    with gr.Row():
        triggers = gr.Textbox(label="Trigger prompt per LoRA ('name: trigger', prefilled from the LoRA's metadata)", lines=4,
                              elem_id="omg_merge_triggers")
        weights = gr.Textbox(label="Weight per LoRA ('name: 0.8'; 1 where left out)", lines=4)
    with gr.Row():
        method = gr.Dropdown(list(METHODS), value="distil", label="Method")
        energy = gr.Slider(0.5, 1.0, value=0.99, step=0.005, label="Energy kept by the saved LoRA (sets its rank)")
        steps = gr.Number(value=100, precision=0, label="Steps per layer (loraclr)")
        distil_steps = gr.Number(value=MergeRequest.distil_steps, precision=0, label="Training steps (distil)")
        size = gr.Number(value=512, precision=0, label="Picture size while recording (px)")
    output = gr.Textbox(label="Name of the merged LoRA (a new file in the LoRA folder)", elem_id="omg_merge_output")
    with gr.Row():
        start = gr.Button("Merge", variant="primary", elem_id="omg_merge_start")
        stop = gr.Button("Interrupt")
    result = gr.HTML(elem_id="omg_merge_result")
    refresh.click(fn=lambda: (refresh_loras(), gr.update(choices=lora_names()))[1], inputs=[], outputs=[loras])
    loras.change(fn=lambda picked: "\n".join(f"{name}: {lora_trigger_words(name)}" for name in picked or []),
                 inputs=[loras], outputs=[triggers])
    start.click(fn=merge_from_tab, inputs=[loras, triggers, weights, method, energy, steps, distil_steps, size, output], outputs=[result])
    stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
