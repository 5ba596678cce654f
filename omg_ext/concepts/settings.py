"""What a user sets for an extraction, validated once, with defaults chosen in the toy world (docs/extract.md)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

NAME = re.compile(r"^[A-Za-z][\w-]{1,63}$")
"""An embedding's name is a word of the prompt: a letter, then letters, digits, '_' or '-' (2-64 characters)."""

USER_MASKS = ("first", "fixed")
MASK_SPLITS = ("figures", "pixels")
ESTEP_ROWS = ("concept", "whole")
ESTEP_EVIDENCE = ("attention", "attention×fit")


class ExtractError(ValueError):
    """A user's mistake in an extraction request; the message names what is wrong."""


@dataclass
class ExtractConcept:
    """One concept to learn: its embedding's name, its class word, and optional masks drawn by the user."""

    name: str
    class_word: str
    masks: list[torch.Tensor | None] = field(default_factory=list)
    """Per image a [H, W] mask (any resolution, resized to the latent's) or None: where the concept is."""


@dataclass
class ExtractSettings:
    rounds: int = 2
    """EM rounds after the first masks: each an M-step then an E-step."""
    steps: int = 60
    """Optimiser steps per M-step."""
    vectors: int = 2
    """Vectors (tokens) per concept embedding."""
    learning_rate: float = 1e-2
    """The embeddings' AdamW learning rate (A1111's textual-inversion default is 5e-3; the toy world learns faster at 1e-2)."""
    lora: bool = True
    """Also train a LoRA per concept with the same masked loss (in the toy world a token alone keeps no identity)."""
    lora_rank: int = 4
    lora_learning_rate: float = 1e-3
    background: bool = True
    """Learn a background token too (in the whole-picture rows), so the concepts need not explain it."""
    user_masks: str = "first"
    """What drawn masks do: "first" (the first masks, then EM) or "fixed" (held through every round)."""
    mask_split: str = "figures"
    """How the E-step shares the attention out: "figures" (each figure whole to one concept) or "pixels"."""
    estep_rows: str = "concept"
    """Where the E-step reads a token's attention: in a row of the concept's phrase alone ("concept") or in the
    whole prompt's row ("whole")."""
    estep_lora: bool = True
    """With the LoRA option, each concept row of the E-step carries its LoRA too (the concept as OMG will draw it)."""
    estep_evidence: str = "attention×fit"
    """What the E-step's masks come from: the tokens' "attention", or "attention×fit": the attention weighed by
    how much better the concept's row explains each pixel than the other concepts' rows (EM's posterior)."""
    estep_timesteps: tuple[int, ...] = (200, 400, 600)
    """Timesteps at which the E-step noises the pictures and reads the tokens' attention."""
    estep_draws: int = 2
    """Noise draws per E-step timestep."""
    rows_per_pass: int = 0
    """Rows (pictures × (1 + concepts)) run through the UNet at once in an M-step, their gradients added up:
    0 all at once, then half as many each time the card runs out of memory (so SD1.5 at 512² fits an 8 GB
    card, docs/extract.md); 1 bounds the memory to one row's activations from the start."""
    seed: int = 0

    def validate(self) -> "ExtractSettings":
        whole = {"rounds": (self.rounds, 0), "steps": (self.steps, 1), "vectors": (self.vectors, 1),
                 "lora_rank": (self.lora_rank, 1), "estep_draws": (self.estep_draws, 1),
                 "rows_per_pass": (self.rows_per_pass, 0)}
        for name, (value, least) in whole.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ExtractError(f"{name} must be a whole number of at least {least}, got {value!r}")
        if self.vectors > 16:
            raise ExtractError(f"vectors must be at most 16, got {self.vectors}")
        for name in ("learning_rate", "lora_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ExtractError(f"{name} must be a number in (0, 1], got {value!r}")
        if self.user_masks not in USER_MASKS:
            raise ExtractError(f"user_masks must be one of {', '.join(USER_MASKS)}, got {self.user_masks!r}")
        if self.mask_split not in MASK_SPLITS:
            raise ExtractError(f"mask_split must be one of {', '.join(MASK_SPLITS)}, got {self.mask_split!r}")
        if self.estep_rows not in ESTEP_ROWS:
            raise ExtractError(f"estep_rows must be one of {', '.join(ESTEP_ROWS)}, got {self.estep_rows!r}")
        if self.estep_evidence not in ESTEP_EVIDENCE:
            raise ExtractError(f"estep_evidence must be one of {', '.join(ESTEP_EVIDENCE)}, got {self.estep_evidence!r}")
        if not self.estep_timesteps or any(not 0 <= int(t) < 1000 for t in self.estep_timesteps):
            raise ExtractError(f"estep_timesteps must be timesteps in [0, 1000), got {self.estep_timesteps!r}")
        return self


def check_concepts(concepts: list[ExtractConcept], images: int) -> None:
    """1-4 concepts with distinct valid names, a class word each, and at most one mask per image."""
    if not 1 <= len(concepts) <= 4:
        raise ExtractError(f"extract 1 to 4 concepts, got {len(concepts)}")
    names = [c.name for c in concepts]
    for c in concepts:
        if not NAME.match(c.name or ""):
            raise ExtractError(f"the concept name {c.name!r} must be one word: a letter, then letters, digits, '_' or '-' "
                               "(2-64 characters)")
        if not (c.class_word or "").strip():
            raise ExtractError(f"concept {c.name!r} has no class word (e.g. 'man', 'woman', 'dog'): its token starts from it")
        if len(c.masks) > images:
            raise ExtractError(f"concept {c.name!r} has {len(c.masks)} masks for {images} pictures")
    if len({n.lower() for n in names}) != len(names):
        raise ExtractError(f"two concepts share a name: {', '.join(names)}")
