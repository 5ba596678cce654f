"""What a generated image shows, in numbers: identity fidelity, leakage, presence, layout.

Each concept is a figure class with an identity look ("the man is zorb"). From the
scorer's per-pixel labels, per image:

- fidelity: the share of the concept's figure (pixels of its class) drawn in its own look,
  averaged over the concepts; a missing figure scores 0;
- leakage: the share of the concept's figure drawn in *another concept's* look, averaged;
- background: the share of background pixels drawn in any identity look;
- both present: every concept's class has a connected figure of at least ``MIN_FIGURE`` pixels;
- identities kept: both present, and every concept's figure drawn mostly (over half) in its
  own look: the picture the user asked for;
- layout IoU: figure pixels (any class) against those of the layout image (pass 1, no LoRA).

The pairs this benchmark uses have one man and one woman, so a figure's class says which
concept it is, independently of its look.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omg_ext.engine.masks import connected_components

from .scenes import CLASSES, IDENTITIES

MIN_FIGURE = 12
"""Pixels of the smallest figure that counts as present (a head alone has about 10)."""

MEASURES = ("fidelity", "leakage", "background", "both_present", "identities_kept", "layout_iou")


@dataclass(frozen=True)
class ConceptLook:
    """One concept of a scene: its figure class and its identity (1-based index into ``IDENTITIES``)."""

    identity: int

    @property
    def kind(self) -> int:
        return CLASSES.index(IDENTITIES[self.identity - 1].figure) + 1


def _largest_component(binary: torch.Tensor) -> int:
    if not bool(binary.any()):
        return 0
    labels, count = connected_components(binary)
    return int(max(int((labels == i).sum()) for i in range(1, count + 1)))


def image_measures(kinds: torch.Tensor, looks: torch.Tensor, concepts: list[ConceptLook],
                   layout_kinds: torch.Tensor | None = None) -> dict[str, float]:
    """The measures of one image from its labels [H, W] (and the layout image's class labels)."""
    fidelity, leakage = [], []
    for concept in concepts:
        region = kinds == concept.kind
        others = [c.identity for c in concepts if c.identity != concept.identity]
        if not bool(region.any()):
            fidelity.append(0.0)
            leakage.append(0.0)
            continue
        fidelity.append(float((looks[region] == concept.identity).float().mean()))
        leakage.append(float(torch.isin(looks[region], torch.tensor(others)).float().mean()) if others else 0.0)
    background = kinds == 0
    result = {
        "fidelity": sum(fidelity) / len(fidelity),
        "leakage": sum(leakage) / len(leakage),
        "background": float((looks[background] != 0).float().mean()) if bool(background.any()) else 0.0,
        "both_present": float(all(_largest_component(kinds == c.kind) >= MIN_FIGURE for c in concepts)),
    }
    result["identities_kept"] = float(result["both_present"] == 1.0 and all(f > 0.5 for f in fidelity))
    if layout_kinds is not None:
        a, b = kinds > 0, layout_kinds > 0
        union = int((a | b).sum())
        result["layout_iou"] = int((a & b).sum()) / union if union else 1.0
    return result


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % interval (normal approximation) over images."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


def mask_precision(masks: torch.Tensor, layout_kinds: torch.Tensor, concepts: list[ConceptLook]) -> list[float]:
    """Per concept, the share of its mask [k, H, W] lying on its own figure in the layout image's labels [H, W].

    How right a method's masks are, independently of what the LoRAs then draw: 1 when each
    mask covers only its own character.
    """
    shares = []
    for j, concept in enumerate(concepts):
        mass = float(masks[j].sum())
        shares.append(float((masks[j] * (layout_kinds == concept.kind)).sum()) / mass if mass else 0.0)
    return shares


def figure_in_mask(masks: torch.Tensor, kinds: torch.Tensor, looks: torch.Tensor,
                   concepts: list[ConceptLook]) -> list[tuple[float, float | None, float | None]]:
    """Per concept whose figure is present in the final image: (share of the figure inside its own
    mask (> 0.5), share in its look inside the mask, share in its look outside it — None where
    there is no such part).

    Where a masked method loses the look: a figure that drifts out of its mask is drawn there
    by the host rows, in no identity's look.
    """
    found = []
    for j, concept in enumerate(concepts):
        figure = kinds == concept.kind
        if _largest_component(figure) < MIN_FIGURE:
            continue
        inside = figure & (masks[j] > 0.5)
        outside = figure & ~(masks[j] > 0.5)
        share = lambda part: float((looks[part] == concept.identity).float().mean()) if bool(part.any()) else None  # noqa: E731
        found.append((float(inside.sum()) / float(figure.sum()), share(inside), share(outside)))
    return found


def present_fidelity(kinds: torch.Tensor, looks: torch.Tensor, concepts: list[ConceptLook]) -> list[float]:
    """Per concept whose figure is present (at least ``MIN_FIGURE`` connected pixels): the share in its own look."""
    return [float((looks[kinds == c.kind] == c.identity).float().mean()) for c in concepts
            if _largest_component(kinds == c.kind) >= MIN_FIGURE]
