"""Merging by distillation (method ``distil``): the UNet part of the merged LoRA trained end to end.

The per-layer fits (``fit.py``) ask each layer to give each concept's own outputs on that concept's inputs. Where
the concepts' inputs are nearly the same (a UNet's convolutions see much the same features whichever character is
drawn) no single delta can, and a LoRA that draws its character only when its trigger word is in the prompt does
so through all its layers together, which a layer-by-layer fit takes apart (docs/merge.md has the measurements).
Here the whole UNet is the unit instead: from the sum of the LoRAs, low-rank factors per layer are trained so that,
on each concept's own pictures noised at random timesteps and its prompt encoded by the merged text encoder, the
merged model predicts the noise that the concept's own LoRA predicts (its text and UNet parts together). The text
encoder's layers, whose inputs differ by trigger word, are merged by least squares first.

Only the new factors are trained (``torch.autograd.grad`` on them alone): the model's weights are read, never
written, and get no ``.grad``; the factors act through forward hooks that go as a set on exit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..concepts.lora import ConceptLoRA
from .lora_out import factorise

UNET_PREFIX = "lora_unet_"
"""Kohya's prefix of a UNet layer; every other key of a merge is a text encoder's."""


@dataclass
class Teaching:
    """What distillation needs of the host, per concept j."""

    pictures: list[torch.Tensor]
    """Concept j's pictures made with its own LoRA (latents [n, C, H, W]): those its inputs were recorded on."""
    teacher: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``teacher(j, index, x_t, t)``: the noise predicted with concept j's own LoRA on text encoder and UNet, for the
    prompts of its pictures ``index`` (indices into ``pictures[j]``)."""
    student: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``student(j, index, x_t, t)``: the raw UNet, differentiable, on those prompts encoded with the merged text
    layers (the factors being trained act on it through their hooks)."""
    alphas_cumprod: torch.Tensor


@dataclass(frozen=True)
class DistilSettings:
    steps: int = 900
    lr: float = 3e-4
    """Adam's step on the factors (the toy world's four identities: 1e-4 kept 0.47 of the weakest at 300 steps, 1e-3
    with a cosine decay 0.64 at 600; docs/merge.md)."""
    rows: int = 4
    """Noised pictures per concept and step."""
    rank: int = 64
    """Rank of each layer's factors (at most the sum's own rank: its SVD is the start)."""
    seed: int = 0


def start_factors(lora: ConceptLoRA, start: Mapping[str, torch.Tensor]) -> None:
    """The factors set to the SVD of each layer's start delta (the sum of the LoRAs); a layer whose start has a
    lower rank keeps kohya's start (random down, zero up) in the rest."""
    with torch.no_grad():
        for key, delta in start.items():
            down, up = lora.factors[f"0-{key}-down"], lora.factors[f"0-{key}-up"]
            parts = factorise(delta.float(), energy=1.0, max_rank=lora.rank)
            up.zero_()
            up.view(up.shape[0], -1)[:, :parts.rank] = parts.up
            down.view(down.shape[0], -1)[:parts.rank] = parts.down


def loss_weight(alphas: torch.Tensor) -> torch.Tensor:
    """Each noised picture's weight on its squared noise error: ``min(1, (1 − ᾱ)/ᾱ)``, the error of the picture
    itself (x₀) where the noise is light and of the noise where it is heavy. Plain noise errors weigh the lightly
    noised pictures most, whose details are the same for every character; where a character's look is decided the
    noise is heavy (the toy world's weakest identity kept 0.88 of its fidelity at 600 steps with this weight, 0.74
    without)."""
    return ((1 - alphas) / alphas).clamp(max=1.0)


def distil(layers: Mapping[str, nn.Module], start: Mapping[str, torch.Tensor], teaching: Teaching,
           settings: DistilSettings, progress: Callable[[str, float], None] = lambda text, done: None) -> dict[str, torch.Tensor]:
    """The UNet layers' merged deltas ([out, in·kh·kw] by key), trained from ``start``; ``progress`` may raise to stop."""
    lora = ConceptLoRA(dict(layers), 1, settings.rank, seed=settings.seed)
    start_factors(lora, start)
    params = list(lora.parameters())
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    alphas = teaching.alphas_cumprod.float().cpu()
    for step in range(settings.steps):
        progress(f"distilling: step {step + 1} of {settings.steps}", step / settings.steps)
        grads = [torch.zeros_like(p) for p in params]
        for j, pictures in enumerate(teaching.pictures):
            index = torch.randint(0, pictures.shape[0], (settings.rows,), generator=generator)
            t = torch.randint(0, len(alphas), (settings.rows,), generator=generator)
            noise = torch.randn((settings.rows, *pictures.shape[1:]), generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t = (a.sqrt() * pictures[index].float().cpu() + (1 - a).sqrt() * noise).to(pictures)
            t = t.to(pictures.device)
            with torch.no_grad():
                target = teaching.teacher(j, index, x_t, t).float()
            weight = loss_weight(a).to(target)
            with torch.enable_grad(), lora.installed([0] * settings.rows):
                error = (teaching.student(j, index, x_t, t).float() - target).pow(2)
                loss = (weight * error).mean() / len(teaching.pictures)
                for g, new in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                    if new is not None:
                        g += new
        for p, g in zip(params, grads):
            p.grad = g
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return {key: (lora.factors[f"0-{key}-up"].detach().flatten(1) @ lora.factors[f"0-{key}-down"].detach().flatten(1))
            for key in layers}
