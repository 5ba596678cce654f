"""Shims of the host's script API where A1111 versions and the Forge family differ, shared by every adapter:
named callbacks, the progress bar's job count, and failing a job with a message."""
from __future__ import annotations

import inspect

from .errors import OmgUserError


def add_callback(register, callback, name: str) -> None:
    """A host callback, named where the host's ``on_…`` takes a name (A1111 1.8+, Forge, reForge);
    Forge Classic's older script API does not."""
    if "name" in inspect.signature(register).parameters:
        register(callback, name=name)
    else:
        register(callback)


def add_progress_job(steps: int) -> None:
    """OMG's pass 1 as one more job of ``steps`` steps: in the WebUI's progress bar and ETA
    (``state.job_count``; the host moves to the next job after it) and in the console's total bar,
    whose total the host set from the job count before (for hires fix, or from the first step on)."""
    from modules import shared

    shared.state.job_count += 1
    bar = getattr(shared.total_tqdm, "_tqdm", None)
    if bar is not None:
        bar.total += steps
        bar.refresh()


def fail_job(p, message: str) -> None:
    """Make the job fail with ``message`` when it starts sampling (UI and API show it)."""
    def sample(*args, **kwargs):
        raise OmgUserError(message)
    p.sample = sample
