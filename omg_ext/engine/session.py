"""The two OMG passes in host-neutral terms.

A host adapter creates an ``OmgSession`` for one generation and routes every UNet call
of both passes through it::

    with session.installed():                      # attention processors + LoRA hooks
        session.begin_pass1()
        latent = host_sampling(...)                # each UNet call: session(unet_fn, x, t, cond, rows)
        masks = session.attention_masks(...)       # or masks from another source
        session.begin_pass2(torch.stack([m.masks for m in masks]), blend_start=0.35)
        latent = host_sampling(...)                # same seed and noise
    # every patch is gone here, also after an exception

``unet_fn(x, t, cond) -> out`` is the host's raw UNet call (cond: a dict of tensors with
a leading row dimension), ``rows`` says per row whether it is cond or uncond and which
image it belongs to. Time is the UNet's timestep ``t`` (it falls as sampling proceeds);
the blend start, a fraction of the steps, is turned into a timestep from pass 1's calls
(``PassRecord.threshold``), so the engine needs nothing from the host's sampler.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .attention import AttentionCall, AttentionState, WordMaps, installed_attention
from .expand import (BlendMasks, ConceptCond, RowLimit, blend, concept_spans, expand, host_positions, replace_pairs,
                     run_units, stack)
from .fast import FastCall, LayerMasks
from .layout import LayoutOutputs, LayoutTargets, keep_limit
from .lora import Delta, RowRoutedLoRA
from .memory import MemoryBudget
from .masks import MaskResult, masks_from_attention
from .record import PassRecord, RecordedCall
from .rows import RowRole

UnetFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

@dataclass
class Concept:
    """What the engine needs of one concept for one generation."""

    cond: dict[str, torch.Tensor]
    """Conditioning of the concept prompt (leading dim 1), encoded with its text-encoder LoRA."""
    uncond: dict[str, torch.Tensor]
    """Conditioning of the concept's negative prompt (leading dim 1)."""
    deltas: Mapping[str, Delta] = field(default_factory=dict)
    """UNet layer name -> this concept's LoRA delta."""
    tokens: Sequence[int] = ()
    """Positions of the concept's class word in the global prompt's conditioning."""


@dataclass
class PassCounters:
    calls: int = 0
    """UNet forward calls made."""
    rows: int = 0
    """Row evaluations made (rows × calls): the unit of the cost model."""
    replayed: int = 0
    """Host calls answered from the pass-1 record."""


class OmgSession:
    """One OMG generation on one UNet module: pass 1, masks, pass 2 (and optionally a hires pass)."""

    def __init__(
        self, unet: nn.Module, concepts: Sequence[Concept], *, images: int,
        layout: bool = True, max_rows: int | None = None,
        image_tokens: Sequence[Sequence[Sequence[int]]] | None = None, memory: MemoryBudget | None = None,
        keep_attention: bool = True,
    ) -> None:
        """``image_tokens[image][concept]``: class-word positions where the images' prompts
        differ (wildcards, a prompt matrix); by default every image uses ``Concept.tokens``.
        ``memory``: how pass 2's calls are sized to the free memory (default: CUDA's free memory,
        no limit elsewhere). ``keep_attention``: pass 1 keeps its cross-attention outputs as
        pass 2's layout reference, up to ``layout.keep_limit`` bytes, instead of pass 2 running a
        reference row per image (``layout.py``: the same image, a row fewer, more memory)."""
        if not concepts:
            raise ValueError("OMG needs at least one concept")
        if max_rows is not None and max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (a reference row runs beside its host row), got {max_rows}")
        self.unet, self.concepts, self.images = unet, list(concepts), images
        self.layout, self.row_limit = layout, RowLimit(max_rows)
        self.keep_attention = layout and keep_attention
        self.memory = memory or MemoryBudget()
        self.router = RowRoutedLoRA(dict(unet.named_modules()), [c.deltas for c in concepts])
        self.conds = [ConceptCond(c.cond, c.uncond) for c in concepts]
        self.record = PassRecord()
        if image_tokens is None:
            image_tokens = [[c.tokens for c in concepts]] * images
        if len(image_tokens) != images or any(len(t) != len(concepts) for t in image_tokens):
            raise ValueError(f"image_tokens must list {len(concepts)} concepts' positions for each of {images} images")
        self.maps = WordMaps(image_tokens)
        self.counters = {"pass1": PassCounters(), "pass2": PassCounters(), "hires_blend": PassCounters(),
                         "fast": PassCounters()}
        self.mode: str | None = None
        self.masks: BlendMasks | None = None
        self.blend_from_t = self.self_attention_until_t = self.layout_until_t = math.inf
        self._attention: AttentionState | None = None
        self.share_uncond = self.background_from_pass1 = False
        self._blending: Callable[[torch.Tensor], bool] | None = None
        """Fast mode's test of whether a call is past the blend start (None: two-pass mode)."""
        self._concept_rows = False

    @contextlib.contextmanager
    def installed(self, module_attention: bool = True) -> Iterator["OmgSession"]:
        """The engine's patches for the scope; all removed on exit, whatever happens.

        ``module_attention=False`` leaves the attention modules alone: the host calls
        ``ProjectedAttention(session.attention_state, ...)`` patches itself (Forge).
        """
        attention = installed_attention(self.unet) if module_attention else contextlib.nullcontext(AttentionState())
        with attention as state, self.router.installed():
            self._attention = state
            try:
                yield self
            finally:
                self._attention, self.mode = None, None

    @property
    def attention_state(self) -> AttentionState:
        """The current call's attention instructions (only while installed)."""
        if self._attention is None:
            raise RuntimeError("OMG: the session is not installed")
        return self._attention

    def begin_pass1(self) -> None:
        self.mode = "pass1"

    def begin_pass2(self, masks: torch.Tensor, *, blend_start: float, self_attention_until: float = 0.0,
                    layout_until: float = 1.0, share_uncond: bool = False, background_from_pass1: bool = False) -> None:
        """Start pass 2 with masks [images, concepts, H, W], exclusive (Σ ≤ 1 per pixel).

        ``blend_start``: fraction of the steps before which pass 2 replays pass 1;
        ``self_attention_until``: fraction of the steps before which self-attention at
        1/4 resolution is also taken from the reference (0: never); ``layout_until``:
        fraction of the steps after which the reference rows stop (1: to the end) — the
        late steps draw detail, not layout, and each reference row costs a row; ``share_uncond``:
        concepts are guided against the host's uncond rows instead of their own (``expand``);
        ``background_from_pass1``: outside the masks each step takes pass 1's recorded outputs
        (the layout image's own trajectory) instead of running the host cond rows (and their
        layout reference): a row fewer per image and step. The host uncond rows still run where
        the concepts are guided against them.
        """
        self.share_uncond, self.background_from_pass1 = share_uncond, background_from_pass1
        self.masks = BlendMasks(masks, self.images, len(self.concepts))
        for name, value in (("blend_start", blend_start), ("self_attention_until", self_attention_until),
                            ("layout_until", layout_until)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value}")
        self.blend_from_t = self.record.threshold(blend_start)
        self.self_attention_until_t = self.record.threshold(self_attention_until)
        self.layout_until_t = self.record.threshold(layout_until)
        self.record.drop_outputs_from(self.blend_from_t, keep_blended=background_from_pass1)
        self.record.start_replay()
        self.mode = "pass2"

    def begin_fast(self, blending: Callable[[torch.Tensor], bool], make_masks: Callable[["OmgSession"], torch.Tensor], *,
                   context_key: str = "context", share_uncond: bool = False, concept_rows: bool = False) -> None:
        """Fast mode (``fast.py``): one pass instead of two.

        ``blending(t)`` says whether a call at timestep ``t`` is at or past the blend start
        (the host knows its steps: ``t <= record.threshold(timesteps, s)``, or its step
        counter). Calls before it run as pass 1 and capture attention; at the first blending
        call ``make_masks(session)`` gives the masks [images, concepts, H, W] (e.g. from
        ``attention_masks``, whose window then spans the calls made so far); from then on each
        concept's LoRA and prompt act inside its mask in the host's rows. ``context_key``: the
        conditioning entry that cross-attention reads (the host's name for it); ``share_uncond``:
        the uncond rows stay the host's (no LoRA, no concept negative prompt), as in pass 2.

        ``concept_rows`` (the "one pass" mode): from the blend start each concept draws in rows of its own, as
        in pass 2, instead of in the host's rows; outside the masks the concepts' outputs are averaged (there is
        no pass 1 to take them from, and no host cond row runs): 1 + k rows per image and step under shared
        guidance, where the two-pass mode also runs the whole of pass 1.
        """
        self._blending, self._make_masks, self._context_key = blending, make_masks, context_key
        self._concept_rows = concept_rows
        self.share_uncond = share_uncond
        self._fast_calls: dict[tuple, FastCall] = {}
        self.masks = None
        self.mode = "fast"

    def begin_hires(self, blend: bool) -> None:
        """A hires pass after pass 2: no record to replay; blend with resized masks, or run plain.
        After fast mode the hires pass stays in fast mode, masked from its first step; plain when
        the fast pass never reached its blend start (no masks)."""
        if self._blending is not None:
            self._blending = lambda t: True
            self.mode = "fast" if blend and self.masks is not None else None
            return
        self.mode = "hires_blend" if blend else None

    def __call__(self, unet_fn: UnetFn, x: torch.Tensor, t: torch.Tensor, cond: dict, rows: Sequence[RowRole]) -> torch.Tensor:
        """One host UNet call, whatever the pass."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} row roles for a call of {x.shape[0]} rows")
        if self.mode == "pass1":
            capture = self.maps.capture(x, t, rows)
            if capture is not None and self.keep_attention:
                if not self.record.calls:
                    self.record.layout_limit = keep_limit(self.memory.available(x.device))
                capture.keep = LayoutOutputs([i for i, _ in capture.capture_rows])
            if self.memory.wants_measure(x.device):
                out = self.memory.measure(lambda: self._run(unet_fn, x, t, cond, capture), x)
            else:
                out = self._run(unet_fn, x, t, cond, capture)
            self.record.add(x, t, out, capture.keep if capture is not None else None)
            return out
        if self.mode == "pass2":
            recorded = self.record.next_call(x, t)
            if float(t.max()) <= self.blend_from_t:
                return self._blended(unet_fn, x, t, cond, rows, recorded)
            if recorded is not None and recorded.replays(x, t):
                self.counters["pass2"].replayed += 1
                return recorded.out.clone()
            return self._run(unet_fn, x, t, cond, None)
        if self.mode == "hires_blend":
            return self._blended(unet_fn, x, t, cond, rows, None)
        if self.mode == "fast":
            if not self._blending(t):
                self.record.add(x, t, None)  # the steps' timesteps, for the attention window
                return self._run(unet_fn, x, t, cond, self.maps.capture(x, t, rows))
            if self.masks is None:
                self.masks = BlendMasks(self._make_masks(self), self.images, len(self.concepts))
            if self._concept_rows:
                return self._blended(unet_fn, x, t, cond, rows, None)
            return self._fast(unet_fn, x, t, cond, rows)
        return unet_fn(x, t, cond)

    def _fast(self, unet_fn: UnetFn, x, t, cond, rows: Sequence[RowRole]) -> torch.Tensor:
        """One fast-mode call: the host's rows, every concept's LoRA and prompt masked."""
        like = cond[self._context_key]
        key = (tuple(rows), tuple(x.shape[-2:]), x.device, like.dtype)
        if key not in self._fast_calls:  # the same rows every step: masks resized and contexts stacked once
            row_masks = self.masks.for_rows(x, rows)
            if self.share_uncond:  # the uncond rows stay the host's
                row_masks = row_masks * torch.tensor([r.is_cond for r in rows], dtype=row_masks.dtype,
                                                     device=row_masks.device).view(-1, 1, 1, 1)
            layer_masks = LayerMasks(row_masks)
            masked = rows[layer_masks.rows]
            contexts = [torch.stack([(c.cond if r.is_cond else c.uncond)[self._context_key][0] for r in masked]).to(like)
                        if masked else None for c in self.conds]
            self._fast_calls[key] = FastCall(layer_masks, contexts, self.router.route_all)
        fast = self._fast_calls[key]
        with self.router.masked(fast.masks):
            return self._run(unet_fn, x, t, cond, AttentionCall(tuple(x.shape[-2:]), fast=fast))

    def _blended(self, unet_fn: UnetFn, x, t, cond, rows: Sequence[RowRole], recorded: RecordedCall | None) -> torch.Tensor:
        """The expanded batch (host, reference and concept rows) of one call, blended by the masks."""
        background = recorded.out if self.background_from_pass1 and recorded is not None else None
        with_layout = self.layout and recorded is not None and background is None and float(t.max()) > self.layout_until_t
        replace_self = float(t.max()) > self.self_attention_until_t
        kept = recorded.layout if with_layout and not replace_self else None  # self-attention needs the reference row
        reference = recorded.x if with_layout and kept is None else None

        def run(call_rows):
            layout = None if kept is None else LayoutTargets(kept, host_positions(call_rows))
            call = AttentionCall(tuple(x.shape[-2:]), replace=replace_pairs(call_rows), replace_self=replace_self,
                                 layout=layout)
            return self._run(unet_fn, *stack(call_rows), call, concept_spans(call_rows))

        # with pass 1's outputs (or the concepts' mean, in one pass) outside the masks, a host row runs only as its
        # concepts' uncond
        outside = background is not None or self._concept_rows
        run_host = (lambda role: self.share_uncond and not role.is_cond) if outside else None
        units = expand(x, t, cond, rows, self.conds, reference, self.share_uncond, run_host)
        self.row_limit.budget = self.memory.rows(x, smallest=max(len(u) for u in units))
        host_out, concept_out = run_units(units, self.row_limit, run, len(self.conds), background)
        return blend(host_out if background is None else background, concept_out, self.masks.for_rows(x, rows))

    def _run(self, unet_fn: UnetFn, x, t, cond, call: AttentionCall | None, spans=()) -> torch.Tensor:
        with self.router.route(spans, batch=x.shape[0]), self._attention.during(call):
            out = unet_fn(x, t, cond)
        counters = self.counters[self.mode]
        counters.calls += 1
        counters.rows += x.shape[0]
        return out

    def attention_maps(self, window: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Per image and concept, the class word's attention averaged over pass 1's calls in ``window``.

        ``window``: the fractions of the steps (as for the blend start) whose maps count.
        """
        start, stop = window
        if not 0 <= start < stop <= 1:
            raise ValueError(f"the attention window must be two fractions 0 <= start < stop <= 1, got {window}")
        return self.maps.mean(self.record.threshold(start), self.record.threshold(stop))

    def attention_masks(self, *, dilation: int = 0, feather: int = 0, groups=None, order: str = "left_to_right",
                        labels=None, window: tuple[float, float] = (0.0, 1.0)) -> list[MaskResult]:
        """Masks from the captured attention, one result per image, at latent resolution."""
        maps, hw = self.attention_maps(window), self.record.latent_hw()
        return [
            masks_from_attention(maps[b], hw, groups=groups, dilation=dilation, feather=feather, order=order, labels=labels)
            for b in range(self.images)
        ]
