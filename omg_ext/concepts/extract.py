"""The EM loop: masks from the tokens (E), tokens (and the optional LoRAs) from the masks (M), for a few rounds.

Round 0 is the first E-step, with every token at its class word's embedding (or the user's drawn masks);
each later round runs ``steps`` optimiser steps on the masked loss, then the E-step again. Every round's
masks and mean loss are kept (``Extraction.rounds``), to show and to measure. ``check`` is called before
every step and may raise to stop (the WebUI's Interrupt): nothing of the host is changed by this module, so
stopping needs no undoing, and the optimiser's state goes with the function's frame.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .estep import masks_from_maps, responsibilities, token_maps, token_maps_and_errors
from .lora import ConceptLoRA
from .model import ConceptModel
from .mstep import StepDraw, rows_loss, step_rows
from .settings import ExtractConcept, ExtractSettings, check_concepts

BACKGROUND = "omgbackground"
"""The background token's name in the training prompts (never written to a file)."""


@dataclass
class Round:
    masks: torch.Tensor
    """[images, concepts, H, W] 0/1 at latent resolution: the masks this round's E-step gave (or the user's)."""
    loss: float | None
    """The mean masked loss of the round's M-step (None for round 0)."""


@dataclass
class Extraction:
    vectors: dict[str, torch.Tensor]
    """Per concept name its embedding [vectors, dim] (float32, CPU)."""
    rounds: list[Round] = field(default_factory=list)
    loras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per concept name its kohya tensors, with the LoRA option."""
    seconds: float = 0.0


def phrase(concept: ExtractConcept) -> str:
    """A concept's words in the training prompts, and in OMG's concept prompts afterwards: "a <name> man"."""
    return f"a {concept.name} {concept.class_word.strip()}"


def whole_prompt(concepts: list[ExtractConcept], background: bool) -> str:
    return " and ".join(phrase(c) for c in concepts) + (f" {BACKGROUND}" if background else "")


def concept_tokens(model: ConceptModel, prompt: str, concepts: list[ExtractConcept], embeddings: dict) -> list[list[int]]:
    """Per concept, its positions in ``prompt``: its embedding's vectors and the class word's tokens right after them."""
    tokens = []
    for c in concepts:
        own = model.positions(prompt, c.name, embeddings)
        word = sorted(p for p in model.positions(prompt, c.class_word.strip(), embeddings) if p > max(own))
        follows = [p for k, p in enumerate(word) if p == max(own) + 1 + k]
        tokens.append(own + follows)
    return tokens


def user_masks(concepts: list[ExtractConcept], images: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """[images, concepts, H, W] of the drawn masks resized to the latent (0/1; boxes of figures that overlap may
    overlap), -1 where a concept drew nothing; None when nobody drew."""
    if not any(m is not None for c in concepts for m in c.masks):
        return None
    out = torch.full((images, len(concepts), *latent_hw), -1.0)
    for j, c in enumerate(concepts):
        for i, m in enumerate(c.masks):
            if m is not None:
                out[i, j] = (F.interpolate(m.float()[None, None], size=latent_hw, mode="area")[0, 0] > 0.5).float()
    return out


def with_user_masks(estimated: torch.Tensor, drawn: torch.Tensor | None) -> torch.Tensor:
    """The E-step's masks where nobody drew; a drawn mask replaces its concept's and is taken from the others."""
    if drawn is None:
        return estimated
    taken = (drawn > 0).any(1, keepdim=True)
    return torch.where(drawn >= 0, drawn, estimated * ~taken)


def concept_maps(model: ConceptModel, latents: torch.Tensor, concepts: list[ExtractConcept], embeddings: dict,
                 settings: ExtractSettings, full: str, lora: ConceptLoRA | None, generator: torch.Generator,
                 learnt: bool = True) -> torch.Tensor:
    """[images, concepts, h, w]: each concept's token attention, read in the whole prompt's row or (``estep_rows``
    "concept") in a row of its own phrase (with its LoRA), where the M-step trained it to explain its figure;
    with ``estep_evidence`` "attention×fit" and ``learnt`` tokens (after round 0: before it every concept's row
    is its class word, whose fit says nothing of which figure is whose) weighed by how much better that row
    explains each pixel."""
    images = latents.shape[0]
    if settings.estep_rows == "whole":
        context = model.encode([full] * images, embeddings)
        tokens = [concept_tokens(model, full, concepts, embeddings)] * images
        return token_maps(model, latents, context, tokens, tuple(settings.estep_timesteps), settings.estep_draws, generator)
    own = [phrase(c) for c in concepts]
    context = model.encode(own * images, embeddings)
    tokens = [[concept_tokens(model, own[j], [c], embeddings)[0]] for _ in range(images) for j, c in enumerate(concepts)]
    rows = [j for _ in range(images) for j in range(len(concepts))]
    with lora.installed(rows) if lora is not None and settings.estep_lora else contextlib.nullcontext():
        maps, errors = token_maps_and_errors(model, latents.repeat_interleave(len(concepts), 0), context, tokens,
                                             tuple(settings.estep_timesteps), settings.estep_draws, generator)
    maps = maps.view(images, len(concepts), *maps.shape[-2:])
    if settings.estep_evidence == "attention" or not learnt:
        return maps
    fit = responsibilities(errors.view(images, len(concepts), *errors.shape[-2:]))
    return F.interpolate(maps, size=fit.shape[-2:], mode="bilinear", align_corners=False) * fit


def step(model: ConceptModel, latents: torch.Tensor, masks: torch.Tensor, vectors: dict, lora: ConceptLoRA | None,
         full: str, phrases: list[str], params: list, rows_per_pass: int, generator: torch.Generator
         ) -> tuple[float, list[torch.Tensor]]:
    """One optimiser step's mean loss over every row and its gradients, the rows run ``rows_per_pass`` at a time
    (0: all at once); only the new tensors' gradients are computed, never the model's."""
    draw = StepDraw.draw(model, latents, generator)
    rows = step_rows(latents.shape[0], masks.shape[1])
    size = rows_per_pass or len(rows)
    total, grads = 0.0, [torch.zeros_like(p) for p in params]
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        with torch.enable_grad():
            embeddings = {k: v.to(latents.device) for k, v in vectors.items()}
            with lora.installed([r.concept for r in part]) if lora is not None else contextlib.nullcontext():
                loss = rows_loss(model, draw, masks, part, full, phrases, embeddings) / len(rows)
            for g, new in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if new is not None:
                    g += new
        total += float(loss.detach())
    return total, grads


def fitting_step(model: ConceptModel, latents: torch.Tensor, masks: torch.Tensor, vectors: dict, lora: ConceptLoRA | None,
                 full: str, phrases: list[str], params: list, rows_per_pass: int, generator: torch.Generator,
                 fits: list[int]) -> tuple[float, list[torch.Tensor]]:
    """``step``, its rows run ``rows_per_pass`` at a time, or with 0 as many as ``fits`` [the last count that
    fitted] says: all at first, half as many after the device ran out of memory, the step retried with the
    same draw (the gradients add up to the same step whatever the count)."""
    state = generator.get_state()
    while True:
        try:
            return step(model, latents, masks, vectors, lora, full, phrases, params, rows_per_pass or fits[0], generator)
        except torch.OutOfMemoryError:
            if rows_per_pass or fits[0] == 1:
                raise
            fits[0] = (fits[0] + 1) // 2
            generator.set_state(state)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def extract(model: ConceptModel, latents: torch.Tensor, concepts: list[ExtractConcept], settings: ExtractSettings,
            report: Callable[[str, float], None] = lambda text, done: None, check: Callable[[], None] = lambda: None
            ) -> Extraction:
    """Learn each concept's embedding (and LoRA) from ``latents`` [images, C, H, W] of the same concepts."""
    started = time.perf_counter()
    settings.validate()
    check_concepts(concepts, latents.shape[0])
    images, hw = latents.shape[0], tuple(latents.shape[-2:])
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        vectors = {c.name: nn.Parameter(model.init_vectors(c.class_word.strip(), settings.vectors).detach().float().cpu())
                   for c in concepts}
        if settings.background:
            vectors[BACKGROUND] = nn.Parameter(model.init_vectors("background", 1).detach().float().cpu())
    lora = ConceptLoRA(model.lora_layers, len(concepts), settings.lora_rank, settings.seed) if settings.lora else None
    groups = [{"params": list(vectors.values()), "lr": settings.learning_rate}]
    if lora is not None:
        lora.to(latents.device)
        groups.append({"params": list(lora.parameters()), "lr": settings.lora_learning_rate})
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    full = whole_prompt(concepts, settings.background)
    phrases = [phrase(c) for c in concepts]
    drawn = user_masks(concepts, images, hw)
    units = settings.rounds * settings.steps + settings.rounds + 1
    fits = [len(step_rows(images, len(concepts)))]
    done = 0

    def progress(text: str) -> None:
        check()
        report(text, done / units)

    def e_step(r: int) -> torch.Tensor:
        nonlocal done
        progress(f"round {r}: masks from the tokens' attention")
        if drawn is not None and settings.user_masks == "fixed" and bool((drawn >= 0).any(1).all()):
            masks = drawn
        else:
            with torch.no_grad():
                embeddings = {k: v.detach().to(latents.device) for k, v in vectors.items()}
                maps = concept_maps(model, latents, concepts, embeddings, settings, full, lora, generator, learnt=r > 0)
            estimated = masks_from_maps(maps, hw, [c.class_word.strip() for c in concepts], settings.mask_split).cpu()
            masks = with_user_masks(estimated, drawn if (r == 0 or settings.user_masks == "fixed") else None)
        done += 1
        return masks

    masks = e_step(0)
    rounds = [Round(masks, None)]
    for r in range(1, settings.rounds + 1):
        losses = []
        for s in range(settings.steps):
            progress(f"round {r}/{settings.rounds}: step {s + 1}/{settings.steps}"
                     + (f", loss {losses[-1]:.4f}" if losses else ""))
            loss, grads = fitting_step(model, latents, masks.to(latents.device), vectors, lora, full, phrases, params,
                                       settings.rows_per_pass, generator, fits)
            for p, g in zip(params, grads):
                p.grad = g
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(loss)
            done += 1
        masks = e_step(r)
        rounds.append(Round(masks, sum(losses) / len(losses)))
    check()  # an Interrupt during the last E-step
    report("done", 1.0)
    result = Extraction({c.name: vectors[c.name].detach().clone() for c in concepts}, rounds,
                        {c.name: lora.kohya(j) for j, c in enumerate(concepts)} if lora is not None else {},
                        time.perf_counter() - started)
    return result
