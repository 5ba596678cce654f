"""What each row of a UNet call is, in host-neutral terms.

Hosts batch cond and uncond rows of several images into one UNet call, sometimes
split across calls, in an order that differs between hosts (A1111: cond rows then
uncond rows; Forge: ``cond_or_uncond`` lists the order). The engine never guesses
from positions: the host adapter says, per row, whether it is a cond or an uncond
row and which image of the batch it belongs to.
"""
from __future__ import annotations

from typing import NamedTuple


class RowRole(NamedTuple):
    """Role of one row of a UNet call: cond (positive prompt) or uncond, and its image."""

    is_cond: bool
    image: int


def roles_cond_then_uncond(batch_size: int) -> list[RowRole]:
    """The A1111 layout: B cond rows (one per image), then B uncond rows."""
    return [RowRole(True, b) for b in range(batch_size)] + [RowRole(False, b) for b in range(batch_size)]
