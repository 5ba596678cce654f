"""The M-step's loss: the diffusion (noise-prediction) error inside each concept's mask, attributed to its token.

Per picture, one row carries the whole prompt ("a <name1> man and a <name2> woman <background>") under the
plain loss over the picture, and one row per concept carries that concept's phrase alone ("a <name1> man")
under the loss inside its mask only: the token has to explain its own figure, and nothing else, as it will
when OMG gives it a concept row of its own. A concept's LoRA (the option) acts on its own rows only.

The rows of a step may run in several passes (``ExtractSettings.rows_per_pass``) whose gradients add up to the
whole step's: what bounds the activations kept for the backward pass, and so the memory, on a small card.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .estep import noised
from .model import ConceptModel


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per row, the squared error averaged over the mask's pixels (channels averaged): ``[rows]``.

    ``masks`` [rows, H, W] in [0, 1]; an empty mask gives 0 (no pixel to explain), not a division by zero.
    """
    error = (prediction.float() - target.float()).pow(2).mean(1)
    return (error * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1e-6)


@dataclass
class StepRow:
    image: int
    concept: int | None
    """None: the whole prompt's row."""


@dataclass
class StepDraw:
    """One step's noised pictures: the timestep and noise of each picture, shared by all of its rows."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def draw(cls, model: ConceptModel, latents: torch.Tensor, generator: torch.Generator) -> "StepDraw":
        t = torch.randint(0, len(model.alphas_cumprod), (latents.shape[0],), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return cls(noised(latents, t, noise, model.alphas_cumprod), t, noise)


def step_rows(images: int, concepts: int) -> list[StepRow]:
    """Picture by picture: the whole prompt's row, then one row per concept."""
    return [StepRow(i, c) for i in range(images) for c in [None, *range(concepts)]]


def rows_loss(model: ConceptModel, draw: StepDraw, masks: torch.Tensor, rows: list[StepRow], full: str,
              phrases: list[str], embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed loss of ``rows`` (``masks`` [images, concepts, H, W]): a whole-prompt row over the picture,
    a concept row inside its concept's mask."""
    index = torch.tensor([r.image for r in rows], device=draw.x_t.device)
    context = model.encode([full if r.concept is None else phrases[r.concept] for r in rows], embeddings)
    prediction = model.predict(draw.x_t[index], draw.t[index], context)
    row_masks = torch.stack([torch.ones_like(masks[0, 0]) if r.concept is None else masks[r.image, r.concept] for r in rows])
    return masked_mse(prediction, draw.noise[index], row_masks.to(prediction.device)).sum()
