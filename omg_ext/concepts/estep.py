"""The E-step: each concept's mask from its tokens' cross-attention on the noised pictures.

The pictures are noised at a few timesteps (``ExtractSettings.estep_timesteps``, a few draws each) and the
UNet run once per draw with the engine's attention capture on the concept tokens (the embedding's vectors and
the class word after them); the averaged maps become exclusive masks with the engine's own mask code (Otsu
cores split by figures or by pixels, nearest core wins), as OMG's masks are made.
"""
from __future__ import annotations

import torch

from ..engine.attention import AttentionCall, capture_size
from ..engine.masks import masks_from_attention
from .model import ConceptModel
from .settings import MASK_SPLITS


def noised(latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``√ᾱ_t · x0 + √(1-ᾱ_t) · ε`` with ``t`` per row."""
    a = alphas_cumprod.to(latents.device)[t.long()].view(-1, 1, 1, 1).to(latents.dtype)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


@torch.no_grad()
def token_maps(model: ConceptModel, latents: torch.Tensor, context: torch.Tensor, tokens: list[list[list[int]]],
               timesteps: tuple[int, ...], draws: int, generator: torch.Generator) -> torch.Tensor:
    """[images, concepts, h, w]: each concept's token attention at half latent resolution, averaged over the draws.

    ``context`` has one row per picture; ``tokens[i][j]`` are concept j's positions in picture i's context.
    """
    return token_maps_and_errors(model, latents, context, tokens, timesteps, draws, generator)[0]


@torch.no_grad()
def token_maps_and_errors(model: ConceptModel, latents: torch.Tensor, context: torch.Tensor, tokens: list[list[list[int]]],
                          timesteps: tuple[int, ...], draws: int, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_maps`` and, per row, the noise-prediction error per latent pixel [rows, H, W] over the same draws."""
    images, concepts = latents.shape[0], len(tokens[0])
    hw = tuple(latents.shape[-2:])
    maps = torch.zeros(images, concepts, *capture_size(hw), device=latents.device)
    errors = torch.zeros(images, *hw, device=latents.device)
    with model.captured_attention() as state:
        for t in timesteps:
            for _ in range(draws):
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                steps = torch.full((images,), int(t), device=latents.device)
                call = AttentionCall(hw, capture_rows=[(i, i) for i in range(images)], capture_tokens=tokens, maps=maps)
                with state.during(call):
                    prediction = model.predict(noised(latents, steps, noise, model.alphas_cumprod), steps, context)
                errors += (prediction.float() - noise.float()).pow(2).mean(1)
    return maps / (len(timesteps) * draws), errors / (len(timesteps) * draws)


def responsibilities(errors: torch.Tensor) -> torch.Tensor:
    """[images, concepts, H, W]: how much better each concept's row explains each pixel than the others', as
    EM's posterior: ``softmax_j(-error_j / τ)`` with τ the pixel's mean error over the concepts."""
    temperature = errors.mean(1, keepdim=True).clamp(min=1e-6)
    return torch.softmax(-errors / temperature, dim=1)


def masks_from_maps(maps: torch.Tensor, latent_hw: tuple[int, int], class_words: list[str], split: str = "figures"
                    ) -> torch.Tensor:
    """[images, concepts, H, W] exclusive 0/1 masks from ``token_maps``: with ``split`` "figures" each figure of the
    concepts' shared attention goes whole to one concept (OMG's default), with "pixels" each pixel to the strongest."""
    if split not in MASK_SPLITS:
        raise ValueError(f"split must be one of {MASK_SPLITS}, got {split!r}")
    groups = [list(range(maps.shape[1]))] if split == "figures" and maps.shape[1] > 1 else []
    return torch.stack([masks_from_attention(m, latent_hw, groups=groups, order="attention", labels=class_words).masks
                        for m in maps]).round()
