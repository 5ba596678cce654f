"""Detected boxes to concepts: one box per concept, several concepts per class word ("two men").

Boxes of one word are first thinned (a box overlapping a better-scored one by IoU > 0.5 is
the same object), the best ``n`` kept for the word's ``n`` concepts. Then the order:
``left_to_right`` gives the concepts, in their order, the boxes sorted by centre x;
``attention`` gives each concept the box holding most of its own attention, when that
is clearly better than left to right, else falls back to left to right with a note.
"""
from __future__ import annotations

import itertools

import torch

from ..engine.masks import ORDERS

Box = tuple[float, float, float, float]
CLEAR_MARGIN = 0.1
"""Per concept, how much more attention mass the attention order must explain to be used."""


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def distinct(detections: list[tuple[float, Box]], n: int) -> list[Box]:
    """The best ``n`` boxes that are not the same object as a better one."""
    kept: list[Box] = []
    for _, box in sorted(detections, key=lambda d: -d[0]):
        if all(iou(box, other) <= 0.5 for other in kept):
            kept.append(box)
        if len(kept) == n:
            break
    return kept


def mass_inside(attention: torch.Tensor, box: Box, image_hw: tuple[int, int]) -> float:
    """Fraction of a concept's attention map [h, w] inside a box given in image pixels."""
    h, w = attention.shape
    x0, x1 = int(box[0] * w / image_hw[1]), int(-(-box[2] * w // image_hw[1]))
    y0, y1 = int(box[1] * h / image_hw[0]), int(-(-box[3] * h // image_hw[0]))
    total = float(attention.sum())
    return float(attention[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0


def assign(concepts: list[int], boxes: list[Box], attention: torch.Tensor, image_hw: tuple[int, int],
           order: str, labels: list[str]) -> tuple[dict[int, Box], list[str]]:
    """{concept: box} for the concepts sharing one word, and notes for the user."""
    if order not in ORDERS:
        raise ValueError(f"instance order must be one of {', '.join(ORDERS)}, got {order!r}")
    notes = []
    if len(boxes) < len(concepts):
        names = ", ".join(labels[j] for j in concepts[len(boxes):])
        notes.append(f"{names}: the detector found {len(boxes)} box(es) for {len(concepts)} concept(s)")
    by_x = sorted(boxes, key=lambda b: b[0] + b[2])
    chosen = list(zip(concepts, by_x))
    if order == "attention" and len(concepts) > 1 and len(boxes) > 1:
        def explained(pairs):
            return sum(mass_inside(attention[j], box, image_hw) for j, box in pairs)
        best = max((list(zip(concepts, perm)) for perm in itertools.permutations(boxes, min(len(boxes), len(concepts)))),
                   key=explained)
        if explained(best) > explained(chosen) + CLEAR_MARGIN * len(best):
            chosen = best
        elif explained(best) > explained(chosen):
            notes.append(f"{', '.join(labels[j] for j in concepts)}: attention does not tell the instances apart clearly; "
                         "assigned left to right")
    return dict(chosen), notes
