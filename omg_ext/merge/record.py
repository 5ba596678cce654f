"""A uniform sample of each layer's inputs while a concept's LoRA is active: the ``X_i`` of the per-layer fit.

Forward pre-hooks on the target layers read each call's input as rows of the layer's matrix product —
a Linear's tokens, a convolution's unfolded patches — and keep a fixed number of them per layer, drawn
uniformly over every call (each row gets a random key; the smallest keys stay). Memory is bounded by
``rows`` × the layer's input width, whatever the number of calls. The hooks go as a set on exit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def is_conv(module: nn.Module) -> bool:
    return hasattr(module, "stride") and hasattr(module, "padding") and module.weight.dim() == 4


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its weight (flattened to [out, in·kh·kw]) multiplies."""
    if is_conv(module):
        patches = F.unfold(x, module.weight.shape[2:], dilation=getattr(module, "dilation", 1), padding=module.padding,
                           stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the [out, in] matrix ``input_rows`` meets (a float32 copy)."""
    return module.weight.detach().float().reshape(module.weight.shape[0], -1).clone()


class RowSample:
    """At most ``size`` rows, uniform over everything ``add``ed."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.size:
            keep = keys.topk(self.size, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


@contextlib.contextmanager
def recording(modules: Mapping[str, nn.Module], rows: int, seed: int = 0) -> Iterator[dict[str, RowSample]]:
    """Samples of every module's input rows for the scope (``{name: RowSample}``); hooks removed on exit."""
    generator = torch.Generator().manual_seed(seed)
    samples = {name: RowSample(rows, generator) for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(
                lambda m, inputs, sample=samples[name]: sample.add(input_rows(m, inputs[0]))))
        yield samples
    finally:
        for handle in handles:
            handle.remove()
