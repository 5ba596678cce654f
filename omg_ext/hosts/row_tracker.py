"""Which rows of A1111's UNet calls are cond and uncond, and the refusal of ``AND``: A1111's CFG denoiser
makes one cond row per image, which is what OMG's rows are laid out from."""
from __future__ import annotations

import re

import torch

from ..engine.rows import RowRole
from .errors import OmgUserError


AND_MESSAGE = ("OMG gives each character its own prompt and LoRA, so it does not take AND (composable diffusion) in "
               "the prompt: write one prompt that names every character by its class word, without AND, and put each "
               "character's details in its concept prompt")
"""Why AND is refused in every host: AND makes several cond rows per image, each its own subprompt, which is how
Regional Prompter and Latent Couple split a picture; OMG splits it by masks, and its masks are read at the class
words' places in the image's one prompt."""


def refuse_and(prompts: list[str]) -> None:
    """``AND`` (A1111's own pattern: a whole word, upper case) in any prompt of the job fails it before sampling."""
    if any(re.search(r"\bAND\b", prompt) for prompt in prompts):
        raise OmgUserError(AND_MESSAGE)


class RowTracker:
    """Which rows of each UNet call are cond and uncond, from the CFG denoiser's callback.

    The CFG denoiser builds ``x_in`` as cond rows then uncond rows and sends them to the
    UNet in order (one call, or slices); the tracker hands out roles in that order and
    checks each row's context against the cond / uncond the callback exposed.
    """

    def __init__(self, images: int) -> None:
        self.images = images
        self.roles: list[RowRole] = []
        self.conds: list[torch.Tensor] = []
        self.offset = 0

    def on_denoiser(self, params) -> None:
        cond, uncond = _crossattn(params.text_cond), _crossattn(params.text_uncond)
        if cond.shape[0] != self.images:
            raise OmgUserError(AND_MESSAGE)
        self.roles = [RowRole(True, b) for b in range(self.images)] + [RowRole(False, b) for b in range(uncond.shape[0])]
        self.conds = list(cond) + list(uncond)
        self.offset = 0

    def take(self, context: torch.Tensor) -> list[RowRole]:
        rows = self.roles[self.offset:self.offset + context.shape[0]]
        if len(rows) != context.shape[0]:
            raise RuntimeError("OMG lost track of the UNet rows (a call outside the CFG denoiser)")
        for row, expected in zip(context, self.conds[self.offset:]):
            n = min(row.shape[0], expected.shape[0])
            # NaN equals NaN here: conditioning broken by the checkpoint or a LoRA (fp16 overflow) is
            # the host's to report ("A tensor with NaNs was produced"), not a lost row
            if not torch.allclose(row[:n], expected[:n].to(row), rtol=0, atol=0, equal_nan=True):
                raise RuntimeError("OMG lost track of the UNet rows (conditioning does not match)")
        self.offset += context.shape[0]
        return rows


def _crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond
