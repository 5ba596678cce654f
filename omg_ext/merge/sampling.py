"""A few DDIM steps on a host's raw UNet, so that a merge records each layer's inputs as a generation meets them.

The host's own samplers need a whole processing job; recording needs only the UNet to see noisy latents of a
concept's prompts at the timesteps of a generation, with classifier-free guidance's cond and uncond rows. DDIM
on the model's own ``alphas_cumprod`` (epsilon prediction, SD1.5's) does that in a dozen lines.
"""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def ddim_steps(unet_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor,
               cond: torch.Tensor, uncond: torch.Tensor, latent_shape: tuple[int, ...], steps: int, cfg_scale: float,
               generator: torch.Generator, check: Callable[[], None] = lambda: None) -> torch.Tensor:
    """``steps`` DDIM steps from noise for ``cond`` (one row per image; ``uncond`` one row, repeated); ``unet_fn(x, t,
    context)`` is the raw UNet; ``check`` runs before each step (an Interrupt raises there). Returns the last latent."""
    alphas = alphas_cumprod.double().cpu()
    timesteps = torch.linspace(len(alphas) - 1, 0, steps).round().long()
    rows = cond.shape[0]
    x = torch.randn(latent_shape, generator=generator).to(cond.device, cond.dtype)
    context = torch.cat([cond, uncond.expand(rows, *uncond.shape[1:])])
    for i, t in enumerate(timesteps):
        check()
        a = float(alphas[t])
        a_next = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        eps_cond, eps_uncond = unet_fn(torch.cat([x, x]), torch.full((2 * rows,), float(t), device=x.device), context).chunk(2)
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    return x
