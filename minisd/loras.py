"""Random LoRA deltas for test models, and merging them into a copy for reference runs."""
from __future__ import annotations

import copy

import torch
from torch import nn

from omg_ext.engine.lora import DenseDelta, LowRankDelta


def _randn(generator: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def random_lowrank(module: nn.Module, *, rank: int = 4, seed: int = 0, scale: float = 0.5, mid: bool = False) -> LowRankDelta:
    """A kohya-style LoRA (LoCon for convs; ``mid`` gives a Tucker core) for one layer."""
    g = torch.Generator().manual_seed(seed)
    out_ch, in_ch = module.weight.shape[:2]
    std = 1.0 / in_ch ** 0.5
    if module.weight.dim() == 2:
        return LowRankDelta(_randn(g, out_ch, rank, std=1.0 / rank ** 0.5), _randn(g, rank, in_ch, std=std), scale=scale)
    kh, kw = module.weight.shape[2:]
    up = _randn(g, out_ch, rank, 1, 1, std=1.0 / rank ** 0.5)
    if mid:
        return LowRankDelta(up, _randn(g, rank, in_ch, 1, 1, std=std), _randn(g, rank, rank, kh, kw, std=0.3), scale=scale)
    return LowRankDelta(up, _randn(g, rank, in_ch, kh, kw, std=std / (kh * kw) ** 0.5), scale=scale)


def random_dense(module: nn.Module, *, seed: int = 0, scale: float = 0.5, bias: bool = False) -> DenseDelta:
    """A dense weight delta (what LoHa, LoKr or DoRA reduce to) for one layer; ``bias`` adds a bias delta."""
    g = torch.Generator().manual_seed(seed)
    weight = module.weight
    bias_delta = _randn(g, weight.shape[0], std=0.5) if bias else None
    return DenseDelta(_randn(g, *weight.shape, std=weight.std().item()), bias_delta, scale=scale)


def random_concept_deltas(model: nn.Module, *, seed: int, dense_every: int = 0, rank: int = 4) -> dict:
    """Deltas on every Linear and Conv2d with the given seed; every ``dense_every``-th layer dense."""
    deltas = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i, (name, module) in enumerate(layers):
        s = seed * 100_003 + i
        if dense_every and i % dense_every == 0:
            deltas[name] = random_dense(module, seed=s, scale=0.3)
        else:
            deltas[name] = random_lowrank(module, rank=rank, seed=s, mid=isinstance(module, nn.Conv2d) and i % 3 == 0, scale=0.3)
    return deltas


def merged(model: nn.Module, deltas: dict) -> nn.Module:
    """A deep copy of ``model`` with the deltas added to its weights (the host's merge path)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight += delta.dense().reshape(weight.shape)
            if getattr(delta, "bias", None) is not None:
                modules[name].bias += delta.bias * delta.scale
    return model
