"""The per-pixel scorer: which figure class and which look each pixel of an image shows.

A small fully convolutional net (dilated convolutions, a receptive field of about a figure)
trained on rendered scenes whose ground truth the generator knows: figure class
(background / man / woman) and look (plain / each identity; background pixels are
"plain"). Training scenes carry plain and identity figures in any mix, often overlapping,
with colour jitter, blur and noise, so the scorer reads what a diffusion model draws
rather than the renderer's exact pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .model import WEIGHTS
from .scenes import CLASSES, IDENTITIES, LOOKS, random_scene, render


class Scorer(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        layers, ch = [], 3
        for dilation in (1, 1, 2, 4, 2, 1):
            layers += [nn.Conv2d(ch, width, 3, padding=dilation, dilation=dilation), nn.GroupNorm(8, width), nn.SiLU()]
            ch = width
        self.body = nn.Sequential(*layers)
        self.kinds = nn.Conv2d(width, 1 + len(CLASSES), 1)
        self.looks = nn.Conv2d(width, len(LOOKS), 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, H, W, 3] in [0, 1] -> class logits [B, 3, H, W], look logits [B, 1 + identities, H, W]."""
        h = self.body(images.permute(0, 3, 1, 2) * 2 - 1)
        return self.kinds(h), self.looks(h)

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel: figure class (0 background, 1 man, 2 woman) and look (0 plain, k identity k)."""
        kinds, looks = self(images.float())
        return kinds.argmax(1), looks.argmax(1)

    def save(self, path: Path = WEIGHTS / "scorer.safetensors") -> None:
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path = WEIGHTS / "scorer.safetensors") -> "Scorer":
        scorer = cls()
        scorer.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return scorer.eval().requires_grad_(False)


def scorer_scene(rng: np.random.Generator):
    """A scene for the scorer: a base scene whose figures take an identity of their class 60 % of the time."""
    scene = random_scene(rng)
    for figure in scene.figures:
        if rng.random() < 0.6:
            choices = [k + 1 for k, i in enumerate(IDENTITIES) if i.figure == figure.kind]
            figure.look = int(rng.choice(choices))
    return scene


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter per image, a slight blur on half of them, pixel noise: what sampling does to a drawing."""
    b = images.shape[0]
    gain = 1 + 0.15 * (torch.rand(b, 1, 1, 3, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 3, generator=generator) - 0.5)
    x = images * gain + shift
    blurred = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1)
    mix = 0.5 * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    x = x * (1 - mix) + blurred * mix
    return (x + 0.04 * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def scorer_batch(rng: np.random.Generator, size: int):
    """Images [B, H, W, 3], class labels and look labels [B, H, W]."""
    rendered = [render(scorer_scene(rng), rng=rng) for _ in range(size)]
    images, kinds, looks = (torch.from_numpy(np.stack(parts)) for parts in zip(*rendered))
    return images, kinds, looks


def scorer_loss(scorer: Scorer, images, kinds, looks) -> torch.Tensor:
    kind_logits, look_logits = scorer(images)
    return F.cross_entropy(kind_logits, kinds) + F.cross_entropy(look_logits, looks)
