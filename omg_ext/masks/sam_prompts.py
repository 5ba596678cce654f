"""SAM prompts from attention masks: where each concept is, as a box and points SAM understands.

From a concept's attention core (latent resolution): its bounding box, one positive point
at its strongest attention, and as negative points the other concepts' positive points
that fall inside this box, so SAM does not swallow a neighbour two characters hugging.
"""
from __future__ import annotations

import torch

from .segment import SamPrompt


def bounding_box(core: torch.Tensor, scale: tuple[float, float]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in image pixels of a non-empty bool mask [H, W]; ``scale`` = image px per mask px (y, x)."""
    ys, xs = torch.nonzero(core, as_tuple=True)
    sy, sx = scale
    return (float(xs.min()) * sx, float(ys.min()) * sy, float(xs.max() + 1) * sx, float(ys.max() + 1) * sy)


def prompts_from_attention(masks: torch.Tensor, evidence: torch.Tensor, image_hw: tuple[int, int]) -> list[SamPrompt | None]:
    """One prompt per concept (None where its mask is empty).

    masks [k, H, W]: the attention masks (soft, exclusive); evidence [k, H, W]: the
    normalised attention, which places the positive point.
    """
    k, h, w = masks.shape
    scale = (image_hw[0] / h, image_hw[1] / w)
    cores = masks > 0.5
    positives: list[tuple[float, float] | None] = []
    for j in range(k):
        if not bool(cores[j].any()):
            positives.append(None)
            continue
        flat = int(torch.argmax(torch.where(cores[j], evidence[j].float(), -1.0)))
        positives.append(((flat % w + 0.5) * scale[1], (flat // w + 0.5) * scale[0]))
    prompts: list[SamPrompt | None] = []
    for j in range(k):
        if positives[j] is None:
            prompts.append(None)
            continue
        box = bounding_box(cores[j], scale)
        negatives = [p for i, p in enumerate(positives) if i != j and p is not None
                     and box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]]
        prompts.append(SamPrompt(box, [positives[j], *negatives], [1] + [0] * len(negatives)))
    return prompts
