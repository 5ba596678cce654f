"""The LoRA option: a small LoRA per concept, trained beside its token, acting on that concept's rows only.

Kohya's layout (``lora_down`` [r, in(, kh, kw)], ``lora_up`` [out, r(, 1, 1)], ``alpha`` = r, so the scale is 1),
down drawn at random and up at zero, as kohya starts: the LoRA changes nothing until it is trained. Forward
hooks add each concept's ``up(down(x))`` on its rows; the layers' own weights are never touched, and the hooks
go as a set on exit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..merge.record import is_conv


class ConceptLoRA(nn.Module):
    def __init__(self, layers: dict[str, nn.Module], concepts: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        if not layers:
            raise ValueError("this model names no layer for a LoRA")
        self.layers, self.concepts, self.rank = layers, concepts, rank
        generator = torch.Generator().manual_seed(seed)
        self.factors = nn.ParameterDict()
        for key, module in layers.items():
            out_ch, in_ch, *kernel = module.weight.shape
            fan_in = module.weight[0].numel()
            for j in range(concepts):
                down = torch.randn(rank, in_ch, *kernel, generator=generator) / fan_in ** 0.5
                self.factors[f"{j}-{key}-down"] = nn.Parameter(down)
                self.factors[f"{j}-{key}-up"] = nn.Parameter(torch.zeros(out_ch, rank, *(1 for _ in kernel)))

    def _delta(self, j: int, key: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors[f"{j}-{key}-down"], self.factors[f"{j}-{key}-up"]
        x = x.float()
        if is_conv(module):
            h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=getattr(module, "dilation", 1))
            return F.conv2d(h, up)
        return F.linear(F.linear(x, down), up)

    @contextlib.contextmanager
    def installed(self, rows: Sequence[int | None]) -> Iterator[None]:
        """While inside, concept j's LoRA acts on the rows ``rows`` gives to j (a row of None has none)."""
        spans = {j: torch.tensor([r for r, c in enumerate(rows) if c == j]) for j in range(self.concepts)}
        spans = {j: index for j, index in spans.items() if len(index)}

        def hook(module, inputs, out, key):
            delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for j, index in spans.items():
                index = index.to(out.device)
                delta = delta.index_add(0, index, self._delta(j, key, module, inputs[0][index]))
            return out + delta.to(out.dtype)

        handles = []
        try:
            for key, module in self.layers.items():
                handles.append(module.register_forward_hook(lambda m, i, o, key=key: hook(m, i, o, key)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def kohya(self, j: int) -> dict[str, torch.Tensor]:
        """Concept j's LoRA as kohya tensors (fp16)."""
        tensors = {}
        for key in self.layers:
            tensors[f"{key}.lora_down.weight"] = self.factors[f"{j}-{key}-down"].detach().half().contiguous()
            tensors[f"{key}.lora_up.weight"] = self.factors[f"{j}-{key}-up"].detach().half().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(self.rank)).half()
        return tensors
