"""Masks from attention: exclusive, dilated and feathered as asked, grouped instances (same-word, or figures) left to right."""
import math

import pytest
import torch

from omg_ext.engine.masks import (LATENT_SCALE, MaskResult, _bands, _exact_cap, attention_cores, concept_name, connected_components, dilate, feather,
                                  latent_radius, masks_from_attention, normalize_map, otsu_threshold, overlay,
                                  split_instances)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Maps are tiny: thread hand-offs cost more than the work (and a busy machine makes it worse)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blob(h, w, cy, cx, r, strength=1.0):
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return strength * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r ** 2))


def _box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m


# -- exclusivity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dilation,feather_px", [(0, 0), (16, 0), (0, 16), (24, 40), (64, 8), (4, 12)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_never_sum_above_one(dilation, feather_px, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(4, 8, 8, generator=g) + 3 * _blob(8, 8, 4, 4, 3)  # all four claim the centre
    for groups in (None, [[0, 2]]):
        r = masks_from_attention(maps, (32, 32), dilation=dilation, feather=feather_px, groups=groups)
        assert r.masks.shape == (4, 32, 32) and r.masks.dtype == torch.float32
        assert r.masks.min() >= 0.0 and r.masks.max() <= 1.0
        assert r.masks.sum(0).max() <= 1.0  # exact: the blend weight of the global prediction never goes negative


def test_without_feather_every_pixel_has_at_most_one_owner():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5)) + _blob(8, 8, 4, 4, 2)
    m = masks_from_attention(maps, (32, 32), dilation=24).masks
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert set(m.sum(0).unique().tolist()) <= {0.0, 1.0}


# -- who owns an overlap ----------------------------------------------------------------------------------------------

def test_overlap_goes_to_the_stronger_evidence():
    a = _blob(32, 32, 16, 12, 6)
    b = _blob(32, 32, 16, 20, 6)
    both = (a > otsu_threshold(normalize_map(a))) & (b > otsu_threshold(normalize_map(b)))
    assert both[16, 14:19].all()  # the cores overlap over x = 14..18
    r = masks_from_attention(torch.stack([a, b]), (32, 32))
    assert r.masks[0, 16, 14] == 1 and r.masks[1, 16, 14] == 0  # nearer a's centre: a is stronger
    assert r.masks[1, 16, 18] == 1 and r.masks[0, 16, 18] == 0  # nearer b's centre: b is stronger (not the lower index)
    assert r.masks[0, 16, 12] == 1 and r.masks[1, 16, 20] == 1


def test_a_single_strong_pixel_wins_inside_the_other_concepts_core():
    a = _blob(32, 32, 16, 12, 5) + 0.01
    b = _blob(32, 32, 16, 20, 5) + 0.01
    b[16, 13] = 2.0  # b's strongest pixel sits inside a's core
    r = masks_from_attention(torch.stack([a, b]), (32, 32))
    assert r.masks[1, 16, 13] == 1 and r.masks[0, 16, 13] == 0


def test_equal_evidence_ties_to_the_lower_index_and_the_loser_is_reported():
    m = _blob(16, 16, 8, 8, 3)
    r = masks_from_attention(torch.stack([m, m]), (16, 16), labels=["man", "dog"])
    assert r.empty == [1] and r.masks[1].sum() == 0 and r.masks[0].sum() > 0
    assert r.warnings() == ["concept 2 ('dog'): empty mask, the concept was not found in the layout"]


def test_dilated_rims_meet_halfway_instead_of_going_to_the_lower_index():
    shared = _box(32, 33, 8, 24, 4, 9) + _box(32, 33, 8, 24, 24, 29)  # cores x = 4..8 and 24..28, gap 9..23
    r = masks_from_attention(torch.stack([shared, shared]), (32, 33), groups=[[0, 1]], dilation=96)  # 12 latent px
    row = r.masks[:, 16]
    assert row[0, :17].tolist() == [1.0] * 17 and row[0, 17:].sum() == 0  # 16 is equidistant -> concept 0
    assert row[1, 17:].tolist() == [1.0] * 16 and row[1, :17].sum() == 0


# -- dilation and feathering ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("px,latent", [(0, 0), (3, 0), (4, 1), (8, 1), (12, 2), (16, 2), (20, 3), (64, 8)])
def test_latent_radius_rounds_halves_up(px, latent):
    assert LATENT_SCALE == 8 and latent_radius(px) == latent


def test_dilation_grows_a_pixel_and_a_square_by_the_radius_in_latent_pixels():
    dot = torch.zeros(1, 16, 16)
    dot[0, 7, 5] = 1
    plain = masks_from_attention(dot, (16, 16)).masks[0]
    assert plain.sum() == 1 and plain[7, 5] == 1
    grown = masks_from_attention(dot, (16, 16), dilation=16).masks[0]  # 16 px = 2 latent px
    assert torch.equal(grown, _box(16, 16, 5, 10, 3, 8))

    square = _box(16, 16, 6, 9, 6, 9)[None]
    assert torch.equal(masks_from_attention(square, (16, 16)).masks[0], square[0])
    assert torch.equal(masks_from_attention(square, (16, 16), dilation=16).masks[0], _box(16, 16, 4, 11, 4, 11))
    assert torch.equal(masks_from_attention(square, (16, 16), dilation=8).masks[0], _box(16, 16, 5, 10, 5, 10))


def test_dilate_square_disc_and_identity():
    b = torch.zeros(9, 9, dtype=torch.bool)
    b[4, 4] = True
    assert dilate(b, 0) is b
    sq = dilate(b, 2)
    assert sq.dtype == torch.bool and sq.sum() == 25
    disc = dilate(b, 2, shape="disc")
    assert disc.sum() == 13 and not disc[2, 2] and disc[2, 4] and disc[3, 3]  # x²+y² ≤ 4
    assert dilate(b.float(), 1).dtype == torch.float32
    assert dilate(b, 3, shape="disc").sum() == 29  # x²+y² ≤ 9
    corner = torch.zeros(5, 7, dtype=torch.bool)
    corner[0, 6] = True
    assert torch.equal(dilate(corner, 1), _box(5, 7, 0, 2, 5, 7).bool())  # same size out, clipped at the border
    with pytest.raises(ValueError, match="radius must be >= 0, got -1"):
        dilate(b, -1)
    with pytest.raises(ValueError, match="shape must be 'square' or 'disc', got 'star'"):
        dilate(b, 1, shape="star")


def test_feather_zero_gives_binary_masks():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    r = masks_from_attention(maps, (32, 32), dilation=8, feather=0)
    assert set(r.masks.unique().tolist()) <= {0.0, 1.0}


def test_feather_softens_the_boundary_and_keeps_owned_interiors_exact():
    halves = torch.stack([_box(32, 32, 0, 32, 0, 16), _box(32, 32, 0, 32, 16, 32)])
    r = masks_from_attention(halves, (32, 32), feather=16)  # 2 latent px: sigma 1, kernel half-width 2
    k = [math.exp(-0.5 * o * o) for o in range(-2, 3)]
    inner = sum(k[:3]) / sum(k)  # the last owned column sees offsets -2..0 of its own
    assert r.masks[0, 10, 15].item() == pytest.approx(inner, abs=1e-6)  # 0.70131
    assert r.masks[0, 10, 16].item() == pytest.approx(1 - inner, abs=1e-6)
    assert 0 < r.masks[0, 10, 17] < r.masks[0, 10, 16] < r.masks[0, 10, 15] < 1
    assert (r.masks[0, :, :14] == 1).all() and (r.masks[1, :, :14] == 0).all()  # whole window owned: exactly 1 and 0
    assert (r.masks[0, :, 18:] == 0).all() and (r.masks[1, :, 18:] == 1).all()
    assert r.masks.sum(0).max() <= 1.0
    assert (r.masks.sum(0) - 1).abs().max() <= 1e-6  # the two own everything


def test_feather_of_a_lone_concept_fades_to_the_global_prediction():
    r = masks_from_attention(_box(32, 32, 8, 24, 8, 24)[None], (32, 32), feather=24)  # 3 latent px
    m = r.masks[0]
    assert m[16, 16] == 1 and m[0, 0] == 0 and m[16, 4] == 0  # 4 px outside: beyond the kernel
    edge = m[16, 5:11]
    assert ((edge > 0) & (edge < 1)).all() and (edge[1:] > edge[:-1]).all()


def test_feather_function_keeps_a_partition_at_or_below_one():
    owner = torch.randint(0, 4, (20, 30), generator=torch.Generator().manual_seed(0))
    parts = torch.stack([(owner == j).float() for j in range(3)])  # owner 3 = the global prediction
    soft = feather(parts, 2)
    assert soft.shape == parts.shape and soft.min() >= 0
    assert soft.sum(0).max() <= 1.0 + 1e-6
    one = parts[0]
    assert feather(one, 0) is one and feather(one, 2).shape == (20, 30)


# -- thresholds and components ----------------------------------------------------------------------------------------

def test_otsu_threshold_lies_between_the_modes():
    g = torch.Generator().manual_seed(0)
    m = torch.cat([0.1 + 0.03 * torch.randn(300, generator=g), 0.8 + 0.03 * torch.randn(60, generator=g)]).clamp(0, 1)
    t = otsu_threshold(m)
    assert 0.25 < t < 0.65
    assert ((m > t) == (torch.arange(360) >= 300)).all()
    exact = torch.cat([torch.full((100,), 0.1), torch.full((50,), 0.8)])
    assert 0.4 < otsu_threshold(exact) < 0.5  # a gap between two spikes: the middle of it


def test_normalize_map():
    assert torch.equal(normalize_map(torch.tensor([[2.0, 4.0], [3.0, 6.0]])), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert normalize_map(torch.full((3, 3), 2.0)).abs().sum() == 0


def test_connected_components_eight_and_four():
    b = torch.zeros(8, 8, dtype=torch.bool)
    b[0:2, 0:2] = True
    b[2, 2] = True  # touches the first block only diagonally
    b[5:8, 5:8] = True
    labels, n = connected_components(b)
    assert n == 2 and labels[2, 2] == labels[0, 0] != labels[6, 6] and labels[3, 3] == 0
    assert sorted(labels.unique().tolist()) == [0, 1, 2]
    labels4, n4 = connected_components(b, connectivity=4)
    assert n4 == 3 and labels4[2, 2] != labels4[0, 0]
    edge = torch.zeros(3, 5, dtype=torch.bool)
    edge[0, 0] = edge[2, 4] = True  # components in opposite corners: labelled in raster order, 1 then 2
    assert connected_components(edge)[0].tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]]
    with pytest.raises(ValueError, match="connectivity must be 4 or 8, got 6"):
        connected_components(b, connectivity=6)
    with pytest.raises(ValueError, match=r"binary must be \[h, w\], got shape \(1, 8, 8\)"):
        connected_components(b[None])


def test_connected_components_follows_a_long_snake():
    b = torch.zeros(31, 31, dtype=torch.bool)
    b[::2] = True  # rows 0, 2, ..., 30, joined alternately at the right and left ends
    for i, r in enumerate(range(1, 31, 2)):
        b[r, 30 if i % 2 == 0 else 0] = True
    labels, n = connected_components(b, connectivity=4)
    assert n == 1 and (labels[b] == 1).all()


# -- same-word instances ----------------------------------------------------------------------------------------------

def test_same_word_concepts_are_assigned_left_to_right():
    shared = _blob(32, 32, 16, 7, 3) + _blob(32, 32, 16, 25, 3)
    r = masks_from_attention(torch.stack([shared, shared]), (32, 32), groups=[[0, 1]], labels=["man", "man"])
    assert r.masks[0, 16, 7] == 1 and r.masks[1, 16, 25] == 1
    assert r.masks[0, :, 16:].sum() == 0 and r.masks[1, :, :16].sum() == 0
    assert r.empty == [] and r.warnings() == []
    r = masks_from_attention(torch.stack([shared, shared]), (32, 32), groups=[[1, 0]])
    assert r.masks[1, 16, 7] == 1 and r.masks[0, 16, 25] == 1  # the first listed gets the leftmost


def test_same_word_ties_in_x_go_top_to_bottom():
    shared = _blob(32, 32, 6, 16, 3) + _blob(32, 32, 25, 16, 3)
    r = masks_from_attention(torch.stack([shared, shared]), (32, 32), groups=[[0, 1]])
    assert r.masks[0, 6, 16] == 1 and r.masks[1, 25, 16] == 1


def test_same_word_by_attention_follows_each_concepts_own_map():
    left, right = _blob(32, 32, 16, 7, 3), _blob(32, 32, 16, 25, 3)
    maps = torch.stack([right + 0.5 * left, left + 0.5 * right])  # concept 0 looks at the right one
    r = masks_from_attention(maps, (32, 32), groups=[[0, 1]], order="attention")
    assert r.masks[0, 16, 25] == 1 and r.masks[1, 16, 7] == 1
    assert r.masks[0, :, :16].sum() == 0 and r.masks[1, :, 16:].sum() == 0
    r = masks_from_attention(maps, (32, 32), groups=[[0, 1]])  # by position, the own maps are ignored
    assert r.masks[0, 16, 7] == 1 and r.masks[1, 16, 25] == 1


def test_attention_order_keeps_left_to_right_when_the_maps_do_not_differ():
    shared = _blob(32, 32, 16, 7, 3) + _blob(32, 32, 16, 25, 3)
    maps = torch.stack([shared, shared * 1.01])
    r = masks_from_attention(maps, (32, 32), groups=[[0, 1]], order="attention")
    assert r.masks[0, 16, 7] == 1 and r.masks[1, 16, 25] == 1
    left, right = _blob(32, 32, 16, 7, 3), _blob(32, 32, 16, 25, 3)
    slight = torch.stack([left + 1.03 * right, shared])  # concept 0 leans right by ~1.5% of the total: noise
    r = masks_from_attention(slight, (32, 32), groups=[[0, 1]], order="attention")
    assert r.masks[0, 16, 7] == 1 and r.masks[1, 16, 25] == 1


def test_attention_order_with_more_instances_than_brute_force_takes():
    """Six same-word instances: the greedy assignment follows each concept's own map."""
    blobs = [_blob(16, 96, 8, 8 + 16 * i, 2) for i in range(6)]
    wanted = [3, 0, 5, 1, 4, 2]  # concept j looks at blob wanted[j]
    own = [blobs[i] + 0.2 * sum(blobs) for i in wanted]
    regions = split_instances(normalize_map(sum(blobs)), 6, "attention", own)
    assert [int(torch.nonzero(r)[:, 1].float().mean().round()) for r in regions] == [8 + 16 * i for i in wanted]
    assert [int(torch.nonzero(r)[:, 1].float().mean().round()) for r in split_instances(normalize_map(sum(blobs)), 6)] \
        == [8 + 16 * i for i in range(6)]


def test_more_components_than_instances_keep_the_largest():
    regions = split_instances(_box(12, 40, 2, 10, 1, 9) + _box(12, 40, 3, 9, 14, 20) + _box(12, 40, 4, 8, 26, 38), 2)
    assert [int(r.sum()) for r in regions] == [64, 48]  # the 8x8 and 4x12 boxes; the 6x6 one (36 px) goes to no one
    assert regions[0][5, 4] and regions[1][5, 30] and not any(r[5, 16] for r in regions)


def test_split_instances_edge_cases():
    one = _blob(16, 16, 8, 8, 3)
    assert torch.equal(split_instances(one, 1)[0], one > otsu_threshold(one))  # one concept: the foreground
    empty = split_instances(torch.zeros(8, 8), 3)
    assert len(empty) == 3 and all(r.dtype == torch.bool and not r.any() for r in empty)
    speck = torch.zeros(8, 8)
    speck[3, 5] = 1.0
    regions = split_instances(speck, 3)  # fewer pixels than concepts in both directions: the first gets it
    assert regions[0][3, 5] and regions[0].sum() == 1 and len(regions) == 3 and not regions[1].any() and not regions[2].any()
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        split_instances(one, 0)
    with pytest.raises(ValueError, match="order must be one of .*, got 'random'"):
        split_instances(one, 2, "random")


def test_exact_cap_brings_sums_to_at_most_one_and_leaves_the_rest():
    masks = torch.tensor([[[0.6, 0.3]], [[0.5, 0.7]]])
    capped = _exact_cap(masks)
    assert capped.sum(0).max() <= 1 and torch.equal(capped[:, 0, 1], masks[:, 0, 1])  # 0.3 + 0.7 ≤ 1: untouched
    torch.testing.assert_close(capped[:, 0, 0], torch.tensor([0.6, 0.5]) / 1.1)
    assert _exact_cap(torch.zeros(0, 2, 3)).shape == (0, 2, 3)


def test_no_concepts_give_empty_cores_at_the_latent_size():
    binary, evidence, notes = attention_cores(torch.zeros(0, 8, 6), (16, 12))
    assert binary.shape == (0, 16, 12) and binary.dtype == torch.bool and evidence.shape == (0, 16, 12) and notes == []


def test_attention_order_with_three_instances():
    blobs = [_blob(24, 48, 12, x, 3) for x in (6, 24, 42)]
    own = [blobs[2] + 0.3 * blobs[0], blobs[0] + 0.3 * blobs[1], blobs[1] + 0.3 * blobs[2]]
    regions = split_instances(normalize_map(sum(blobs)), 3, "attention", [normalize_map(m) for m in own])
    assert [bool(r[12, x]) for r, x in zip(regions, (42, 6, 24))] == [True, True, True]


def test_fewer_components_than_concepts_split_into_bands():
    one = _blob(32, 32, 16, 16, 6)
    regions = split_instances(normalize_map(one), 3)
    fg = normalize_map(one) > otsu_threshold(normalize_map(one))
    assert all(r.any() for r in regions)
    assert (sum(r.int() for r in regions) == fg.int()).all()  # disjoint, and together the whole foreground
    cols = [torch.nonzero(r)[:, 1] for r in regions]
    assert cols[0].max() < cols[1].min() and cols[1].max() < cols[2].min()  # vertical bands, left to right
    mass = [float((normalize_map(one) * r).sum()) for r in regions]
    assert max(mass) / min(mass) < 1.6  # cut at mass quantiles: a symmetric blob -> comparable thirds


def test_band_split_in_the_pipeline_is_reported():
    one = _blob(16, 32, 8, 16, 4)
    r = masks_from_attention(torch.stack([one, one]), (16, 32), groups=[[0, 1]], labels=["man", "man"])
    assert r.empty == []
    assert r.masks[0].sum() > 0 and r.masks[1].sum() > 0 and (r.masks[0] * r.masks[1]).sum() == 0
    xs = [torch.nonzero(m)[:, 1].float().mean() for m in r.masks]
    assert xs[0] < 16 < xs[1]
    assert r.warnings() == ["concept 1 ('man'), concept 2 ('man'): one region for 2 same-word instances, "
                            "split into bands left to right"]


def test_touching_figures_of_different_words_are_banded_without_a_note():
    """``mask_split`` "figures" groups every concept: banding a man and a woman who touch is the design, not news."""
    one = _blob(16, 32, 8, 16, 4)
    r = masks_from_attention(torch.stack([one, one]), (16, 32), groups=[[0, 1]], labels=["man", "woman"])
    xs = [torch.nonzero(m)[:, 1].float().mean() for m in r.masks]
    assert xs[0] < 16 < xs[1] and r.warnings() == []


def test_figures_split_gives_each_concept_one_whole_figure_where_per_pixel_attention_shares_them():
    """Two separate figures that both class words light up (a model whose words do not tell them apart):
    per pixel, each figure is cut between the concepts; split by figures, each concept gets one figure whole."""
    left, right = _blob(16, 32, 8, 7, 3), _blob(16, 32, 8, 25, 3)
    g = torch.Generator().manual_seed(0)
    maps = torch.stack([left + right, left + right]) + 0.05 * torch.rand(2, 16, 32, generator=g)
    figures = masks_from_attention(maps, (16, 32), groups=[[0, 1]], order="attention", labels=["man", "woman"])
    pixels = masks_from_attention(maps, (16, 32), labels=["man", "woman"])
    halves = [(m[:, :16].sum(), m[:, 16:].sum()) for m in figures.masks]
    assert sorted(bool(a > 0) + 2 * bool(b > 0) for a, b in halves) == [1, 2]  # one figure each, whole
    assert all(a > 0 and b > 0 for a, b in ((m[:, :16].sum(), m[:, 16:].sum()) for m in pixels.masks))


def test_a_grouped_concept_without_attention_in_an_image_leaves_the_figure_to_the_others():
    """An image whose prompt lacks a concept's class word (a batch of differing prompts): that concept has
    no map there and is left out of the split, so the other concept keeps its whole figure."""
    one = _blob(16, 32, 8, 16, 4)
    grouped = masks_from_attention(torch.stack([one, torch.zeros_like(one)]), (16, 32), groups=[[0, 1]])
    alone = masks_from_attention(torch.stack([one, torch.zeros_like(one)]), (16, 32))
    assert torch.equal(grouped.masks, alone.masks) and grouped.empty == [1]


@pytest.mark.parametrize("column_mass,n,expected", [
    ([1, 1, 1, 1, 1, 1], 2, [0, 0, 0, 1, 1, 1]),  # the median of the mass
    ([1, 5, 2], 2, [0, 0, 1]),                    # a line belongs to the band its mass centre falls in
    ([1, 2, 1], 2, [0, 1, 1]),                    # a centre exactly at the quantile goes to the later band
    ([100, 1, 1, 1], 3, [0, 1, 2, 2]),            # heavy first line: later bands still get a line each
    ([1, 1, 1, 100], 3, [0, 0, 1, 2]),            # heavy last line: earlier bands still get a line each
    ([0, 1, 1, 0, 1, 1], 2, [-1, 0, 0, -1, 1, 1]),  # background columns belong to no band
])
def test_bands_cut_at_the_quantiles_of_the_evidence_mass_and_are_never_empty(column_mass, n, expected):
    mass = torch.tensor(column_mass, dtype=torch.float32)
    binary = (mass > 0).expand(3, -1).clone()
    bands = _bands(binary, mass.expand(3, -1), n, dim=1)
    band_of_column = [next((i for i, b in enumerate(bands) if b[0, c]), -1) for c in range(len(column_mass))]
    assert band_of_column == expected
    rows = _bands(binary.T.contiguous(), mass.expand(3, -1).T.contiguous(), n, dim=0)  # the same along rows
    assert all(torch.equal(r, b.T) for r, b in zip(rows, bands))
    assert _bands(binary, mass.expand(3, -1), len(column_mass) + 1, dim=1) is None  # fewer lines than bands


def test_concept_names_use_labels_where_given():
    assert concept_name(0, ["man", "woman"]) == "concept 1 ('man')"
    assert concept_name(2, ["man", "woman"]) == "concept 3" and concept_name(1, None) == "concept 2"


def test_a_narrow_foreground_is_cut_into_horizontal_bands():
    column = _box(16, 16, 2, 14, 8, 9)
    regions = split_instances(column, 2)
    assert regions[0].sum() == 6 and regions[1].sum() == 6 and regions[0][2, 8] and regions[1][13, 8]


def test_a_small_speck_is_not_an_instance():
    shared = _blob(32, 32, 16, 12, 5)
    shared[2, 30] = 1.0  # one stray pixel: the big blob is split in two rather than one concept getting the speck
    regions = split_instances(normalize_map(shared), 2)
    assert not any(r[2, 30] for r in regions) and all(r.sum() > 10 for r in regions)


def test_grouped_and_single_concepts_together():
    shared = _blob(32, 48, 16, 8, 3) + _blob(32, 48, 16, 40, 3)
    dog = _blob(32, 48, 16, 24, 3)
    r = masks_from_attention(torch.stack([shared, dog, shared]), (32, 48), groups=[[0, 2]])
    assert r.masks[0, 16, 8] == 1 and r.masks[1, 16, 24] == 1 and r.masks[2, 16, 40] == 1


# -- empty concepts, shapes, inputs -----------------------------------------------------------------------------------

def test_empty_concept_is_reported_by_name():
    maps = torch.stack([_blob(16, 16, 8, 8, 3), torch.zeros(16, 16), torch.full((16, 16), 0.3)])
    r = masks_from_attention(maps, (16, 16), labels=["man", "woman", "cat"], dilation=16, feather=16)
    assert r.empty == [1, 2] and r.masks[1:].sum() == 0 and r.masks[0].sum() > 0
    assert r.warnings() == ["concept 2 ('woman'): empty mask, the concept was not found in the layout",
                            "concept 3 ('cat'): empty mask, the concept was not found in the layout"]
    assert MaskResult(torch.zeros(2, 1, 1), [0]).warnings() == [
        "concept 1: empty mask, the concept was not found in the layout"]


def test_non_square_latents_keep_the_orientation():
    maps = torch.stack([_blob(12, 20, 3, 4, 2), _blob(12, 20, 8, 16, 2)])
    r = masks_from_attention(maps, (24, 40), dilation=8, feather=8)
    assert r.masks.shape == (2, 24, 40) and r.masks.sum(0).max() <= 1.0
    assert r.masks[0, 6, 8] == 1 and r.masks[1, 17, 33] == 1  # upsampled 2x, not transposed


def test_maps_larger_than_the_latent_are_downsampled():
    r = masks_from_attention(_box(64, 64, 0, 64, 0, 32)[None], (16, 16))
    assert torch.equal(r.masks[0], _box(16, 16, 0, 16, 0, 8))


@pytest.mark.parametrize("kwargs,message", [
    (dict(maps=torch.rand(8, 8)), "maps must be \\[concepts, h, w\\]"),
    (dict(maps=-torch.rand(3, 8, 8)), "maps must be non-negative"),
    (dict(maps=torch.full((3, 8, 8), float("nan"))), "maps must be finite"),
    (dict(latent_size=(16,)), "latent_size must be"),
    (dict(latent_size=(0, 16)), "latent_size must be"),
    (dict(dilation=-1), "dilation must be a whole number of pixels >= 0"),
    (dict(dilation=1.5), "dilation must be"),
    (dict(feather=-8), "feather must be a whole number of pixels >= 0"),
    (dict(order="random"), "order must be one of"),
    (dict(groups=[[0, 5]]), "groups: concept index 5 out of range for 3 concepts"),
    (dict(groups=[[0, -1]]), "groups: concept index -1 out of range"),
    (dict(groups=[[0, 1], [1, 2]]), "groups: concept index 1 is in two groups"),
    (dict(labels=["a", "b"]), "labels must name every concept"),
])
def test_bad_input_is_named(kwargs, message):
    args = dict(maps=torch.rand(3, 8, 8), latent_size=(16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        masks_from_attention(args.pop("maps"), args.pop("latent_size"), **args)


def test_split_instances_rejects_attention_without_maps():
    with pytest.raises(ValueError, match="own_maps"):
        split_instances(torch.rand(8, 8), 2, "attention")


# -- overlay ----------------------------------------------------------------------------------------------------------

def test_overlay_colours_each_concept_over_the_image():
    m = torch.zeros(2, 4, 4)
    m[0, :, :2] = 1
    m[1, :, 2:3] = 1
    pic = overlay(m, torch.full((3, 8, 8), 0.5))
    assert pic.shape == (3, 4, 4) and pic.min() >= 0 and pic.max() <= 1
    assert pic[0, 0, 0] > pic[2, 0, 0] and pic[2, 0, 2] > pic[0, 0, 2]  # red-ish vs blue-ish
    assert torch.allclose(pic[:, 0, 3], torch.full((3,), 0.5))  # uncovered: the image itself
    dark = overlay(m)
    assert torch.equal(dark[:, 0, 3], torch.zeros(3)) and dark[:, 0, 0].sum() > 0
    assert not torch.equal(overlay(torch.eye(9).view(9, 3, 3))[:, 0, 0], overlay(torch.eye(9).view(9, 3, 3))[:, 0, 1])


def test_overlay_values_are_the_alpha_blend_of_the_palette():
    red, blue = torch.tensor([1.00, 0.25, 0.25]), torch.tensor([0.20, 0.50, 1.00])
    m = torch.zeros(2, 2, 3)
    m[0, :, 0] = 1
    m[1, :, 1] = 0.5
    m[:, :, 2] = 1  # both: coverage is capped at 1, colours add, the result is clipped to [0, 1]
    pic = overlay(m, torch.full((3, 5, 4), 0.4), alpha=0.5)
    torch.testing.assert_close(pic[:, 0, 0], 0.4 * 0.5 + 0.5 * red)
    torch.testing.assert_close(pic[:, 1, 1], 0.4 * 0.75 + 0.25 * blue)
    torch.testing.assert_close(pic[:, 0, 2], 0.4 * 0.5 + 0.5 * (red + blue))
    torch.testing.assert_close(overlay(m, alpha=1.0)[:, 0, 2], torch.tensor([1.0, 0.75, 1.0]))
    with pytest.raises(ValueError, match=r"masks must be \[concepts, H, W\], got shape \(2, 3\)"):
        overlay(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"image must be \[3, h, w\], got shape \(4, 2, 3\)"):
        overlay(m, torch.zeros(4, 2, 3))
    with pytest.raises(ValueError, match=r"image must be \[3, h, w\], got shape \(2, 3\)"):
        overlay(m, torch.zeros(2, 3))
