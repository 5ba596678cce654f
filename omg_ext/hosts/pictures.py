"""Pictures of a job: a sampling result (latents, or images a hires pass decoded) as PIL images."""
from __future__ import annotations

import torch


def to_pictures(samples) -> list:
    """PIL images of a sampling result: latents, or the decoded images ([3, H, W] in [-1, 1],
    ``DecodedSamples``) that a job with hires fix returns."""
    from modules import sd_samplers_common

    if getattr(samples, "already_decoded", False):
        return [to_pil(((x.float().cpu() + 1) / 2).clamp(0, 1)) for x in samples]
    return [sd_samplers_common.sample_to_image(samples, i, approximation=0) for i in range(len(samples))]


def to_pil(chw: torch.Tensor):
    from PIL import Image

    return Image.fromarray((chw.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
