"""The per-layer fits of a merge, against independent computations on small layers."""
import pytest
import torch
import torch.nn.functional as F

from omg_ext.merge.fit import FitSettings, LayerInputs, contrastive_loss, fit_least_squares, fit_loraclr, fit_sum


def _layer(out=6, inp=8, concepts=3, rows=40, seed=0, subspaces=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inp, generator=g)
    deltas = [torch.randn(out, inp, generator=g) * 0.5 for _ in range(concepts)]
    inputs = []
    for j in range(concepts):
        x = torch.randn(rows, inp, generator=g)
        if subspaces:  # concept j's inputs live in its own coordinates
            keep = torch.zeros(inp)
            keep[j * (inp // concepts):(j + 1) * (inp // concepts)] = 1
            x = x * keep
        inputs.append(x)
    return LayerInputs(base, deltas, inputs, [1.0] * concepts)


def test_least_squares_is_the_stacked_least_squares_solution():
    layer = _layer()
    delta = fit_least_squares(layer, FitSettings(ridge=0.0))
    x = torch.cat(layer.inputs).double()
    y = torch.cat(layer.targets()).double() - x @ layer.base.double().t()
    expected = torch.linalg.lstsq(x, y).solution.t()
    assert torch.allclose(delta.double(), expected, atol=1e-5)


def test_least_squares_keeps_each_concept_exactly_where_their_inputs_do_not_overlap_and_sum_does_not():
    layer = _layer(out=5, inp=9, concepts=3, subspaces=True)
    delta = fit_least_squares(layer, FitSettings(ridge=1e-9))
    for x, y in zip(layer.inputs, layer.targets()):
        assert torch.allclose(x @ (layer.base + delta).t(), y, atol=1e-3)
    summed = fit_sum(layer)
    assert not torch.allclose(layer.inputs[0] @ (layer.base + summed).t(), layer.targets()[0], atol=1e-1)


def test_sum_is_the_weighted_sum_of_the_deltas():
    layer = _layer(concepts=2)
    layer.weights = [0.5, 2.0]
    assert torch.allclose(fit_sum(layer), 0.5 * layer.deltas[0] + 2.0 * layer.deltas[1])


def test_the_contrastive_loss_is_positive_distance_plus_the_margin_shortfall_of_the_nearest_negative():
    pred = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])
    targets = torch.tensor([[[0.0, 0.0]], [[0.5, 0.0]]])
    # RMS distances over 2 values: d(p0,t0)=0, d(p0,t1)=0.5/√2, d(p1,t1)=0.5/√2, d(p1,t0)=1/√2
    d01, d11, d10 = 0.5 / 2 ** 0.5, 0.5 / 2 ** 0.5, 1 / 2 ** 0.5
    expected = ((0 + (1.0 - d01) ** 2) + (d11 ** 2 + (1.0 - d10) ** 2)) / 2
    assert float(contrastive_loss(pred, targets, margin=1.0)) == pytest.approx(expected, rel=1e-5)


def _nearest_negative(layer, delta):
    pred = torch.stack([x @ (layer.base + delta).t() for x in layer.inputs])
    targets = torch.stack(layer.targets())
    d = torch.cdist(pred.flatten(1), targets.flatten(1)) / pred[0].numel() ** 0.5
    return float(d.masked_fill(torch.eye(len(d), dtype=torch.bool), float("inf")).min(1).values.min())


def test_the_contrastive_term_pushes_each_concepts_outputs_away_from_the_others_targets():
    # two concepts with nearly the same inputs and opposite deltas: least squares averages them to nearly nothing,
    # so each concept's merged output sits as near the other's targets as its own
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g)
    delta = torch.randn(4, 6, generator=g)
    layer = LayerInputs(torch.randn(4, 6, generator=g), [delta, -delta], [x, x + 0.3 * torch.randn(32, 6, generator=g)], [1.0, 1.0])
    start = fit_least_squares(layer)
    with_con = fit_loraclr(layer, FitSettings(steps=300, lr=0.05, margin=1.0, lambda_con=1.0))
    without = fit_loraclr(layer, FitSettings(steps=300, lr=0.05, margin=1.0, lambda_con=0.0))
    assert _nearest_negative(layer, with_con) > _nearest_negative(layer, without) + 0.05
    assert _nearest_negative(layer, with_con) > _nearest_negative(layer, start) + 0.05


def test_loraclr_starts_from_least_squares_and_keeps_it_when_that_is_already_best():
    layer = _layer(out=5, inp=9, concepts=3, subspaces=True)
    start = fit_least_squares(layer)
    fitted = fit_loraclr(layer, FitSettings(steps=20))
    for x, y in zip(layer.inputs, layer.targets()):
        assert F.mse_loss(x @ (layer.base + fitted).t(), y) <= F.mse_loss(x @ (layer.base + start).t(), y) + 1e-3
