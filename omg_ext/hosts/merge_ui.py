"""The "OMG concepts" tab ("Merge LoRAs") and ``POST /omg/concepts/merge``: a merge as one WebUI job.

A merge holds the WebUI's queue lock (no generation runs beside it on the same model) and the host's job
state: the console and ``/sdapi/v1/progress`` show its step, and the WebUI's Interrupt (or the tab's) stops it
before the next recorded step or fitted layer, leaving no file. The tab shows a progress bar while it runs.
"""
from __future__ import annotations

import html
import threading

from .errors import OmgUserError
from .loras import lora_names, lora_trigger_words, refresh_loras
from .merge_host import MergeRequest, run_merge

INTERRUPTED = "OMG: the merge was interrupted; nothing was written"


def run_as_job(request: MergeRequest, progress=lambda text, done: None) -> dict:
    """``run_merge`` under the queue lock, as the host's current job, stopping at its Interrupt."""
    from modules import call_queue, shared

    def check() -> None:
        if shared.state.interrupted:
            raise OmgUserError(INTERRUPTED)

    def report(text: str, done: float) -> None:
        shared.state.textinfo = f"OMG merge: {text}"
        shared.state.sampling_step, shared.state.sampling_steps = round(done * 100), 100
        progress(text, done)

    with call_queue.queue_lock:
        shared.state.begin(job="omg_merge")
        try:
            return run_merge(request, report, check)
        finally:
            shared.state.end()


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


def progress_bar(text: str, done: float) -> str:
    return f"<progress value='{done:.3f}' max='1' style='width:100%'></progress><div>{html.escape(text)}</div>"


def merge_from_tab(loras, triggers, weights, method, energy, steps, size, output):
    """The tab's button: the merge in a thread, its progress bar refreshed until it ends (a generator)."""
    state = {"text": "waiting for the WebUI's current job", "done": 0.0}
    try:
        request = MergeRequest(loras=list(loras or []), output=output, method=method, energy=float(energy), steps=int(steps),
                               size=int(size), triggers=[t or "" for t in _parse_lines(triggers, list(loras or []), "trigger", str)],
                               weights=[1.0 if w is None else w for w in _parse_lines(weights, list(loras or []), "weight", float)])
    except (OmgUserError, ValueError) as e:
        yield f"<div class='error'>{html.escape(str(e))}</div>"
        return

    def work():
        try:
            state["result"] = run_as_job(request, lambda text, done: state.update(text=text, done=done))
        except Exception as e:  # noqa: BLE001 - shown in the tab, as the WebUI shows a job's error
            state["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        yield progress_bar(state["text"], state["done"])
        thread.join(0.5)
    if "error" in state:
        yield f"<div class='error'>{html.escape(str(state['error']))}</div>"
        return
    result = state["result"]
    yield (f"Wrote <b>{html.escape(result['lora'])}</b> ({html.escape(result['file'])}): {result['layers']} layers, largest "
           f"relative SVD error {result['largest relative error']}, {result['seconds']} s. Use it as "
           f"<code>&lt;lora:{html.escape(result['lora'])}:1&gt;</code> with the triggers "
           f"{html.escape(', '.join(result['triggers']))}.")


def tab():
    """``on_ui_tabs``: the "OMG concepts" tab with its "Merge LoRAs" part."""
    import gradio as gr
    from modules import shared

    from ..merge.fit import METHODS

    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Tab("Merge LoRAs"):
            gr.Markdown("Merge 2–12 character LoRAs into one file (LoRACLR: each keeps its identity for its own trigger; "
                        "`sum` is what loading them all at once does). The loaded checkpoint is used and left unchanged.")
            with gr.Row():
                loras = gr.Dropdown(lora_names(), multiselect=True, label="LoRAs to merge", elem_id="omg_merge_loras")
                refresh = gr.Button("Refresh the LoRA list")
            with gr.Row():
                triggers = gr.Textbox(label="Trigger prompt per LoRA ('name: trigger', prefilled from the LoRA's metadata)", lines=4)
                weights = gr.Textbox(label="Weight per LoRA ('name: 0.8'; 1 where left out)", lines=4)
            with gr.Row():
                method = gr.Dropdown(list(METHODS), value="loraclr", label="Method")
                energy = gr.Slider(0.5, 1.0, value=0.99, step=0.005, label="Energy kept by the saved LoRA (sets its rank)")
                steps = gr.Number(value=100, precision=0, label="Steps per layer (loraclr)")
                size = gr.Number(value=512, precision=0, label="Picture size while recording (px)")
            output = gr.Textbox(label="Name of the merged LoRA (a new file in the LoRA folder)")
            with gr.Row():
                start = gr.Button("Merge", variant="primary")
                stop = gr.Button("Interrupt")
            result = gr.HTML()
        refresh.click(fn=lambda: (refresh_loras(), gr.update(choices=lora_names()))[1], inputs=[], outputs=[loras])
        loras.change(fn=lambda picked: "\n".join(f"{name}: {lora_trigger_words(name)}" for name in picked or []),
                     inputs=[loras], outputs=[triggers])
        start.click(fn=merge_from_tab, inputs=[loras, triggers, weights, method, energy, steps, size, output], outputs=[result])
        stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    return [(blocks, "OMG concepts", "omg_concepts")]
