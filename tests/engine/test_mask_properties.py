"""Properties of the attention-mask pipeline for random maps and shapes (hypothesis).

For any non-negative maps of any (non-square) size: masks have the latent's (H, W), lie
in [0, 1] and are exclusive (Σ ≤ 1 at every pixel); a concept whose map is one bright
blob gets that blob, in that place and orientation; dilation and feathering never reach
into another concept's core when the cores lie further apart than dilation plus feather.
(Closer than that, a feathered edge does reach into the neighbour's core: hypothesis found
0.107 one pixel inside it for cores 1 px apart with feather 8 px.)
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omg_ext.engine.masks import attention_cores, masks_from_attention

SETTINGS = settings(max_examples=40, deadline=None)
sizes = st.tuples(st.integers(6, 20), st.integers(6, 20))


@SETTINGS
@given(k=st.integers(1, 4), map_hw=sizes, latent=sizes, seed=st.integers(0, 2 ** 16),
       dilation=st.sampled_from([0, 8, 16]), feather=st.sampled_from([0, 8, 16]))
def test_masks_are_exclusive_bounded_and_latent_sized(k, map_hw, latent, seed, dilation, feather):
    maps = torch.rand(k, *map_hw, generator=torch.Generator().manual_seed(seed)) ** 3
    masks = masks_from_attention(maps, latent, dilation=dilation, feather=feather).masks
    assert tuple(masks.shape) == (k, *latent)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert float(masks.sum(0).max()) <= 1 + 1e-6


def _blob_maps(latent, centres, radius=2):
    """One bright square blob per concept at the given (row, col) on a faint noisy floor."""
    h, w = latent
    maps = 0.01 * torch.rand(len(centres), h, w, generator=torch.Generator().manual_seed(0))
    for j, (r, c) in enumerate(centres):
        maps[j, max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1] = 1.0
    return maps


@SETTINGS
@given(latent=st.tuples(st.integers(22, 30), st.integers(8, 30)), data=st.data(),
       dilation=st.sampled_from([0, 8, 16]), feather=st.sampled_from([0, 8, 16]))
def test_a_blob_becomes_its_concepts_mask_in_place_and_never_leaks_into_another_core(latent, data, dilation, feather):
    h, w = latent
    # two blobs at least 7 rows apart: more than dilation (≤ 2 latent px) plus feather (≤ 2)
    first = (data.draw(st.integers(2, 5)), data.draw(st.integers(2, w - 3)))
    second = (data.draw(st.integers(h - 5, h - 3)), data.draw(st.integers(2, w - 3)))
    maps = _blob_maps(latent, [first, second])
    cores, _, _ = attention_cores(maps, latent)
    masks = masks_from_attention(maps, latent, dilation=dilation, feather=feather).masks
    for j, (r, c) in enumerate((first, second)):
        assert masks[j, r, c] > 0.5, "each concept owns its own blob's centre (orientation kept: row r, column c)"
        other = 1 - j
        assert float(masks[j][cores[other]].max()) == 0.0, "no mask reaches into another concept's core"
