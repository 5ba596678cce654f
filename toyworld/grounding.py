"""The toy world's text-grounded segmentation: what GroundingDINO + SAM are to OMG in a WebUI.

The paper's mask route detects each class word in the layout image and segments it with
Segment Anything. No such weights exist here, but the toy world has a model that knows
its figures: the scorer's figure-class head. ``ToyDetector`` and ``ToySegmenter`` give it
the interfaces the project's ``detector+sam`` mask source calls (``detect(image, words)``
and ``segment(image, prompts)``), so OMG's real detector, box-assignment and exclusive-mask
code runs unchanged, with a detector that works. The scorer also measures the final
images; here it only sees the layout image (pass 1, no LoRA), before any identity exists.
"""
from __future__ import annotations

import numpy
import torch

from omg_ext.engine.masks import connected_components
from omg_ext.masks.segment import SamPrompt

from .measures import MIN_FIGURE
from .scenes import CLASSES
from .scorer import Scorer


def _classes(scorer: Scorer, image: numpy.ndarray) -> torch.Tensor:
    return scorer.labels(torch.from_numpy(image).float()[None] / 255)[0][0]


class ToyDetector:
    """Boxes of each class word's figures (connected regions of that class), scored by size."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def detect(self, image: numpy.ndarray, words: list[str], threshold: float = 0.1) -> dict[str, list[tuple[float, tuple]]]:
        kinds = _classes(self.scorer, image)
        found: dict[str, list[tuple[float, tuple]]] = {}
        for word in words:
            if word not in CLASSES:
                continue
            labels, count = connected_components(kinds == CLASSES.index(word) + 1)
            for i in range(1, count + 1):
                ys, xs = torch.nonzero(labels == i, as_tuple=True)
                if len(ys) >= MIN_FIGURE:
                    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                    found.setdefault(word, []).append((len(ys) / kinds.numel(), box))
        return found


class ToySegmenter:
    """The figure inside each box: pixels of the class that fills most of the box."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def segment(self, image: numpy.ndarray, prompts: list[SamPrompt]) -> list[torch.Tensor]:
        kinds = _classes(self.scorer, image)
        masks = []
        for prompt in prompts:
            x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
            inside = torch.zeros_like(kinds, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            counts = torch.bincount(kinds[inside], minlength=len(CLASSES) + 1)[1:]
            masks.append(inside & (kinds == int(counts.argmax()) + 1))
        return masks
