"""Where an attention layer sits in the UNet: its downsampling factor and grid, from its token count.

Its own module because both the attention processors and fast mode's per-layer masks need it,
and neither should import the other.
"""
from __future__ import annotations


def layer_factor(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Downsampling factor and (h, w) of a layer with ``tokens`` spatial positions.

    ldm's stride-2 convolutions round odd sizes up, so halve with ceil.
    """
    h, w = latent_hw
    factor = 1
    while h * w > tokens and h > 1:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
    if h * w != tokens:
        raise ValueError(f"attention over {tokens} positions does not match latent {latent_hw}")
    return factor, (h, w)
