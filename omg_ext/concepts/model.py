"""What the extraction loop needs of a host's model: ``ConceptModel``, filled in by each host (and the toy world).

The loop trains only new tensors (embedding vectors, LoRA factors); the model's own weights are read, never
written, and its gradients are never asked for (``torch.autograd.grad`` on the new tensors alone), so a model
whose parameters still have ``requires_grad`` set keeps no ``.grad`` either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from ..engine.attention import AttentionState, installed_attention


@dataclass
class ConceptModel:
    unet: nn.Module
    """The UNet's module tree: its attention modules are captured, its layers carry the LoRA option's hooks."""
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``predict(x_t, t, context) -> noise``: the raw UNet call, differentiable in ``context``."""
    encode: Callable[[list[str], dict[str, torch.Tensor]], torch.Tensor]
    """``encode(prompts, {name: vectors [n, dim]}) -> context [rows, tokens, dim]``, a name in a prompt standing for
    its vectors as a textual-inversion embedding does; differentiable in the vectors."""
    positions: Callable[[str, str, dict[str, torch.Tensor]], list[int]]
    """``positions(prompt, word, embeddings)``: the context positions of a word's tokens (an embedding's vectors)."""
    init_vectors: Callable[[str, int], torch.Tensor]
    """``init_vectors(text, n) -> [n, dim]``: a new embedding's start, from an init text (A1111's "initialization text")."""
    alphas_cumprod: torch.Tensor
    lora_layers: dict[str, nn.Module] = field(default_factory=dict)
    """Kohya key -> layer, for the LoRA option (the keys the written file uses)."""
    attention: Callable[[], ContextManager[AttentionState]] | None = None
    """A context in which the UNet's cross-attention can be captured; the engine's processors by default."""

    def captured_attention(self) -> ContextManager[AttentionState]:
        return self.attention() if self.attention is not None else installed_attention(self.unet)
