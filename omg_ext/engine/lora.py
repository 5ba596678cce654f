"""Row-routed multi-LoRA: each concept's LoRA acts on its own rows of one batched forward.

OMG runs every concept's UNet rows in one expanded batch. Merging a LoRA into the
weights would change every row, and switching merged LoRAs per concept per step costs
a weight pass each time. Instead, every target layer (Linear or Conv2d, or a host class
with the same attributes) gets a forward hook that adds, for each concept, that
concept's delta computed on that concept's rows only:

    y = layer(x);  y[a:b] += delta_j(x[a:b])     for every (concept j, rows a:b)

Low-rank deltas cost two (or three) small matmuls; dense deltas (LoHa, LoKr, DoRA and
anything else the host can only express as a weight difference) cost one full matmul.
No weight is ever modified: the hooks are the only change, and they are removed as a
set. Delta tensors are cast once per device and dtype, so they follow the host's
memory management.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .fast import LayerMasks


def _is_conv(module: nn.Module) -> bool:
    return hasattr(module, "stride") and hasattr(module, "padding")


def _conv_args(module: nn.Module) -> dict:
    return dict(stride=module.stride, padding=module.padding, dilation=getattr(module, "dilation", 1))


def _accumulate(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, channels_first: bool = False) -> None:
    """``out += h · weightᵀ`` over the feature axis (last, or dim 1 for images), fused where possible.

    A separate product and add would read and write the concept rows' whole output
    twice more; ``addmm_`` / ``baddbmm_`` accumulate in place.
    """
    if not out.is_contiguous():
        out += (torch.einsum("nrhw,or->nohw", h, weight) if channels_first else F.linear(h, weight))
    elif channels_first:
        n, c = out.shape[:2]
        out.view(n, c, -1).baddbmm_(weight.expand(n, -1, -1), h.reshape(n, h.shape[1], -1))
    else:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())


class _CastCache:
    """Copies of a delta's tensors per (device, dtype), made on first use."""

    def __init__(self) -> None:
        self._copies: dict[tuple, tuple] = {}

    def get(self, like: torch.Tensor, make) -> tuple:
        """``make()``'s tensors on ``like``'s device and dtype, computed once per pair."""
        key = (like.device, like.dtype)
        if key not in self._copies:
            self._copies[key] = tuple(
                None if t is None else t.to(device=like.device, dtype=like.dtype) for t in make()
            )
        return self._copies[key]


@dataclass
class LowRankDelta:
    """``scale · up ∘ [mid ∘] down`` for a Linear ([out, r], [r, in]) or Conv2d layer.

    For Conv2d, ``down`` is [r, in, kh, kw] (spatial or 1×1), ``mid`` an optional Tucker
    core [r, r, kh, kw], ``up`` [out, r, 1, 1]. The first spatial factor takes the layer's
    stride, padding and dilation, as the host's LoRA code does. 2-D factors given for a
    1×1 conv are reshaped.
    """

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    scale: float = 1.0
    _cache: _CastCache = field(default_factory=_CastCache, repr=False, compare=False)

    def check(self, module: nn.Module, name: str) -> "LowRankDelta":
        """Validate shapes against the layer; return a delta in the layer's layout."""
        up, down, mid = self.up, self.down, self.mid
        if _is_conv(module):
            if up.dim() == 2:
                up = up[:, :, None, None]
            if down.dim() == 2:
                down = down[:, :, None, None]
        elif up.dim() != 2 or down.dim() != 2 or mid is not None:
            raise ValueError(f"LoRA for {name}: a Linear layer needs 2-D up/down factors and no mid")
        if up.shape[1] != (mid.shape[0] if mid is not None else down.shape[0]):
            raise ValueError(f"LoRA for {name}: rank of up {tuple(up.shape)} and down {tuple(down.shape)} differ")
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            if (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]):
                raise ValueError(
                    f"LoRA for {name}: factors give {up.shape[0]}x{down.shape[1]}, "
                    f"the layer is {tuple(weight.shape[:2])}"
                )
        return LowRankDelta(up, down, mid, self.scale)

    def _scaled(self) -> tuple:
        return self.up * self.scale, self.down, self.mid

    def add_to(self, out: torch.Tensor, x: torch.Tensor, module: nn.Module, mask: torch.Tensor | None = None) -> None:
        """``out += delta(x)`` (times ``mask``, shaped to multiply ``out``); the last product
        accumulates into ``out`` in one kernel. ``up`` acts per position, so the mask is
        applied to the rank-r intermediate: no output-sized temporary."""
        up, down, mid = self._cache.get(x, self._scaled)
        if not _is_conv(module):
            h = F.linear(x, down)
            _accumulate(out, h if mask is None else h * mask, up)
            return
        spatial = _conv_args(module)
        if mid is None:
            h = F.conv2d(x, down, **(spatial if down.shape[-2:] != (1, 1) else {}))
        else:
            h = F.conv2d(F.conv2d(x, down), mid, **spatial)
        _accumulate(out, h if mask is None else h * mask, up[:, :, 0, 0], channels_first=True)

    def dense(self) -> torch.Tensor:
        """The equivalent weight difference (for merging: tests and the official schedule)."""
        if self.up.dim() == 2:
            return self.up @ self.down * self.scale
        up = self.up[:, :, 0, 0]
        if self.mid is None:
            return torch.einsum("or,rikl->oikl", up, self.down) * self.scale
        return torch.einsum("or,rskl,si->oikl", up, self.mid, self.down[:, :, 0, 0]) * self.scale


@dataclass
class DenseDelta:
    """``scale · (ΔW, Δb)`` for layers whose LoRA type only has a dense form (LoHa, LoKr, DoRA…)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    _cache: _CastCache = field(default_factory=_CastCache, repr=False, compare=False)

    def check(self, module: nn.Module, name: str) -> "DenseDelta":
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            if self.weight.numel() != weight.numel():
                raise ValueError(f"LoRA for {name}: delta {tuple(self.weight.shape)} does not fit {tuple(weight.shape)}")
            return DenseDelta(self.weight.reshape(weight.shape), self.bias, self.scale)
        return DenseDelta(self.weight, self.bias, self.scale)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, module: nn.Module, mask: torch.Tensor | None = None) -> None:
        """``out += delta(x)`` (times ``mask``, shaped to multiply ``out``)."""
        if mask is not None:
            part = torch.zeros_like(out)
            self.add_to(part, x, module)
            out.addcmul_(part, mask)
            return
        weight, bias = self._cache.get(x, self._scaled)
        if _is_conv(module):
            out += F.conv2d(x, weight, bias, groups=getattr(module, "groups", 1), **_conv_args(module))
            return
        _accumulate(out, x, weight)
        if bias is not None:
            out += bias

    def _scaled(self) -> tuple:
        return self.weight * self.scale, None if self.bias is None else self.bias * self.scale

    def dense(self) -> torch.Tensor:
        return self.weight * self.scale


Delta = Union[LowRankDelta, DenseDelta]


@dataclass
class StackedLowRank:
    """Several concepts' plain low-rank deltas of one layer as one product (fast mode).

    Fast mode adds every concept's delta, masked, to the same rows. With the downs stacked
    along the rank and the ups side by side, that is one down product, the rank channels
    multiplied by their concept's mask, one up product: the layer's input is read once and
    its output written once, whatever the number of concepts.
    """

    concepts: list[int]
    ranks: list[int]
    down: torch.Tensor
    up: torch.Tensor
    """[out, Σ ranks], each concept's scale folded in."""
    _cache: _CastCache = field(default_factory=_CastCache, repr=False, compare=False)

    @classmethod
    def of(cls, deltas: Sequence[Delta | None]) -> "StackedLowRank | None":
        """The stack of a layer's deltas, or None when one of them is not a plain low-rank pair
        (dense, Tucker) or their down factors differ in shape."""
        present = [(j, d) for j, d in enumerate(deltas) if d is not None]
        if len(present) < 2 or not all(isinstance(d, LowRankDelta) and d.mid is None for _, d in present):
            return None
        if len({tuple(d.down.shape[1:]) for _, d in present}) != 1:
            return None
        return cls([j for j, _ in present], [d.down.shape[0] for _, d in present],
                   torch.cat([d.down for _, d in present]), torch.cat([d.up.flatten(1) * d.scale for _, d in present], dim=1))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, module: nn.Module, masks: "LayerMasks") -> None:
        """``out += Σ_j M_j · delta_j(x)``."""
        down, up = self._cache.get(x, lambda: (self.down, self.up))
        conv = _is_conv(module)
        if conv:  # ``check`` gave convolutions 4-D factors
            h = F.conv2d(x, down, **(_conv_args(module) if down.shape[-2:] != (1, 1) else {}))
        else:
            h = F.linear(x, down)
        _accumulate(out, h * masks.for_outputs(out, self.concepts, self.ranks), up, channels_first=conv)


TEXT_SIDE = ("attn2.to_k", "attn2.to_v")
"""Layers that project the text context (cross-attention keys and values), not the image."""


class _RouteHook:
    """The forward hook of one layer: adds each routed concept's delta to its rows."""

    def __init__(self, router: "RowRoutedLoRA", name: str, deltas: list[Delta | None]) -> None:
        self.router, self.name, self.deltas = router, name, deltas
        self.text_side = name.endswith(TEXT_SIDE)
        self.stacked: StackedLowRank | bool | None = None
        """Fast mode's one product for all concepts (False: not possible here), made on first use."""

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        spans, batch = self.router.spans, self.router.batch
        if not spans:
            return self._masked(module, inputs, output) if self.router.masks is not None else None
        # in the output's dtype: under autocast (A1111 on CUDA) or a host's manual cast the layer's
        # input can be float32 (after a GroupNorm) while it computes and returns half precision
        x = inputs[0].to(output.dtype)
        if batch is not None and x.shape[0] != batch:
            raise RuntimeError(
                f"OMG LoRA routing: {self.name} got {x.shape[0]} rows, the routed call has {batch}; "
                "the host split the batch inside the UNet, which row routing cannot follow"
            )
        for concept, start, stop in spans:
            delta = self.deltas[concept]
            if delta is not None:
                delta.add_to(output[start:stop], x[start:stop], module)
        return output

    def _masked(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Fast mode: ``output += Σ_j M_j · delta_j(x)`` with each concept's mask at this layer's resolution,
        on the rows some mask touches (``LayerMasks.rows``).

        Cross-attention keys and values (text-side layers) are left to ``fast_cross_attention``.
        """
        masks = self.router.masks
        if self.text_side or masks.rows.start == masks.rows.stop:
            return None
        x, out = inputs[0][masks.rows].to(output.dtype), output[masks.rows]  # ``out`` is a view: adds reach ``output``
        if self.stacked is None:
            self.stacked = StackedLowRank.of(self.deltas) or False
        if self.stacked:
            self.stacked.add_to(out, x, module, masks)
            return output
        for concept, delta in enumerate(self.deltas):
            if delta is not None:
                delta.add_to(out, x, module, mask=masks.for_output(out, concept))
        return output


class RowRoutedLoRA:
    """Per-concept deltas on named layers of one model, routed to rows per forward.

    ``deltas[j]`` maps layer names (as in ``modules``) to concept j's delta. Use
    ``installed()`` to add the hooks for a scope; ``route()`` / ``route_all()`` to say
    which rows each concept owns in the next forward calls.
    """

    def __init__(self, modules: Mapping[str, nn.Module], deltas: Sequence[Mapping[str, Delta]]) -> None:
        self.concepts = len(deltas)
        per_layer: dict[str, list[Delta | None]] = {}
        for j, concept in enumerate(deltas):
            for name, delta in concept.items():
                if name not in modules:
                    raise ValueError(f"LoRA of concept {j + 1} targets {name!r}, which the model does not have")
                per_layer.setdefault(name, [None] * self.concepts)[j] = delta.check(modules[name], name)
        self._layers = {name: (modules[name], ds) for name, ds in per_layer.items()}
        self._handles: list = []
        self.spans: tuple[tuple[int, int, int | None], ...] = ()
        self.batch: int | None = None
        self.masks: "LayerMasks | None" = None

    @contextlib.contextmanager
    def installed(self) -> Iterator["RowRoutedLoRA"]:
        """Add the hooks; remove every one of them on exit, also on exceptions."""
        try:
            for name, (module, ds) in self._layers.items():
                self._handles.append(module.register_forward_hook(_RouteHook(self, name, ds)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.spans, self.batch, self.masks = (), None, None

    @contextlib.contextmanager
    def route(self, spans: Sequence[tuple[int, int, int]], batch: int) -> Iterator[None]:
        """Within the scope, rows ``start:stop`` of every hooked layer get concept ``j``'s delta."""
        previous = self.spans, self.batch
        self.spans, self.batch = tuple(spans), batch
        try:
            yield
        finally:
            self.spans, self.batch = previous

    @contextlib.contextmanager
    def masked(self, masks: "LayerMasks") -> Iterator[None]:
        """Within the scope (and no ``route``), every row gets every concept's delta times its mask (fast mode)."""
        previous, self.masks = self.masks, masks
        try:
            yield
        finally:
            self.masks = previous

    def route_all(self, concept: int) -> contextlib.AbstractContextManager:
        """Every row gets ``concept``'s delta: encoding a concept prompt with its text-encoder LoRA."""
        return self.route([(concept, 0, None)], batch=None)
