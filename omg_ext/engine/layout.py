"""Layout preservation from pass 1's kept cross-attention outputs, instead of a reference row.

Pass 2 keeps the layout by giving each host cond row the cross-attention probabilities of
a reference row: pass 1's latent of the same call, with the same prompt. A host cond row
carries no concept LoRA, so its values are the reference's values too, and the replaced
output ``softmax(q_ref k_refᵀ) · v`` is exactly the reference row's own cross-attention
output — which pass 1 already computed, in the same call, on the same latent. Keeping those
outputs (one ``[rows, n, c]`` tensor per cross-attention layer and call) saves the reference
row: one UNet row per image in every blended call, a fifth of pass 2's rows for two
concepts. It costs memory: about 23 MB per step and image for SD1.5 at 512² in half
precision, ten times that for SDXL at 1024², so the record keeps them up to a byte limit
and a call whose outputs were not kept runs with a reference row as before (``PassRecord``).

Self-attention replacement (``self_attention_until``) still needs the reference row: its
probabilities are too large to keep.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

KEEP_SHARE = 0.5
"""The share of the memory free when pass 1 starts that the kept outputs may fill."""


def keep_limit(free_bytes: int | None) -> int | None:
    """Bytes the kept outputs may take: a share of the device's free memory, of the free RAM on a
    CPU (where ``MemoryBudget`` sets no limit), none where neither is known."""
    if free_bytes is None:
        try:
            import psutil  # every WebUI has it; the engine does not require it
        except ImportError:
            return None
        free_bytes = psutil.virtual_memory().available
    return int(free_bytes * KEEP_SHARE)


class LayoutOutputs:
    """Pass 1: the cross-attention outputs of one call's cond rows, by layer."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)
        """The kept rows' positions in the call (the host rows pass 2 gives them back to)."""
        self.by_layer: dict[Hashable, torch.Tensor] = {}

    def keep(self, layer: Hashable, out: torch.Tensor) -> None:
        self.by_layer[layer] = out[self.rows]  # indexing copies: the call's own tensor is not held

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.by_layer.values())


class LayoutTargets:
    """Pass 2: the host cond rows of one UNet call take their pass-1 outputs at every cross-attention layer."""

    def __init__(self, kept: LayoutOutputs, hosts: Sequence[tuple[int, int]]) -> None:
        """``hosts``: (row in this call, host row) of the call's host rows; those whose outputs were kept take them."""
        self.kept = kept
        slot = {row: i for i, row in enumerate(kept.rows)}
        targets = [(p, slot[host]) for p, host in hosts if host in slot]
        self.positions = [p for p, _ in targets]
        self.slots = [s for _, s in targets]

    def apply(self, layer: Hashable, out: torch.Tensor) -> torch.Tensor:
        if layer not in self.kept.by_layer:
            raise RuntimeError(f"OMG: pass 1 kept no cross-attention output for layer {layer!r}")
        out[self.positions] = self.kept.by_layer[layer][self.slots].to(out)
        return out
