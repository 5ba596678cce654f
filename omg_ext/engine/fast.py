"""Fast mode: one pass, each concept's LoRA and prompt acting only inside its mask, in the host's rows.

The default mode runs a second pass with concept rows beside the host rows (2 + 1 + 2k
rows per image). Fast mode (DESIGN.md §7) runs the host's rows only:

- until the blend start, exactly as pass 1 (class-word attention captured);
- at the blend start, masks are made from what has been captured so far;
- from then on, in every layer a concept's LoRA targets, ``y = layer(x) + Σ_j M_j ·
  delta_j(x)`` with ``M_j`` the concept's mask at that layer's resolution (convolutions,
  attention q and output projections, feed-forward, the transformer's projections), and in
  cross-attention, whose keys and values see text rather than space, each concept gets its
  own keys and values (its prompt, its LoRA on ``to_k``/``to_v``); the attention outputs
  are combined by mask: ``(1 - Σ M_j)·attn(q, k, v) + Σ M_j·attn(q, k_j, v_j)``.

No concept rows, no reference row, no second pass: the cost is a plain image's plus the
low-rank products and one more attention per concept at cross-attention layers, both on the
rows some mask touches only (not the uncond rows under shared guidance). What it
gives up: the concepts share the host rows' self-attention and normalisation, so each
concept's region still sees the others.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .resolution import layer_factor


class LayerMasks:
    """The concept masks of a call's rows, resized once per layer resolution.

    Only the rows that some mask touches are kept (``rows``, from the first such row to the
    last): a row whose masks are all zero (an uncond row whose guidance stays the host's, an
    image without concepts) needs no delta and no concept attention, and fast mode computes
    neither for it. Every mask below has ``rows``' rows.
    """

    def __init__(self, masks: torch.Tensor) -> None:
        """``masks``: [rows, k, H, W] at latent resolution, one row per row of the call."""
        touched = masks.flatten(1).ne(0).any(dim=1).nonzero().flatten().tolist()
        self.rows = slice(touched[0], touched[-1] + 1) if touched else slice(0, 0)
        self.masks = masks[self.rows]
        self.latent_hw = tuple(masks.shape[-2:])
        self._resized: dict[tuple[int, int], torch.Tensor] = {}
        self._shaped: dict[tuple, torch.Tensor] = {}

    def at(self, hw: tuple[int, int]) -> torch.Tensor:
        """[rows, k, h, w]: area-averaged when smaller (Σ ≤ 1 holds), bilinear when larger."""
        if hw not in self._resized:
            m = self.masks
            if tuple(m.shape[-2:]) != hw:
                smaller = hw[0] <= m.shape[-2] and hw[1] <= m.shape[-1]
                m = F.interpolate(m, size=hw, mode="area") if smaller else \
                    F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
            self._resized[hw] = m
        return self._resized[hw]

    def tokens(self, n: int) -> torch.Tensor:
        """[rows, k, n]: the masks of a layer with ``n`` spatial tokens (row-major, as ldm flattens)."""
        _, hw = layer_factor(n, self.latent_hw)
        return self.at(hw).flatten(2)

    def for_output(self, out: torch.Tensor, concept: int) -> torch.Tensor:
        """Concept ``concept``'s mask shaped to multiply a layer's output (made once per shape and dtype).

        Convolutions give [rows, C, h, w] → [rows, 1, h, w]; token layers [rows, n, C] →
        [rows, n, 1]. A layer whose output has no spatial positions (a time or class
        embedding) cannot be masked: its delta is weighted by the share of the image the
        mask covers, which is exact for a mask over the whole image.
        """
        return self.for_outputs(out, (concept,), (1,))

    def for_outputs(self, out: torch.Tensor, concepts: Sequence[int], repeats: Sequence[int]) -> torch.Tensor:
        """The masks of ``concepts``, each repeated ``repeats[i]`` times along the layer's feature axis
        (``StackedLowRank``'s rank channels), shaped to multiply its output; cached per layer shape."""
        spatial = tuple(out.shape[2:]) if out.dim() == 4 else tuple(out.shape[1:-1])
        key = (out.dim(), spatial, out.dtype, tuple(concepts), tuple(repeats))
        if key not in self._shaped:
            masks = self._spatial(out)[:, list(concepts)]  # [rows, k', *positions]
            masks = masks.repeat_interleave(torch.tensor(repeats, device=masks.device), dim=1)
            self._shaped[key] = (masks if out.dim() == 4 else masks.movedim(1, -1)).to(out.dtype)
        return self._shaped[key]

    def _spatial(self, out: torch.Tensor) -> torch.Tensor:
        """[rows, k, *positions of ``out``]: (h, w) of a convolution, n of a token layer, nothing of another."""
        if out.dim() == 4:
            return self.at(tuple(out.shape[-2:]))
        if out.dim() == 3:
            try:
                return self.tokens(out.shape[1])
            except ValueError:  # a token count that is not spatial
                pass
        share = self.masks.flatten(2).mean(dim=2)  # [rows, k]
        return share.view(*share.shape, *([1] * (out.dim() - 2)))


@dataclass
class FastCall:
    """What cross-attention layers need in one fast-mode call."""

    masks: LayerMasks
    contexts: list[torch.Tensor]
    """Per concept, [masked rows, tokens, C] (``masks.rows``): its prompt's context for cond rows, its negative
    prompt's for uncond rows."""
    concept_kv: Callable[[int], contextlib.AbstractContextManager]
    """Scope in which the key/value projections carry concept j's LoRA on every row."""
