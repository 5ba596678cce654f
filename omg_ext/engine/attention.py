"""Cross-attention capture (pass 1) and layout replacement (pass 2).

One ``OmgAttention`` object per attention module is swapped in as the module's
instance ``forward`` and all are restored as a set. During a UNet call the session
sets an ``AttentionCall`` saying what to do; with none set, or nothing to do at a
layer, the module's own forward runs (the host's optimised attention, untouched), so a
pass-1 image is exactly the image the host would have made.

- Capture: at cross-attention layers of 1/2 and 1/4 latent resolution, the
  probabilities of each concept's class-word tokens, averaged over heads and summed
  over the word's tokens, are added to per-image maps, from the q and k the module's own
  forward projected (the output is the module's own).
- Keeping (pass 1): every cross-attention layer's output of the cond rows is kept, by
  layer, for pass 2 (``layout.LayoutOutputs``); giving back (pass 2): a host cond row's
  output is replaced by the one kept — the same as replacement below, without its
  reference row (``layout.LayoutTargets``).
- Replacement ("prompt-to-prompt replace"): a reference row (the pass-1 latent with the
  global prompt) lends its probabilities to its target rows (the global cond rows of
  the same image): ``out_target = softmax(q_ref k_refᵀ · scale) · v_target``. All
  cross-attention layers; optionally also self-attention at 1/4 resolution.
  Projections run on the whole batch so row-routed LoRA hooks see the batch they
  expect; the other rows use scaled-dot-product attention.

``ProjectedAttention`` does the same on projected q, k, v, for a host whose attention
API hands over projections (Forge's attn1/attn2 replace patches).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resolution import layer_factor

if TYPE_CHECKING:
    from .fast import FastCall
    from .layout import LayoutOutputs, LayoutTargets

CAPTURE_FACTORS = (2, 4)
"""Downsampling factors of the layers whose cross-attention forms the concept maps."""

SELF_REPLACE_FACTOR = 4
"""Self-attention is replaced only at quarter resolution (structure, not detail)."""


@dataclass
class AttentionCall:
    """What attention layers do during one UNet call; positions are rows of that call."""

    latent_hw: tuple[int, int]
    replace: Sequence[tuple[int, Sequence[int]]] = ()
    """(reference row, its target rows): targets take the reference's probabilities."""
    replace_self: bool = False
    capture_rows: Sequence[tuple[int, int]] = ()
    """(row, image) whose class-word probabilities are added to ``maps[image]``."""
    capture_tokens: Sequence[Sequence[Sequence[int]]] = ()
    """Per image, per concept: the token positions of its class word in that image's context."""
    maps: torch.Tensor | None = None
    """[images, concepts, h, w] accumulator at 1/2 latent resolution, added to in place."""
    fast: "FastCall | None" = None
    """Fast mode: cross-attention combines per-concept keys and values by mask (``fast_cross_attention``)."""
    keep: "LayoutOutputs | None" = None
    """Pass 1: where every cross-attention layer keeps its cond rows' outputs."""
    layout: "LayoutTargets | None" = None
    """Pass 2: host cond rows whose cross-attention outputs are pass 1's kept ones."""
    _word_selection: dict = field(default_factory=dict, repr=False)

    def word_selection(self, probs: torch.Tensor) -> torch.Tensor:
        """[capture rows, tokens, concepts]: 1 where a row's own image has the concept's class word.

        Built once per call (and context length), shared by every capture layer of it.
        """
        key = (probs.shape[-1], probs.dtype, probs.device)
        if key not in self._word_selection:
            select = torch.zeros(len(self.capture_rows), probs.shape[-1], self.maps.shape[1], dtype=probs.dtype)
            for i, (_, image) in enumerate(self.capture_rows):
                for j, tokens in enumerate(self.capture_tokens[image]):
                    select[i, list(tokens), j] = 1
            self._word_selection[key] = select.to(probs.device)
        return self._word_selection[key]

    def action(self, is_cross: bool, tokens: int) -> tuple[str, tuple[int, int]]:
        """What a layer with ``tokens`` positions does: "replace", "capture" or "plain", and its (h, w)."""
        factor, hw = layer_factor(tokens, self.latent_hw)
        if self.fast is not None and is_cross:
            return "fast", hw
        if self.layout is not None and is_cross:
            return "layout", hw
        if self.replace and (is_cross or (self.replace_self and factor == SELF_REPLACE_FACTOR)):
            return "replace", hw
        if is_cross and self.capture_rows and factor in CAPTURE_FACTORS:
            return "capture", hw
        return "plain", hw


class WordMaps:
    """Pass 1's class-word attention, kept per UNet call, averaged per image and concept on demand.

    ``capture(x, t, rows)`` gives the ``AttentionCall`` of one pass-1 call (its cond rows
    capture into a fresh accumulator); ``mean(start_t, stop_t)`` averages the calls whose
    timestep lies in ``(stop_t, start_t]`` (all of them by default) over the calls each
    image was captured in. One map per call costs little ([images, concepts, h, w] at 1/2
    latent resolution) and lets the masks come from any window of the steps.
    """

    def __init__(self, tokens: Sequence[Sequence[Sequence[int]]]) -> None:
        self.images, self.tokens = len(tokens), [[list(t) for t in image] for image in tokens]
        """Per image, per concept: the class word's token positions in that image's prompt."""
        self.calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        """(timestep, sums [images, concepts, h, w], captured rows per image) of each pass-1 call."""

    def capture(self, x: torch.Tensor, t: torch.Tensor, rows: Sequence) -> AttentionCall | None:
        """The capture instructions for a call with ``rows`` (``RowRole``s); None without cond rows."""
        capture = [(i, r.image) for i, r in enumerate(rows) if r.is_cond]
        if not capture:
            return None
        sums = torch.zeros(self.images, len(self.tokens[0]), *capture_size(tuple(x.shape[-2:])), device=x.device)
        counts = torch.zeros(self.images)
        for _, image in capture:
            counts[image] += 1
        self.calls.append((float(t.max()), sums, counts))
        return AttentionCall(tuple(x.shape[-2:]), capture_rows=capture, capture_tokens=self.tokens, maps=sums)

    def mean(self, start_t: float = math.inf, stop_t: float = -math.inf) -> torch.Tensor:
        """[images, concepts, h, w]: the maps of the calls with ``stop_t < t <= start_t``, averaged per image."""
        if not self.calls:
            raise RuntimeError("OMG: pass 1 captured no attention (no cond rows reached the UNet)")
        window = [(sums, counts) for t, sums, counts in self.calls if stop_t < t <= start_t]
        if not window:
            raise ValueError("OMG: no pass-1 step lies in the attention window")
        sums = torch.stack([s for s, _ in window]).sum(0)
        counts = torch.stack([c for _, c in window]).sum(0)
        return sums / counts.clamp(min=1).view(-1, 1, 1, 1).to(sums.device)


def capture_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Resolution of the captured maps: that of the finest capture layer."""
    h, w = latent_hw
    factor = min(CAPTURE_FACTORS)
    while factor > 1:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor // 2
    return h, w


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def no_autocast(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Float32 that stays float32: A1111 runs the UNet under ``torch.autocast`` (fp16 on CUDA),
    which would turn the engine's float32 matmuls back into half precision (and large logits into inf).
    Only CUDA and CPU have autocast to switch off (A1111 uses a manual cast on MPS/XPU, and torch 2.1
    refuses ``torch.autocast`` for device types it does not know, even disabled)."""
    if like.device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, enabled=False)


def probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) per head, in float32 also under autocast: [rows, heads, n, m]."""
    with no_autocast(q):
        sim = _heads(q, heads).float() @ _heads(k, heads).float().transpose(-1, -2)
        return (sim * scale).softmax(dim=-1)


def attend_with_replacement(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
    replace: Sequence[tuple[int, Sequence[int]]],
) -> torch.Tensor:
    """Attention of projected q, k, v ([rows, n, heads·d]) with borrowed probabilities.

    Every row attends normally, except target rows, which use their reference row's
    probabilities with their own values.
    """
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale)
    for ref, targets in replace:
        probs = probabilities(q[ref:ref + 1], k[ref:ref + 1], heads, scale)
        idx = list(targets)
        with no_autocast(v):
            out[idx] = (probs @ _heads(v[idx], heads).float()).to(out.dtype)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class OmgAttention:
    """The instance ``forward`` of one attention module (``attn1`` or ``attn2``); the object itself
    names its layer among pass 1's kept outputs."""

    def __init__(self, module: nn.Module, is_cross: bool, state: "AttentionState") -> None:
        self.module, self.is_cross, self.state = module, is_cross, state
        self.saved = module.__dict__.get("forward")

    def original(self, *args, **kwargs) -> torch.Tensor:
        if self.saved is not None:
            return self.saved(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None, **kwargs) -> torch.Tensor:
        call = self.state.call
        if call is None or mask is not None:
            return self.original(x, context=context, mask=mask, **kwargs)
        action, hw = call.action(self.is_cross, x.shape[1])
        if action == "replace":
            return self._replaced(x, x if context is None else context, call)
        if action == "fast":
            return fast_cross_attention(self.module, x, context, call.fast, self.state.added_terms)
        if action == "capture":
            out = self._captured(x, context, call, hw, mask=mask, **kwargs)
        else:
            out = self.original(x, context=context, mask=mask, **kwargs)
        if action == "layout":
            return call.layout.apply(self, out)
        if call.keep is not None and self.is_cross:
            call.keep.keep(self, out)
        return out

    def _replaced(self, x: torch.Tensor, context: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        m, q = self.module, self.module.to_q(x)
        out = attend_with_replacement(q, m.to_k(context), m.to_v(context), m.heads, m.scale, call.replace)
        return m.to_out(with_added_terms(out, m, x, q, self.state.added_terms))

    def _captured(self, x: torch.Tensor, context: torch.Tensor, call: AttentionCall, hw: tuple[int, int],
                  **kwargs) -> torch.Tensor:
        """The module's own output; the capture rows' class-word maps from the q and k its forward projected
        (read by forward hooks on ``to_q`` and ``to_k``: no projection twice), projected again only where
        the forward did not project the whole batch through them."""
        m, seen = self.module, {}
        handles = [m.to_q.register_forward_hook(lambda _m, _a, out: seen.setdefault("q", out)),
                   m.to_k.register_forward_hook(lambda _m, _a, out: seen.setdefault("k", out))]
        try:
            out = self.original(x, context=context, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        rows = [r for r, _ in call.capture_rows]
        q, k = seen.get("q"), seen.get("k")
        q = q[rows] if q is not None and q.shape[:2] == x.shape[:2] else m.to_q(x[rows])
        k = k[rows] if k is not None and k.shape[:2] == context.shape[:2] else m.to_k(context[rows])
        add_word_maps(probabilities(q, k, m.heads, m.scale), call, hw)
        return out


def fast_cross_attention(module: nn.Module, x: torch.Tensor, context: torch.Tensor, fast: "FastCall",
                         added_terms: Callable | None = None) -> torch.Tensor:
    """Cross-attention of fast mode on an attention module: its projections, ``fast_attention``, the terms other
    code adds (``AttentionState.added_terms``), its output projection.

    (The LoRA hooks of ``to_q`` and ``to_out`` apply the masked deltas themselves.)
    """
    q = module.to_q(x)
    out = fast_attention(q, module.to_k(context), module.to_v(context), module.heads, module.scale, module, fast)
    return module.to_out(with_added_terms(out, module, x, q, added_terms))


def with_added_terms(out: torch.Tensor, module: nn.Module, x: torch.Tensor, q: torch.Tensor,
                     added_terms: Callable | None) -> torch.Tensor:
    return out if added_terms is None else out + added_terms(module, x, q)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, module: nn.Module,
                   fast: "FastCall") -> torch.Tensor:
    """``(1 - Σ M_j)·attn(q, k, v) + Σ M_j·attn(q, k_j, v_j)`` on projected q, k, v ([rows, n, heads·d]).

    ``k_j, v_j``: concept j's context projected by ``module``'s ``to_k``/``to_v`` with its LoRA on every row.
    Rows that no mask touches keep ``attn(q, k, v)``: the concept attentions run on ``fast.masks.rows`` only.
    """
    def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(_heads(q_, heads), _heads(k_, heads), _heads(v_, heads), scale=scale)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    out, rows = attend(q, k, v), fast.masks.rows
    if rows.start == rows.stop:
        return out
    masks, q = fast.masks.tokens(q.shape[1]).to(q.dtype), q[rows]  # [masked rows, k, n]
    part = out[rows] * (1 - masks.sum(dim=1)).unsqueeze(-1)
    for j, concept_context in enumerate(fast.contexts):
        with fast.concept_kv(j):
            k_j, v_j = module.to_k(concept_context), module.to_v(concept_context)
        part = part + masks[:, j].unsqueeze(-1) * attend(q, k_j, v_j)
    out[rows] = part
    return out


def add_word_maps(probs: torch.Tensor, call: AttentionCall, hw: tuple[int, int]) -> None:
    """Add the capture rows' class-word probabilities ([rows, heads, n, tokens]) to ``call.maps``."""
    probs = probs.mean(dim=1)
    rows, concepts = probs.shape[0], call.maps.shape[1]
    with no_autocast(probs):
        words = torch.bmm(probs, call.word_selection(probs)).transpose(1, 2).reshape(rows, concepts, *hw)
        words = F.interpolate(words, size=call.maps.shape[-2:], mode="bilinear", align_corners=False)
    for i, (_, image) in enumerate(call.capture_rows):
        call.maps[image] += words[i].to(call.maps.dtype)


class ProjectedAttention:
    """The engine's attention for a host that hands over projected q, k, v ([rows, n, heads·d]).

    Forge calls its attn1/attn2 replace patches as ``patch(q, k, v, extra_options)`` with
    ``n_heads`` and ``dim_head`` in the options; this object is such a patch. With nothing
    to do it returns ``attention(q, k, v, heads)``, the host's own attention function, so
    a pass-1 image stays the host's image.
    """

    def __init__(self, state: "AttentionState", is_cross: bool, attention: Callable[..., torch.Tensor],
                 modules: dict | None = None) -> None:
        """``modules``: the ``attn2`` module of each (block name, number, block index) of ``extra_options``,
        for fast mode, which projects the concept prompts itself."""
        self.state, self.is_cross, self.attention, self.modules = state, is_cross, attention, modules or {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        call = self.state.call
        if call is None:
            return self.attention(q, k, v, heads)
        scale = extra_options["dim_head"] ** -0.5
        action, hw = call.action(self.is_cross, q.shape[1])
        if action == "replace":
            return attend_with_replacement(q, k, v, heads, scale, call.replace)
        if action == "fast":
            block = block_key(extra_options)
            if block not in self.modules:
                raise RuntimeError(f"OMG fast mode: no cross-attention module known for transformer block {block}")
            return fast_attention(q, k, v, heads, scale, self.modules[block], call.fast)
        out = self.attention(q, k, v, heads)
        if action == "layout":
            return call.layout.apply(block_key(extra_options), out)
        if action == "capture":
            rows = [r for r, _ in call.capture_rows]
            add_word_maps(probabilities(q[rows], k[rows], heads, scale), call, hw)
        if call.keep is not None and self.is_cross:
            call.keep.keep(block_key(extra_options), out)
        return out


def block_key(extra_options: dict) -> tuple:
    """A transformer block's name in a Forge attention patch's options: (block name, number, index)."""
    return (*extra_options["block"], extra_options["block_index"])


@dataclass
class AttentionState:
    """The current call's instructions, shared by all processors of one model."""

    call: AttentionCall | None = None
    processors: dict[str, OmgAttention] = field(default_factory=dict)
    added_terms: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | float] | None = None
    """What another extension adds to an attention module's output before its output projection, for the paths in
    which the engine computes that attention itself (replacement, fast mode): ``added_terms(module, x, q)``, ``q``
    projected ([rows, n, heads·d]). Elsewhere the module's own forward runs and adds them itself. (A1111's
    sd-webui-controlnet adds its IP-Adapters' image-prompt attention so.)"""

    @contextlib.contextmanager
    def during(self, call: AttentionCall | None) -> Iterator[None]:
        previous, self.call = self.call, call
        try:
            yield
        finally:
            self.call = previous


def attention_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """ldm/sgm attention modules by name, with whether each is cross-attention (``attn2``)."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("attn1", "attn2") and all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
            found[name] = (module, leaf == "attn2")
    return found


@contextlib.contextmanager
def installed_attention(model: nn.Module) -> Iterator[AttentionState]:
    """Swap an ``OmgAttention`` into every attention module; restore all on exit."""
    state = AttentionState()
    try:
        for name, (module, is_cross) in attention_modules(model).items():
            if not hasattr(module, "scale"):
                raise ValueError(f"attention module {name} has no 'scale'")
            processor = OmgAttention(module, is_cross, state)
            state.processors[name] = processor
            module.forward = processor
        yield state
    finally:
        for processor in state.processors.values():
            if processor.saved is not None:
                processor.module.forward = processor.saved
            else:
                processor.module.__dict__.pop("forward", None)
        state.processors.clear()
