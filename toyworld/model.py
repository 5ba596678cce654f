"""The toy text-to-image model: an ldm-shaped UNet on 24×24 RGB with a CLIP-shaped text encoder.

The UNet is the test suite's ``TinyUNet`` (ldm's module names: ``input_blocks.1.1.
transformer_blocks.0.attn2.to_q``…) with three levels, 24, 12 and 6 pixels, and
cross-attention at 12 and 6: the 1/2 and 1/4 resolutions where OMG captures attention,
as at SD1.5's 32 and 16 latent pixels. It predicts noise under CompVis SD's discrete
schedule (``SCHEDULE``, the project's ``minisd.sampling.DiscreteSchedule``), so the
project's samplers drive it. Images are the latent: ``x = 2·rgb - 1``, no VAE.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minisd.sampling import DiscreteSchedule
from minisd.unet import TinyUNet

from .text import TextEncoder

WEIGHTS = Path(__file__).resolve().parent / "weights"
SCHEDULE = DiscreteSchedule()
"""The schedule it is trained with, the one ``minisd.runs`` samples with."""
UNET_CONFIG = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2),
                   attention_levels=(1, 2), num_heads=4, context_dim=64, num_res_blocks=1)


class ToyModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.unet = TinyUNet(**UNET_CONFIG, seed=seed)
        self.text = TextEncoder(dim=UNET_CONFIG["context_dim"])

    def encode(self, prompts: list[str], embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning as the engine takes it: ``{"context": [rows, tokens, dim]}`` (``embeddings``: name -> vectors)."""
        return {"context": self.text(prompts, embeddings)}

    def unet_fn(self):
        """The host-style raw UNet call ``fn(x, t, cond)``."""
        return lambda x, t, cond: self.unet(x, t, context=cond["context"])

    def save(self, path: Path) -> None:
        """fp16 safetensors: the committed form."""
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path = WEIGHTS / "base.safetensors", dtype: torch.dtype = torch.float32) -> "ToyModel":
        model = cls()
        state = load_file(str(path))
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return model.to(dtype).eval().requires_grad_(False)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2) * 2 - 1


def to_images(latent: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H, W, 3] in [0, 1]."""
    return ((latent.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
