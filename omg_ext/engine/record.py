"""The pass-1 record: what pass 2 replays and uses as its layout reference.

Pass 2 runs the same sampler with the same seed and noise, so its k-th UNet call
corresponds to pass 1's k-th call. Before the blend start, a pass-2 call whose input
equals the recorded input gets the recorded output back without running the UNet. From
the blend start on, the recorded input of the same call is the reference row's latent.

The blend start, a fraction of the steps, becomes a timestep here: the timestep of the
call at that fraction of pass 1's calls. That needs no knowledge of the sampler: every
sampler evaluates the same number of times per step, however many that is, so a
fraction of the calls is the same fraction of the steps. Outputs of the calls from the
blend start on are dropped when pass 2 starts: pass 2 never replays them.

A call may also keep its cond rows' cross-attention outputs (``layout.LayoutOutputs``): pass 2's
layout reference without a reference row. They are kept up to ``layout_limit`` bytes, the
latest calls first (the blended calls are the late ones): a call without them gets a
reference row in pass 2.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .layout import LayoutOutputs


def first_blended(fraction: float, steps: int) -> int:
    """Index of the first blended step of ``steps``: ``fraction · steps`` rounded half up, the same in both
    modes (Python's ``round`` rounds 10.5 to 10, which would start fast mode a step before two passes)."""
    return math.floor(fraction * steps + 0.5)


def threshold(timesteps: Sequence[float], fraction: float) -> float:
    """The timestep from which on calls belong to the last ``1 - fraction`` of ``timesteps``
    (the calls' timesteps in order, falling).

    Fraction 0 gives +inf (every call is at or below it), 1 gives -inf (none is).
    """
    start = first_blended(fraction, len(timesteps))
    if start >= len(timesteps):
        return -math.inf
    return math.inf if start <= 0 else float(timesteps[start])


@dataclass
class RecordedCall:
    x: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor | None
    layout: LayoutOutputs | None = None
    """Pass 1's cross-attention outputs of the call's cond rows, if kept."""

    def replays(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        """The cheap check that lets the recorded output stand in for a UNet call: same input, same time."""
        return self.out is not None and self.same_time(x, t) and torch.equal(x, self.x)

    def same_time(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        return x.shape == self.x.shape and torch.equal(t, self.t)


def _nbytes(call: RecordedCall) -> int:
    return sum(t.numel() * t.element_size() for t in (call.x, call.t, call.out) if t is not None) + (
        call.layout.nbytes if call.layout is not None else 0)


@dataclass
class PassRecord:
    calls: list[RecordedCall] = field(default_factory=list)

    peak_nbytes: int = 0
    """The most the record held (at the end of pass 1), for the benchmark and the log."""
    layout_limit: int | None = None
    """The most bytes of kept cross-attention outputs (None: no limit)."""
    layout_nbytes: int = 0
    _next: int = 0

    def add(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None,
            layout: LayoutOutputs | None = None) -> None:
        call = RecordedCall(x.clone(), t.clone(), None if out is None else out.clone(), layout)
        self.calls.append(call)
        self.peak_nbytes += _nbytes(call)  # the record only grows until pass 2 drops outputs
        if layout is not None:
            self.layout_nbytes += layout.nbytes
            self._fit_layout()

    def _fit_layout(self) -> None:
        """Drop the earliest calls' kept outputs until the rest fit the limit."""
        for call in self.calls:
            if self.layout_limit is None or self.layout_nbytes <= self.layout_limit:
                return
            if call.layout is not None:
                self.layout_nbytes -= call.layout.nbytes
                call.layout = None

    def threshold(self, fraction: float) -> float:
        """The timestep from which on calls belong to the last ``1 - fraction`` of the calls."""
        return threshold([float(c.t.max()) for c in self.calls], fraction)

    def drop_outputs_from(self, threshold: float, keep_blended: bool = False) -> None:
        """Free what pass 2 will not use: the outputs of the calls it computes anyway (at or below
        the blend start; kept with ``keep_blended``, where they are its background) and the kept
        attention outputs of the calls it replays."""
        for call in self.calls:
            if float(call.t.max()) <= threshold:
                if not keep_blended:
                    call.out = None
            elif call.layout is not None:  # replayed, never blended: its outputs are not needed
                self.layout_nbytes -= call.layout.nbytes
                call.layout = None

    def start_replay(self) -> None:
        """Pass 2 starts: its next call corresponds to pass 1's first."""
        self._next = 0

    def next_call(self, x: torch.Tensor, t: torch.Tensor) -> RecordedCall | None:
        """The recorded call corresponding to pass 2's current one, if the two are still in step.

        None past the record or once the calls diverge (another shape or time): then
        there is nothing to replay and no reference.
        """
        index, self._next = self._next, self._next + 1
        recorded = self.calls[index] if index < len(self.calls) else None
        return recorded if recorded is not None and recorded.same_time(x, t) else None

    def latent_hw(self) -> tuple[int, int]:
        if not self.calls:
            raise RuntimeError("OMG: pass 1 made no UNet call")
        return tuple(self.calls[0].x.shape[-2:])
