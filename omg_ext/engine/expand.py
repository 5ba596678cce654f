"""The expanded batch of pass 2: which rows one host call becomes, how they are chunked, and the blend.

For a host call with rows ``0..R-1`` the expanded batch holds
- the host rows themselves (global prompt, the host's own LoRAs only);
- per host cond row, a *reference* row: the pass-1 latent of this call with the same
  conditioning; its output is discarded, its attention probabilities replace the
  host row's (layout preservation);
- per concept and host row, a *concept* row: the host row's latent with the concept's
  cond (for cond rows) or uncond (for uncond rows) conditioning and the concept's LoRA.

Rows run in as few UNet calls as possible: rows whose conditioning has different shapes
(prompts of different token lengths) cannot share a call, a reference row must share
its call with its host row, and a row limit bounds memory (the rows the free memory holds,
halved when a call still runs out of memory). Within a call the
rows of each concept are contiguous, so LoRA routing is a slice per concept.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .rows import RowRole

GLOBAL = -1
"""Concept index of rows that carry no concept LoRA."""

log = logging.getLogger("sd-webui-omg")


@dataclass
class ConceptCond:
    """A concept's conditioning: dicts of tensors with a leading batch dimension of 1."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]


@dataclass
class ExpandedRow:
    x: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor]
    concept: int
    host: int
    is_reference: bool = False

    def signature(self) -> tuple:
        """Rows with equal signatures can be stacked into one call."""
        return (tuple(self.x.shape), self.x.dtype) + tuple(
            (key, tuple(value.shape), value.dtype) for key, value in sorted(self.cond.items())
        )


def expand(
    x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], rows: Sequence[RowRole],
    concepts: Sequence[ConceptCond], reference_x: torch.Tensor | None, share_uncond: bool = False,
    run_host: Callable[[RowRole], bool] | None = None,
) -> list[list[ExpandedRow]]:
    """The expanded batch as units: lists of rows that must run in the same call.

    ``share_uncond``: no concept rows for the host's uncond rows; inside a concept's mask the
    guidance is then taken against the host's uncond output (k rows fewer per image).
    ``run_host(role)``: whether a host row runs (default: all; the others' outputs come from elsewhere).
    """
    units = []
    for i, role in enumerate(rows):
        host_cond = {key: value[i] for key, value in cond.items()}
        if run_host is None or run_host(role):
            unit = [ExpandedRow(x[i], t[i], host_cond, GLOBAL, i)]
            if reference_x is not None and role.is_cond:
                unit.append(ExpandedRow(reference_x[i], t[i], host_cond, GLOBAL, i, is_reference=True))
            units.append(unit)
        if share_uncond and not role.is_cond:
            continue
        for j, concept in enumerate(concepts):
            own = concept.cond if role.is_cond else concept.uncond
            # the concept's conditioning in the host's dtype and device (half precision, offloading)
            own_cond = {k: v[0].to(host_cond[k]) if k in host_cond else v[0] for k, v in own.items()}
            units.append([ExpandedRow(x[i], t[i], {**host_cond, **own_cond}, j, i)])
    return units


def chunk(units: list[list[ExpandedRow]], max_rows: int | None) -> list[list[list[ExpandedRow]]]:
    """Pack units into calls: one shape signature per call, at most ``max_rows`` rows, concepts contiguous.

    A call is a list of units (a unit never splits: a reference row runs beside its host row).
    """
    by_shape: dict[tuple, list[list[ExpandedRow]]] = {}
    for unit in units:
        by_shape.setdefault(unit[0].signature(), []).append(unit)
    calls = []
    for same_shape in by_shape.values():
        current: list[list[ExpandedRow]] = []
        for unit in sorted(same_shape, key=lambda u: u[0].concept):
            if max_rows is not None and current and _rows(current) + len(unit) > max_rows:
                calls.append(current)
                current = []
            current.append(unit)
        calls.append(current)
    return calls


def _rows(call: list[list[ExpandedRow]]) -> int:
    return sum(len(unit) for unit in call)


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
"""``torch.OutOfMemoryError`` exists from torch 2.5; A1111 1.10 ships torch 2.1, Forge 2.3 (``torch.cuda``'s, the same class)."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError``, or another backend's RuntimeError saying so (MPS, DirectML, ROCm)."""
    return isinstance(error, OUT_OF_MEMORY) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class RowLimit:
    """The most rows one UNet call may take: the smaller of the user's ``max_rows`` (lowered for
    good, for the rest of the job, each time a call runs out of memory) and ``budget``, the rows
    the memory free right now holds (``MemoryBudget``, set before each call)."""

    def __init__(self, max_rows: int | None) -> None:
        self.cap = max_rows
        self.budget: int | None = None

    @property
    def rows(self) -> int | None:
        limits = [n for n in (self.cap, self.budget) if n is not None]
        return min(limits) if limits else None

    def lower(self, failed_rows: int, smallest_unit: int) -> bool:
        """Halve below a call of ``failed_rows`` rows; False when it cannot go lower."""
        if failed_rows <= smallest_unit:
            return False
        self.cap = max(failed_rows // 2, smallest_unit)
        log.warning("OMG: out of memory in a UNet call of %d rows; running calls of at most %d rows from now on",
                    failed_rows, self.cap)
        return True


def stack(rows: list[ExpandedRow]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The tensors of one call."""
    x = torch.stack([r.x for r in rows])
    t = torch.stack([r.t for r in rows])
    cond = {key: torch.stack([r.cond[key] for r in rows]) for key in rows[0].cond}
    return x, t, cond


def concept_spans(rows: list[ExpandedRow]) -> list[tuple[int, int, int]]:
    """(concept, start, stop) for each run of concept rows: the LoRA routing of one call."""
    spans, start = [], 0
    for concept, run in groupby(rows, key=lambda r: r.concept):
        stop = start + len(list(run))
        if concept != GLOBAL:
            spans.append((concept, start, stop))
        start = stop
    return spans


def replace_pairs(rows: list[ExpandedRow]) -> list[tuple[int, list[int]]]:
    """(reference row, [its host row]) positions within one call."""
    host_pos = {host: p for p, host in host_positions(rows)}
    return [(p, [host_pos[r.host]]) for p, r in enumerate(rows) if r.is_reference]


def host_positions(rows: list[ExpandedRow]) -> list[tuple[int, int]]:
    """(position within one call, host row) of the call's host rows."""
    return [(p, r.host) for p, r in enumerate(rows) if r.concept == GLOBAL and not r.is_reference]


def run_units(units: list[list[ExpandedRow]], limit: RowLimit, run: Callable[[list[ExpandedRow]], torch.Tensor],
              concepts: int, background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the expanded batch in calls (``run(rows) -> out``); return host and concept outputs.

    Host outputs [R, C, H, W] in host-row order (for a host row that did not run, ``background``'s row, or
    without one the mean of its concept rows' outputs: the one-pass mode's background), concept outputs
    [k, R, C, H, W]; the reference rows' outputs are dropped. A call that runs out of memory is split in halves
    (``limit`` lowered) and run again, down to one unit; the job is never lost for it.
    """
    hosts = 1 + max(r.host for unit in units for r in unit)
    host_out: list = [None] * hosts if background is None else list(background)
    concept_out: list = [[None] * hosts for _ in range(concepts)]
    pending = chunk(units, limit.rows)
    while pending:
        call = pending.pop(0)
        call_rows = [row for unit in call for row in unit]
        try:
            out = run(call_rows)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e) or not limit.lower(len(call_rows), min(len(u) for u in call)):
                raise
            out = None
        if out is None:  # outside the except block: the error's frames (and their tensors) are gone
            free_memory()
            pending = chunk([unit for c in [call, *pending] for unit in c], limit.rows)  # all that is left, smaller
            continue
        for p, row in enumerate(call_rows):
            if row.concept == GLOBAL and not row.is_reference:
                host_out[row.host] = out[p]
            elif row.concept != GLOBAL:
                concept_out[row.concept][row.host] = out[p]
    for h, out in enumerate(host_out):
        if out is None:
            host_out[h] = torch.stack([c[h] for c in concept_out]).mean(dim=0)
    # a row without concept rows (``share_uncond``) blends with its own output: it stays the host's
    return torch.stack(host_out), torch.stack([torch.stack([h if o is None else o for o, h in zip(c, host_out)])
                                               for c in concept_out])


def free_memory() -> None:
    """Give the failed call's cached blocks back before the retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BlendMasks:
    """Pass 2's masks [images, concepts, H, W], checked once, resized once per latent size (hires)."""

    def __init__(self, masks: torch.Tensor, images: int, concepts: int) -> None:
        expected = (images, concepts)
        if masks.dim() != 4 or tuple(masks.shape[:2]) != expected:
            raise ValueError(f"masks must be [images, concepts, H, W] with {expected} leading, got {tuple(masks.shape)}")
        if masks.min() < 0 or masks.sum(dim=1).max() > 1 + 1e-5:
            raise ValueError("masks must be non-negative and sum to at most 1 at every pixel")
        self.masks = masks
        self._resized: dict[tuple, torch.Tensor] = {}

    def for_rows(self, x: torch.Tensor, rows: Sequence[RowRole]) -> torch.Tensor:
        """[rows, concepts, H, W]: each row's image's masks at ``x``'s size; bilinear keeps Σ ≤ 1."""
        hw = tuple(x.shape[-2:])
        if (hw, x.device) not in self._resized:
            masks = self.masks.to(x.device)
            if tuple(masks.shape[-2:]) != hw:
                masks = F.interpolate(masks, size=hw, mode="bilinear", align_corners=False)
            self._resized[hw, x.device] = masks
        return self._resized[hw, x.device][[r.image for r in rows]]


def blend(host_out: torch.Tensor, concept_out: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(1 - Σ M_j)·host + Σ M_j·concept_j`` per row.

    host_out [R, C, H, W]; concept_out [k, R, C, H, W]; masks [R, k, H, W] (each row's
    image's masks). Cond rows blend with concept cond rows and uncond with uncond,
    because concept rows inherit their host row's role.
    """
    m = masks.to(host_out.dtype).unsqueeze(2)  # [R, k, 1, H, W]
    return host_out * (1 - m.sum(dim=1)) + (m * concept_out.transpose(0, 1)).sum(dim=1)
