"""What the extraction loop needs of a host's model: ``ConceptModel``, filled in by each host (and the toy world).

The loop trains only new tensors (embedding vectors, LoRA factors); the model's own weights are read, never
written, and its gradients are never asked for (``torch.autograd.grad`` on the new tensors alone), so a model
whose parameters still have ``requires_grad`` set keeps no ``.grad`` either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..engine.attention import AttentionState, installed_attention
from .files import embedding_vectors


@dataclass
class ConceptModel:
    unet: nn.Module
    """The UNet's module tree: its attention modules are captured, its layers carry the LoRA option's hooks."""
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``predict(x_t, t, context) -> noise``: the raw UNet call, differentiable in ``context``."""
    encode: Callable[[list[str], dict[str, torch.Tensor]], Any]
    """``encode(prompts, {name: vectors [n, dim]}) -> context`` (what ``predict`` takes: [rows, tokens, dim], or
    SDXL's ``{"crossattn", "vector"}``), a name in a prompt standing for its vectors as a textual-inversion
    embedding does; differentiable in the vectors."""
    positions: Callable[[str, str, dict[str, torch.Tensor]], list[int]]
    """``positions(prompt, word, embeddings)``: the context positions of a word's tokens (an embedding's vectors)."""
    init_vectors: Callable[[str, int], torch.Tensor]
    """``init_vectors(text, n) -> [n, dim]``: a new embedding's start, from an init text (A1111's "initialization text")."""
    alphas_cumprod: torch.Tensor
    parts: dict[str, int] | None = None
    """With two text encoders (SDXL), each one's share of a vector's ``dim`` (``{"clip_l": 768, "clip_g": 1280}``):
    the loop learns the joined vectors, the files keep them split (``files.embedding_vectors``)."""
    lora_layers: dict[str, nn.Module] = field(default_factory=dict)
    """Kohya key -> layer, for the LoRA option (the keys the written file uses)."""
    attention: Callable[[], ContextManager[AttentionState]] | None = None
    """A context in which the UNet's cross-attention can be captured; the engine's processors by default."""

    def embedding(self, vectors: torch.Tensor):
        """``vectors`` as the host's embedding files and database keep them."""
        return embedding_vectors(vectors, self.parts)

    def captured_attention(self) -> ContextManager[AttentionState]:
        return self.attention() if self.attention is not None else installed_attention(self.unet)
