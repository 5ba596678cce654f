"""A training tool's run (a merge, an extraction) as one WebUI job, and its progress shown in a tab.

The run holds the WebUI's queue lock (no generation runs beside it on the same model) and the host's job state:
the console and ``/sdapi/v1/progress`` show its step, and the WebUI's Interrupt (or the tab's) stops it at its
next check with a message, leaving no file.
"""
from __future__ import annotations

import html
import threading
from typing import Callable, Iterator

from .errors import OmgUserError


def run_as_job(job: str, label: str, interrupted: str, work: Callable, progress=lambda text, done: None):
    """``work(report, check)`` under the queue lock as the host's current job; ``check`` raises ``interrupted``."""
    from modules import call_queue, shared

    def check() -> None:
        if shared.state.interrupted:
            raise OmgUserError(interrupted)

    def report(text: str, done: float) -> None:
        shared.state.textinfo = f"{label}: {text}"
        shared.state.sampling_step, shared.state.sampling_steps = round(done * 100), 100
        progress(text, done)

    with call_queue.queue_lock:
        shared.state.begin(job=job)
        try:
            return work(report, check)
        finally:
            shared.state.end()


def progress_bar(text: str, done: float) -> str:
    return f"<progress value='{done:.3f}' max='1' style='width:100%'></progress><div>{html.escape(text)}</div>"


def error_html(error: Exception) -> str:
    return f"<div class='error'>{html.escape(str(error))}</div>"


def streamed(run: Callable[[Callable[[str, float], None]], object]) -> Iterator[tuple[str, object, Exception | None]]:
    """``run(progress)`` in a thread: yields (progress bar, None, None) while it runs, then ("", result, error)."""
    state = {"text": "waiting for the WebUI's current job", "done": 0.0}

    def work():
        try:
            state["result"] = run(lambda text, done: state.update(text=text, done=done))
        except Exception as e:  # noqa: BLE001 - shown in the tab, as the WebUI shows a job's error
            state["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        yield progress_bar(state["text"], state["done"]), None, None
        thread.join(0.5)
    yield "", state.get("result"), state.get("error")
