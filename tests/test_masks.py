"""Masks from attention: exclusive, dilated and feathered as asked, instances left to right."""
import pytest
import torch

from omg_ext.masks import (connected_components, dilate, masks_from_attention, normalize_map, otsu_threshold, overlay,
                           split_instances)


def _blob(h, w, cy, cx, r, strength=1.0):
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return strength * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r ** 2))


@pytest.mark.parametrize("dilation,feather", [(0, 0), (16, 0), (0, 16), (24, 40)])
def test_masks_are_exclusive(dilation, feather):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 8, 8, generator=g) + _blob(8, 8, 4, 4, 3)  # heavy overlap
    r = masks_from_attention(maps, (32, 32), dilation=dilation, feather=feather)
    assert r.masks.shape == (4, 32, 32)
    assert r.masks.min() >= 0 and r.masks.sum(0).max() <= 1.0


def test_overlap_goes_to_the_stronger_evidence():
    a = _blob(32, 32, 16, 12, 5, strength=1.0) + 0.01
    b = _blob(32, 32, 16, 20, 5, strength=1.0) + 0.01
    a[16, 15] = 1.5  # concept 0 is stronger at this overlapping pixel
    r = masks_from_attention(torch.stack([a, b]), (32, 32))
    assert r.masks[0, 16, 15] == 1 and r.masks[1, 16, 15] == 0
    assert r.masks[1, 16, 20] == 1 and r.masks[0, 16, 20] == 0


def test_dilation_grows_by_the_radius_in_latent_pixels():
    m = torch.zeros(1, 16, 16)
    m[0, 6:9, 6:9] = 1
    plain = masks_from_attention(m, (16, 16)).masks[0]
    grown = masks_from_attention(m, (16, 16), dilation=16).masks[0]  # 16 px = 2 latent px
    assert plain.sum() == 9 and set(plain.unique().tolist()) == {0.0, 1.0}
    assert grown.sum() == 49 and grown[4:11, 4:11].sum() == 49


def test_feather_softens_edges_and_keeps_owned_interiors_at_one():
    m = torch.zeros(2, 32, 32)
    m[0, :, :16] = 1
    m[1, :, 16:] = 1
    r = masks_from_attention(m, (32, 32), feather=32)  # 4 latent px
    edge = r.masks[0, 10, 15]
    assert 0 < edge < 1
    torch.testing.assert_close(r.masks.sum(0), torch.ones(32, 32))  # the two own everything: the sum stays 1
    assert r.masks[0, 10, 2] == 1


def test_otsu_threshold_lies_between_the_modes():
    m = torch.cat([torch.full((100,), 0.1), torch.full((50,), 0.8)])
    assert 0.1 < otsu_threshold(m) <= 0.8
    assert normalize_map(torch.full((3, 3), 2.0)).abs().sum() == 0


def test_connected_components():
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[0:2, 0:2] = True
    b[5:8, 5:8] = True
    b[2, 2] = True  # diagonal neighbour joins the first
    labels, n = connected_components(b)
    assert n == 2 and labels[2, 2] == labels[0, 0] != labels[6, 6]


def test_same_word_concepts_are_assigned_left_to_right():
    shared = _blob(32, 32, 16, 7, 3) + _blob(32, 32, 16, 25, 3)
    r = masks_from_attention(torch.stack([shared, shared]), (32, 32), groups=[[0, 1]])
    assert r.masks[0, 16, 7] == 1 and r.masks[1, 16, 25] == 1
    assert r.masks[0, :, 16:].sum() == 0 and r.masks[1, :, :16].sum() == 0


def test_same_word_by_attention_follows_each_concepts_own_map():
    left, right = _blob(32, 32, 16, 7, 3), _blob(32, 32, 16, 25, 3)
    maps = torch.stack([right + 0.5 * left, left + 0.5 * right])  # concept 0 looks at the right one
    r = masks_from_attention(maps, (32, 32), groups=[[0, 1]], order="attention")
    assert r.masks[0, 16, 25] == 1 and r.masks[1, 16, 7] == 1
    r = masks_from_attention(maps, (32, 32), groups=[[0, 1]])
    assert r.masks[0, 16, 7] == 1


def test_fewer_components_than_concepts_split_into_bands():
    one = _blob(32, 32, 16, 16, 6)
    regions = split_instances(normalize_map(one), 3)
    xs = [torch.nonzero(r)[:, 1].float().mean() for r in regions]
    assert all(r.any() for r in regions) and xs == sorted(xs)
    assert (sum(r.int() for r in regions) <= 1).all()


def test_empty_concept_is_reported_by_name():
    maps = torch.stack([_blob(16, 16, 8, 8, 3), torch.zeros(16, 16)])
    r = masks_from_attention(maps, (16, 16), labels=["man", "woman"])
    assert r.empty == [1] and r.masks[1].sum() == 0
    assert r.warnings() == ["concept 2 ('woman'): empty mask, the concept was not found in the layout"]


def test_non_square_latents():
    r = masks_from_attention(torch.rand(2, 12, 20), (24, 40), dilation=8, feather=8)
    assert r.masks.shape == (2, 24, 40) and r.masks.sum(0).max() <= 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(maps=torch.rand(8, 8)), "maps must be"),
    (dict(dilation=-1), "dilation and feather must be >= 0"),
    (dict(order="random"), "order must be one of"),
    (dict(groups=[[0, 5]]), "concept index 5 out of range"),
    (dict(groups=[[0, 1], [1, 2]]), "concept index 1 is in two groups"),
])
def test_bad_input_is_named(kwargs, message):
    args = dict(maps=torch.rand(3, 8, 8), latent_size=(16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        masks_from_attention(args.pop("maps"), args.pop("latent_size"), **args)


def test_overlay_colours_each_concept():
    m = torch.zeros(2, 4, 4)
    m[0, :, :2] = 1
    m[1, :, 2:] = 1
    pic = overlay(m, torch.ones(3, 8, 8))
    assert pic.shape == (3, 4, 4)
    assert pic[0, 0, 0] > pic[2, 0, 0] and pic[2, 0, 3] > pic[0, 0, 3]


def test_dilate_zero_is_identity():
    b = torch.rand(5, 5) > 0.5
    assert dilate(b, 0) is b
