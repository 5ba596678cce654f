"""The M-step's loss: the diffusion (noise-prediction) error inside each concept's mask, attributed to its token.

Per picture, one row carries the whole prompt ("a <name1> man and a <name2> woman <background>") under the
plain loss over the picture, and one row per concept carries that concept's phrase alone ("a <name1> man")
under the loss inside its mask only: the token has to explain its own figure, and nothing else, as it will
when OMG gives it a concept row of its own. A concept's LoRA (the option) acts on its own rows only.
"""
from __future__ import annotations

import torch

from .estep import noised
from .model import ConceptModel


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per row, the squared error averaged over the mask's pixels (channels averaged): ``[rows]``.

    ``masks`` [rows, H, W] in [0, 1]; an empty mask gives 0 (no pixel to explain), not a division by zero.
    """
    error = (prediction.float() - target.float()).pow(2).mean(1)
    return (error * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1e-6)


def step_loss(model: ConceptModel, latents: torch.Tensor, masks: torch.Tensor, full: list[str], phrases: list[str],
              embeddings: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """The loss of one M-step over every picture: mean over (whole-prompt row, concept rows) of each picture.

    ``latents`` [I, C, H, W]; ``masks`` [I, K, H, W]; ``full`` one prompt per picture; ``phrases`` one per concept.
    Rows are ordered picture by picture: the whole prompt, then the concepts (the order ``rows_of_concept`` gives).
    """
    images, concepts = masks.shape[:2]
    per_image = 1 + concepts
    t = torch.randint(0, len(model.alphas_cumprod), (images,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    x_t = noised(latents, t, noise, model.alphas_cumprod).repeat_interleave(per_image, 0)
    prompts = [p for i in range(images) for p in [full[i], *phrases]]
    context = model.encode(prompts, embeddings)
    prediction = model.predict(x_t, t.repeat_interleave(per_image), context)
    row_masks = torch.cat([torch.ones_like(masks[:, :1]), masks], 1).flatten(0, 1)
    return masked_mse(prediction, noise.repeat_interleave(per_image, 0), row_masks.to(prediction.device)).mean()


def rows_of_concept(images: int, concepts: int) -> list[int | None]:
    """Per row of ``step_loss``'s batch, the concept it belongs to (None: the whole prompt's row)."""
    return [None if r == 0 else r - 1 for _ in range(images) for r in range(1 + concepts)]
