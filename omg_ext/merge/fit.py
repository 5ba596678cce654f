"""One layer of a merge: the weight delta that serves every concept's own inputs at once.

A layer is ``y = W x`` (a convolution as ``W`` over its unfolded patches). Concept i brings its
LoRA's dense delta ``ΔW_i`` and inputs ``X_i`` [rows, in] recorded while that LoRA was active; it
asks for ``Y_i = X_i (W0 + ΔW_i)ᵀ``. Three fits, one signature:

- ``sum``: ``Σ w_i ΔW_i`` — every delta everywhere, what loading all LoRAs at once does (the bleeding);
- ``least squares`` (Mix-of-Show's gradient fusion, in closed form): the ``ΔW`` minimising
  ``Σ ‖X_i (W0 + ΔW)ᵀ − Y_i‖²``, i.e. ``ΔW = (Σ ΔW_i G_i)(Σ G_i + λI)⁻¹`` with ``G_i = X_iᵀ X_i``;
- ``loraclr``: from the least-squares solution, AdamW on an offset with LoRACLR's loss — each concept's
  outputs pulled to its own targets (positive pair) and pushed at least ``margin`` from the nearest other
  concept's targets (negative pair), plus ``λ_mse`` MSE and ``λ_reg ‖offset‖``. Distances are root mean
  squares over a concept's outputs, and ``λ_reg`` weighs the offset's root mean square (the official code's are sums, whose size grows with the number of rows
  and channels: a fixed margin would mean something else in every layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("loraclr", "least squares", "sum", "distil")
"""``distil`` trains the UNet's layers end to end (``distil.py``); the others fit each layer on its own."""


@dataclass
class LayerInputs:
    """What one layer's merge needs: its base weight [out, in], and per concept its delta [out, in], its
    recorded inputs [rows, in] and its weight."""

    base: torch.Tensor
    deltas: list[torch.Tensor]
    inputs: list[torch.Tensor]
    weights: list[float]

    def targets(self, rows: int | None = None) -> list[torch.Tensor]:
        """Each concept's own LoRA's outputs on its (first ``rows``) inputs."""
        return [x[:rows] @ (self.base + w * d).t() for x, d, w in zip(self.inputs, self.deltas, self.weights)]


@dataclass(frozen=True)
class FitSettings:
    ridge: float = 1e-2
    """λ of the least-squares fit, relative to the mean diagonal of Σ G_i: larger generalises better to inputs the
    recording did not see (toy world, held-out inputs: median residual 0.54 at 1e-4, 0.45 at 1e-2)."""
    steps: int = 100
    lr: float = 1e-2
    """AdamW's step, in units of the root-mean-square size of the concepts' deltas in that layer."""
    margin: float = 0.5
    """In root-mean-square output units, relative to the RMS of the concepts' target differences (see ``loraclr``)."""
    lambda_mse: float = 0.1
    lambda_reg: float = 1e-3
    lambda_con: float = 1.0
    contrastive_rows: int = 512
    """Rows per concept the optimisation sees (the least-squares start uses them all): its cost is steps × rows."""


def fit_sum(layer: LayerInputs, settings: FitSettings | None = None) -> torch.Tensor:
    return sum(w * d for d, w in zip(layer.deltas, layer.weights))


def fit_least_squares(layer: LayerInputs, settings: FitSettings | None = None) -> torch.Tensor:
    settings = settings or FitSettings()
    grams = [x.t().double() @ x.double() for x in layer.inputs]
    total = sum(grams)
    ridge = settings.ridge * float(total.diagonal().mean().clamp_min(1e-12))
    right = sum((w * d.double()) @ g for d, w, g in zip(layer.deltas, layer.weights, grams))
    eye = torch.eye(total.shape[0], dtype=total.dtype)
    # ΔW (Σ G + λI) = Σ ΔW_i G_i, solved for ΔW (both sides transposed: a symmetric system)
    return torch.linalg.solve(total + ridge * eye, right.t()).t().to(layer.base.dtype)


def _rms_distances(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[concepts, concepts] root-mean-square distance between concept i's outputs and concept j's targets."""
    flat_p, flat_t = pred.flatten(1), targets.flatten(1)
    squared = (flat_p.pow(2).sum(1, keepdim=True) + flat_t.pow(2).sum(1) - 2 * flat_p @ flat_t.t()).clamp_min(1e-12)
    return (squared / flat_p.shape[1]).sqrt()


def contrastive_loss(pred: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """LoRACLR's loss over concepts: ``pred``/``targets`` [concepts, rows, out] (each concept's outputs on its own
    inputs, and its own LoRA's targets); positive distance squared + (margin − nearest negative)₊ squared."""
    distances = _rms_distances(pred, targets)
    positive = distances.diagonal()
    if pred.shape[0] < 2:
        return positive.pow(2).mean()
    others = distances.masked_fill(torch.eye(pred.shape[0], dtype=torch.bool), float("inf")).min(dim=1).values
    return (positive.pow(2) + (margin - others).clamp_min(0).pow(2)).mean()


def fit_loraclr(layer: LayerInputs, settings: FitSettings | None = None) -> torch.Tensor:
    settings = settings or FitSettings()
    start = fit_least_squares(layer, settings).float()
    rows = min(min(x.shape[0] for x in layer.inputs), settings.contrastive_rows)
    inputs = torch.stack([x[:rows].float() for x in layer.inputs])
    targets = torch.stack(layer.targets(rows)).float()
    # the margin in units of how far apart the concepts' own targets are: a scale-free setting
    scale = float(_rms_distances(targets, targets).sum() / max(1, targets.shape[0] * (targets.shape[0] - 1))) or 1.0
    base = layer.base.float()
    # the offset in units of the deltas' own size, so one learning rate serves every layer
    unit = float(torch.stack([d.float().pow(2).mean() for d in layer.deltas]).mean().sqrt()) or 1.0
    offset = torch.zeros_like(start, requires_grad=True)
    optimiser = torch.optim.AdamW([offset], lr=settings.lr, weight_decay=1e-4)
    best, best_loss = start, float("inf")
    try:
        for _ in range(settings.steps):
            optimiser.zero_grad()
            pred = inputs @ (base + start + unit * offset).t()
            loss = (settings.lambda_con * contrastive_loss(pred / scale, targets / scale, settings.margin)
                    + settings.lambda_mse * F.mse_loss(pred / scale, targets / scale)
                    + settings.lambda_reg * (offset.pow(2).mean() + 1e-12).sqrt())  # no NaN gradient at 0
            if loss.item() < best_loss:
                best_loss, best = loss.item(), (start + unit * offset).detach().clone()
            loss.backward()
            optimiser.step()
    finally:
        del optimiser  # its state is as large as the layer: gone with the fit
    return best.to(layer.base.dtype)


FITS = {"loraclr": fit_loraclr, "least squares": fit_least_squares, "sum": fit_sum}
