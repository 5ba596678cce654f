"""The two OMG passes in host-neutral terms.

A host adapter creates an ``OmgSession`` for one generation and routes every UNet call
of both passes through it::

    with session.installed():                      # attention processors + LoRA hooks
        session.begin_pass1()
        latent = host_sampling(...)                # each UNet call: session(unet_fn, x, t, cond, rows)
        masks = session.attention_masks(...)       # or masks from another source
        session.begin_pass2(torch.stack([m.masks for m in masks]), blend_start=0.3)
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
import torch.nn.functional as F
from torch import nn

from .attention import AttentionCall, AttentionState, capture_size, installed_attention
from .expand import GLOBAL, ConceptCond, blend, chunk, concept_spans, expand, replace_pairs, stack
from .lora import Delta, RowRoutedLoRA
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
    """One OMG generation on one UNet module."""

    def __init__(
        self, unet: nn.Module, concepts: Sequence[Concept], *, images: int,
        layout: bool = True, max_rows: int | None = None,
    ) -> None:
        if not concepts:
            raise ValueError("OMG needs at least one concept")
        if max_rows is not None and max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (a reference row runs beside its host row), got {max_rows}")
        self.unet, self.concepts, self.images = unet, list(concepts), images
        self.layout, self.max_rows = layout, max_rows
        self.blend_from_t = self.self_attention_until_t = math.inf
        self.router = RowRoutedLoRA(dict(unet.named_modules()), [c.deltas for c in concepts])
        self.conds = [ConceptCond(c.cond, c.uncond) for c in concepts]
        self.record = PassRecord()
        self.counters = {"pass1": PassCounters(), "pass2": PassCounters(), "hires_blend": PassCounters()}
        self.mode: str | None = None
        self._attention: AttentionState | None = None
        self._maps: torch.Tensor | None = None
        self._map_calls = torch.zeros(images)
        self._masks: torch.Tensor | None = None
        self._masks_resized: dict[tuple[int, int], torch.Tensor] = {}
        self._index = 0

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
        self.mode, self._index = "pass1", 0

    def begin_pass2(self, masks: torch.Tensor, *, blend_start: float, self_attention_until: float = 0.0) -> None:
        """Start pass 2 with masks [images, concepts, H, W], exclusive (Σ ≤ 1 per pixel).

        ``blend_start``: fraction of the steps before which pass 2 replays pass 1;
        ``self_attention_until``: fraction of the steps before which self-attention at
        1/4 resolution is also taken from the reference (0: never).
        """
        expected = (self.images, len(self.concepts))
        if masks.dim() != 4 or tuple(masks.shape[:2]) != expected:
            raise ValueError(f"masks must be [images, concepts, H, W] with {expected} leading, got {tuple(masks.shape)}")
        if masks.min() < 0 or masks.sum(dim=1).max() > 1 + 1e-5:
            raise ValueError("masks must be non-negative and sum to at most 1 at every pixel")
        for name, value in (("blend_start", blend_start), ("self_attention_until", self_attention_until)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value}")
        self.blend_from_t = self.record.threshold(blend_start)
        self.self_attention_until_t = self.record.threshold(self_attention_until)
        self.record.drop_outputs_from(self.blend_from_t)
        self._masks, self._masks_resized = masks, {}
        self.mode, self._index = "pass2", 0

    def begin_hires(self, blend: bool) -> None:
        """A hires pass after pass 2: no record to replay; blend with resized masks, or run plain."""
        self.mode = "hires_blend" if blend else None

    def __call__(self, unet_fn: UnetFn, x: torch.Tensor, t: torch.Tensor, cond: dict, rows: Sequence[RowRole]) -> torch.Tensor:
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} row roles for a call of {x.shape[0]} rows")
        if self.mode == "pass1":
            return self._pass1(unet_fn, x, t, cond, rows)
        if self.mode == "pass2":
            return self._pass2(unet_fn, x, t, cond, rows)
        if self.mode == "hires_blend":
            return self._expanded(unet_fn, x, t, cond, rows, None)
        return unet_fn(x, t, cond)

    def _blending(self, t: torch.Tensor) -> bool:
        return float(t.max()) <= self.blend_from_t

    def _run(self, unet_fn: UnetFn, x, t, cond, call: AttentionCall | None, spans=()) -> torch.Tensor:
        with self.router.route(spans, batch=x.shape[0]), self._attention.during(call):
            out = unet_fn(x, t, cond)
        counters = self.counters[self.mode]
        counters.calls += 1
        counters.rows += x.shape[0]
        return out

    def _pass1(self, unet_fn: UnetFn, x, t, cond, rows: Sequence[RowRole]) -> torch.Tensor:
        capture = [(i, r.image) for i, r in enumerate(rows) if r.is_cond]
        call = None
        if capture:
            if self._maps is None:
                h, w = capture_size(tuple(x.shape[-2:]))
                self._maps = torch.zeros(self.images, len(self.concepts), h, w, device=x.device)
            call = AttentionCall(
                tuple(x.shape[-2:]), capture_rows=capture,
                capture_tokens=[c.tokens for c in self.concepts], maps=self._maps,
            )
            for _, image in capture:
                self._map_calls[image] += 1
        out = self._run(unet_fn, x, t, cond, call)
        self.record.add(x, t, out)
        return out

    def _pass2(self, unet_fn: UnetFn, x, t, cond, rows: Sequence[RowRole]) -> torch.Tensor:
        recorded = self.record.get(self._index)
        self._index += 1
        if recorded is not None and not recorded.same_time(x, t):
            recorded = None  # the call sequence diverged from pass 1: no replay, no reference
        if not self._blending(t):
            if recorded is not None and recorded.out is not None and recorded.matches(x, t):
                self.counters["pass2"].replayed += 1
                return recorded.out.clone()
            return self._run(unet_fn, x, t, cond, None)
        return self._expanded(unet_fn, x, t, cond, rows, recorded)

    def _expanded(self, unet_fn: UnetFn, x, t, cond, rows: Sequence[RowRole], recorded: RecordedCall | None) -> torch.Tensor:
        reference = recorded.x if (recorded is not None and self.layout) else None
        units = expand(x, t, cond, rows, self.conds, reference)
        replace_self = float(t.max()) > self.self_attention_until_t
        host_out: list = [None] * len(rows)
        concept_out: list = [[None] * len(rows) for _ in self.concepts]
        for call_rows in chunk(units, self.max_rows):
            cx, ct, cc = stack(call_rows)
            call = AttentionCall(tuple(x.shape[-2:]), replace=replace_pairs(call_rows), replace_self=replace_self)
            out = self._run(unet_fn, cx, ct, cc, call, concept_spans(call_rows))
            for p, row in enumerate(call_rows):
                if row.concept == GLOBAL and not row.is_reference:
                    host_out[row.host] = out[p]
                elif row.concept != GLOBAL:
                    concept_out[row.concept][row.host] = out[p]
        masks = self._masks_at(tuple(x.shape[-2:]), x.device)[[r.image for r in rows]]
        return blend(torch.stack(host_out), torch.stack([torch.stack(c) for c in concept_out]), masks)

    def _masks_at(self, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The masks at a call's latent size (hires): bilinear keeps Σ ≤ 1."""
        if hw not in self._masks_resized:
            masks = self._masks.to(device)
            if tuple(masks.shape[-2:]) != hw:
                masks = F.interpolate(masks, size=hw, mode="bilinear", align_corners=False)
            self._masks_resized[hw] = masks
        return self._masks_resized[hw]

    def attention_maps(self) -> torch.Tensor:
        """Per image and concept, the class word's attention averaged over pass 1's calls."""
        if self._maps is None:
            raise RuntimeError("OMG: pass 1 captured no attention (no cond rows reached the UNet)")
        return self._maps / self._map_calls.clamp(min=1).view(-1, 1, 1, 1).to(self._maps.device)

    def attention_masks(self, *, dilation: int = 0, feather: int = 0, groups=None,
                        order: str = "left_to_right", labels=None) -> list[MaskResult]:
        """Masks from the captured attention, one result per image, at latent resolution."""
        maps = self.attention_maps()
        hw = self.record.latent_hw()
        return [
            masks_from_attention(maps[b], hw, groups=groups, dilation=dilation, feather=feather, order=order, labels=labels)
            for b in range(self.images)
        ]
