"""Ways to put two identities in one toy-world picture, each a function of (world, case, seeds).

- ``no LoRA``: the global prompt alone (also OMG's pass 1: the layout every method is compared to);
- ``global LoRAs``: what users do today: both LoRAs applied to the whole model, both trigger
  words in the prompt ("a zorb man and a quix woman on grass");
- ``fixed regions``: Regional-Prompter-like: the left half of the picture is the first
  concept's, the right half the second's, from the first step (OMG's blend through the
  ``regions`` mask source, blend start 0, no layout pass);
- ``OMG``: this project's defaults (attention masks split by figures, layout preservation, blend start 0.35,
  concepts guided against the host's uncond rows, the background outside the masks from pass 1);
- ``OMG grounded``: the same with masks from the paper's route, a detector and a segmenter
  on the layout image (``toyworld.grounding``, through the ``detector+sam`` mask source);
- ``official``: the official code's settings where they differ from this project's, as far
  as they change the picture: blending from step 16 of 50 (0.32), concept LoRA weight 0.8,
  self-attention taken from pass 1 for the first 40 % of the steps, each concept guided
  against its own negative prompt with its LoRA, the background redrawn by the global prompt's rows (its cost schedule, a
  duplicate image in pass 1 and one UNet call per concept, gives the same picture as the
  expanded batch). Its masks are summed where they
  overlap; here they stay exclusive;
- ``OMG one pass``: no layout pass: fast mode's masks, then each concept in rows of its own (the "one pass" mode);
- ``OMG fast``: fast mode (the concepts' LoRAs masked in the host's rows).

Every method samples with Euler, 20 steps, CFG 5, one seed per image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from omg_ext.config import ConceptSpec, OmgConfig
from omg_ext.engine.lora import RowRoutedLoRA
from omg_ext.engine.session import Concept
from omg_ext.masks.regions import parse_regions
from omg_ext.masks.sources import MaskInputs, MaskModels, concept_masks
from minisd.runs import run_fast, run_omg
from minisd.sampling import CFGDenoiser, generate, initial_noise, sample_euler

from .grounding import ToyDetector, ToySegmenter
from .lora_files import read_kohya, text_router
from .measures import ConceptLook
from .model import SCHEDULE, WEIGHTS, ToyModel, to_images
from .scenes import IDENTITIES, SIZE, Figure, Scene, scene_prompt
from .scorer import Scorer
from .text import word_positions

STEPS, CFG = 20, 5.0


@dataclass(frozen=True)
class Case:
    """A two-concept prompt: the identities (man's, woman's), the background, who stands in front."""

    identities: tuple[int, ...]
    background: str
    in_front: bool = False

    def scene(self, triggers: bool) -> Scene:
        figures = [Figure(IDENTITIES[k - 1].figure, 0, 0, 0, k if triggers else 0) for k in self.identities]
        return Scene(self.background, figures, self.in_front)

    def prompt(self, triggers: bool = False) -> str:
        return scene_prompt(self.scene(triggers))

    def concept_prompt(self, j: int) -> str:
        """What a user writes in concept j's row: "a zorb man on grass"."""
        return scene_prompt(Scene(self.background, [self.scene(True).figures[j]]))

    @property
    def looks(self) -> list[ConceptLook]:
        return [ConceptLook(k) for k in self.identities]


@dataclass
class Settings:
    """The OMG settings a method runs with (the WebUI's ``OmgConfig`` defaults unless changed)."""

    blend_start: float = OmgConfig.blend_start
    layout: bool = OmgConfig.layout_preservation
    self_attention_until: float = OmgConfig.self_attention_until
    layout_until: float = 1.0
    """Fraction of the steps after which pass 2 runs without layout preservation (1: layout to the end)."""
    keep_attention: bool = True
    """Layout from pass 1's kept cross-attention outputs (the engine's default) or from reference rows."""
    share_uncond: bool = OmgConfig.concept_guidance == "shared"
    """Concepts guided against the host's uncond rows (no concept uncond rows)."""
    background_from_pass1: bool = OmgConfig.background == "pass 1"
    """Outside the masks, pass 1's recorded outputs instead of the host cond rows (a row fewer per image)."""
    dilation: int = OmgConfig.mask_dilation
    feather: int = OmgConfig.mask_feather
    lora_weight: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    """The fractions of pass 1's steps whose attention makes the masks."""
    masks: str = "attention"
    """``attention``, ``halves`` (fixed left/right regions), ``grounded`` (the toy detector and
    segmenter through the ``detector+sam`` source: the paper's route) or ``grounded init`` (the same on
    img2img's init pictures)."""
    concept_rows: bool = False
    """Fast mode with concept rows from the blend start: the "one pass" mode."""
    mask_split: str = OmgConfig.mask_split
    """How attention masks are shared out: ``figures`` (each figure, or a band of touching ones, to one
    concept) or ``pixels`` (each pixel to the strongest attention)."""


@dataclass(frozen=True)
class Img2Img:
    """An img2img job's start: the init pictures as the model's input ([B, 3, H, W] in [-1, 1]) and the strength."""

    init: torch.Tensor
    strength: float


def img2img_args(init: Img2Img | None) -> dict:
    return {} if init is None else {"init": init.init, "strength": init.strength}


class ToyWorld:
    """The trained toy model, its identity LoRAs and the scorer, loaded once."""

    def __init__(self, weights: Path = WEIGHTS):
        self.model = ToyModel.load(weights / "base.safetensors")
        self.scorer = Scorer.load(weights / "scorer.safetensors")
        self.files = {k: weights / f"{i.trigger}.safetensors" for k, i in enumerate(IDENTITIES, start=1)}
        self._loras: dict[tuple[int, float], dict] = {}

    def lora(self, identity: int, weight: float = 1.0) -> dict:
        """``{"unet": deltas, "text": deltas}`` of an identity's file at a weight."""
        if (identity, weight) not in self._loras:
            self._loras[identity, weight] = read_kohya(self.files[identity], self.model, weight)
        return self._loras[identity, weight]

    @torch.no_grad()
    def encode(self, prompt: str, identities=(), weight: float = 1.0) -> dict:
        """A prompt's conditioning with the given identities' text-encoder LoRAs applied."""
        if not identities:
            return self.model.encode([prompt])
        router = text_router(self.model, [self.lora(k, weight)["text"] for k in identities])
        with router.installed(), router.route([(j, 0, None) for j in range(len(identities))], batch=None):
            return self.model.encode([prompt])

    def sample(self, cond: dict, uncond: dict, seeds: list[int], init: Img2Img | None = None) -> torch.Tensor:
        """A plain generation of one image per seed (Euler, ``STEPS``, CFG ``CFG``), img2img from ``init``."""
        raw = self.model.unet_fn()
        fn = lambda x, t, c, rows: raw(x, t, c)  # noqa: E731
        rows = len(seeds)
        return generate(fn, SCHEDULE, "euler", _rows(cond, rows), _rows(uncond, rows), seed=0, steps=STEPS,
                        latent_shape=(rows, 3, SIZE, SIZE), cfg_scale=CFG, seeds=seeds, **img2img_args(init))


def _rows(cond: dict, rows: int) -> dict:
    return {k: v.expand(rows, *v.shape[1:]) for k, v in cond.items()}


@dataclass
class Generated:
    images: torch.Tensor
    """[B, H, W, 3] in [0, 1]."""
    masks: torch.Tensor | None = None
    """[B, concepts, H, W], where the method used masks."""


def no_lora(world: ToyWorld, case: Case, seeds: list[int]) -> Generated:
    return Generated(to_images(world.sample(world.encode(case.prompt()), world.encode(""), seeds)))


def global_loras(world: ToyWorld, case: Case, seeds: list[int], weight: float = 1.0, init: Img2Img | None = None) -> Generated:
    ids = case.identities
    router = RowRoutedLoRA(dict(world.model.unet.named_modules()), [world.lora(k, weight)["unet"] for k in ids])
    cond, uncond = world.encode(case.prompt(triggers=True), ids, weight), world.encode("", ids, weight)
    with router.installed(), router.route([(j, 0, None) for j in range(len(ids))], batch=None):
        return Generated(to_images(world.sample(cond, uncond, seeds, init)))


def halves(case: Case) -> str:
    """The fixed regions as the WebUI's region canvas stores them: concept 1 left, concept 2 right."""
    return json.dumps({"width": SIZE, "height": SIZE,
                       "boxes": {"1": [0, 0, SIZE // 2, SIZE], "2": [SIZE // 2, 0, SIZE, SIZE]}})


def _labels_and_groups(case: Case, s: Settings) -> tuple[list[str], list[list[int]]]:
    """The concepts' class words and the groups whose masks are split into instances, as the WebUI sets them."""
    labels = [IDENTITIES[k - 1].figure for k in case.identities]
    return labels, OmgConfig(mask_split=s.mask_split, concepts=[ConceptSpec(class_word=w) for w in labels]).mask_groups()


def _attention_masks(case: Case, s: Settings):
    """The function of the session that gives its attention masks as the WebUI makes them with these settings."""
    labels, groups = _labels_and_groups(case, s)
    return lambda session: torch.stack([m.masks for m in session.attention_masks(
        dilation=s.dilation, feather=s.feather, window=s.window, groups=groups, order=OmgConfig.instance_order,
        labels=labels)])


def _mask_maker(world: ToyWorld, case: Case, s: Settings, images: int, init: Img2Img | None = None):
    """The function of (session, layout latent) after pass 1 that gives the masks the settings ask for; with
    ``grounded init`` the detector and segmenter look at img2img's init pictures instead of the layout."""
    if s.masks == "attention":
        attention = _attention_masks(case, s)
        return lambda session, layout: attention(session)
    labels, groups = _labels_and_groups(case, s)
    if s.masks == "halves":
        source, extra = "regions", dict(regions=parse_regions(halves(case), len(case.identities)))
        models = None
    elif s.masks in ("grounded", "grounded init"):
        source, extra = "detector+sam", {}
        models = MaskModels(sam=lambda: ToySegmenter(world.scorer).segment, detector=lambda: ToyDetector(world.scorer))
    else:
        raise ValueError(f"unknown toy mask source {s.masks!r}")

    def masks(session, layout):
        pictures = (to_images(init.init if s.masks == "grounded init" else layout) * 255).round().to(torch.uint8).numpy()
        maps = session.attention_maps(s.window)
        return torch.stack([
            concept_masks(source, MaskInputs(maps[b], (SIZE, SIZE), labels, image=pictures[b], groups=groups,
                                             dilation=s.dilation, feather=s.feather, **extra), models).masks
            for b in range(images)])
    return masks


def _omg_run(world: ToyWorld, case: Case, seeds: list[int], s: Settings, concepts: list[Concept] | None = None,
             init: Img2Img | None = None):
    """The engine's two passes on the toy model: (result, host cond rows, host uncond rows); the concepts are the
    identities' LoRAs with their trigger prompts unless given."""
    prompt = case.prompt()
    concepts = concepts or [
        Concept(world.encode(case.concept_prompt(j), (k,), s.lora_weight), world.encode("", (k,), s.lora_weight),
                world.lora(k, s.lora_weight)["unet"], word_positions(prompt, IDENTITIES[k - 1].figure))
        for j, k in enumerate(case.identities)
    ]
    rows = len(seeds)
    cond, uncond = _rows(world.encode(prompt), rows), _rows(world.encode(""), rows)
    result = run_omg(world.model.unet, concepts, cond, uncond, steps=STEPS, latent_shape=(rows, 3, SIZE, SIZE),
                     cfg_scale=CFG, seeds=seeds, blend_start=s.blend_start, layout=s.layout,
                     self_attention_until=s.self_attention_until, layout_until=s.layout_until, share_uncond=s.share_uncond,
                     background_from_pass1=s.background_from_pass1, keep_attention=s.keep_attention,
                     masks=_mask_maker(world, case, s, rows, init), **img2img_args(init))
    return result, cond, uncond


def omg(world: ToyWorld, case: Case, seeds: list[int], settings: Settings | None = None,
        concepts: list[Concept] | None = None, init: Img2Img | None = None) -> Generated:
    """OMG with the given settings (this project's defaults unless changed), and concepts (the identities' LoRAs)."""
    result, _, _ = _omg_run(world, case, seeds, settings or Settings(), concepts, init)
    return Generated(to_images(result.final), result.masks)


def omg_fast(world: ToyWorld, case: Case, seeds: list[int], settings: Settings | None = None,
             init: Img2Img | None = None, masks: torch.Tensor | None = None) -> Generated:
    """OMG's fast mode: one pass, each concept's LoRA and prompt masked in the host's rows from the blend start
    (attention masks of the steps before it, or ``masks`` [images, concepts, H, W] given)."""
    s = settings or Settings()
    if s.masks != "attention":
        raise ValueError("the toy world runs fast mode with attention masks only")
    prompt, rows = case.prompt(), len(seeds)
    concepts = [
        Concept(world.encode(case.concept_prompt(j), (k,), s.lora_weight), world.encode("", (k,), s.lora_weight),
                world.lora(k, s.lora_weight)["unet"], word_positions(prompt, IDENTITIES[k - 1].figure))
        for j, k in enumerate(case.identities)
    ]
    result = run_fast(world.model.unet, concepts, _rows(world.encode(prompt), rows), _rows(world.encode(""), rows),
                      steps=STEPS, latent_shape=(rows, 3, SIZE, SIZE), cfg_scale=CFG, seeds=seeds,
                      blend_start=s.blend_start, masks=_attention_masks(case, s) if masks is None else masks,
                      share_uncond=s.share_uncond, concept_rows=s.concept_rows, **img2img_args(init))
    return Generated(to_images(result.final), result.masks)


HIRES_SCALE, HIRES_DENOISE = 1.5, 0.5
"""The hires fix users run: the latent upscaled 1.5x, then half of the steps again."""


@torch.no_grad()
def omg_hires(world: ToyWorld, case: Case, seeds: list[int], blend: bool) -> Generated:
    """OMG, then a hires pass as the WebUIs run it: the plain model (``blend=False``, this
    project's default) or OMG's blend continued with the masks resized (``hires_blend``)."""
    result, cond, uncond = _omg_run(world, case, seeds, Settings())
    x = F.interpolate(result.final, scale_factor=HIRES_SCALE, mode="bilinear", align_corners=False)
    sigmas = SCHEDULE.get_sigmas(STEPS)[round(STEPS * (1 - HIRES_DENOISE)):]
    x = x + initial_noise(tuple(x.shape), 0, [seed + 1 for seed in seeds]) * sigmas[0]
    session, raw = result.session, world.model.unet_fn()
    with session.installed():
        session.begin_hires(blend)
        denoiser = CFGDenoiser(lambda x_, t, c, rows: session(raw, x_, t, c, rows), SCHEDULE, cond, uncond, CFG)
        return Generated(to_images(sample_euler(denoiser, x, sigmas)), result.masks)


METHODS: dict[str, Callable[[ToyWorld, Case, list[int]], Generated]] = {
    "no LoRA": no_lora,
    "global LoRAs": global_loras,
    "fixed regions": lambda w, c, s: omg(w, c, s, Settings(masks="halves", blend_start=0.0, layout=False, share_uncond=False,
                                                                 background_from_pass1=False)),
    "OMG": omg,
    "official": lambda w, c, s: omg(w, c, s, Settings(blend_start=0.32, lora_weight=0.8, self_attention_until=0.4,
                                                          share_uncond=False, background_from_pass1=False)),
    "OMG one pass": lambda w, c, s: omg_fast(w, c, s, Settings(concept_rows=True)),
    "OMG fast": omg_fast,
}

ABLATIONS: dict[str, Callable[[ToyWorld, Case, list[int]], Generated]] = {
    "OMG grounded": lambda w, c, s: omg(w, c, s, Settings(masks="grounded")),
    "OMG self-attn 0.4": lambda w, c, s: omg(w, c, s, Settings(self_attention_until=0.4, background_from_pass1=False)),
    "OMG weight 0.8": lambda w, c, s: omg(w, c, s, Settings(lora_weight=0.8)),
    "OMG no layout": lambda w, c, s: omg(w, c, s, Settings(layout=False, background_from_pass1=False)),
    "OMG layout to 0.6": lambda w, c, s: omg(w, c, s, Settings(layout_until=0.6, background_from_pass1=False)),
    "OMG reference rows": lambda w, c, s: omg(w, c, s, Settings(keep_attention=False, background_from_pass1=False)),
    "OMG background redrawn": lambda w, c, s: omg(w, c, s, Settings(background_from_pass1=False)),
    "OMG pixel split": lambda w, c, s: omg(w, c, s, Settings(mask_split="pixels")),
    "OMG fast pixel split": lambda w, c, s: omg_fast(w, c, s, Settings(mask_split="pixels")),
    "OMG own uncond": lambda w, c, s: omg(w, c, s, Settings(share_uncond=False)),
    "OMG fast own uncond": lambda w, c, s: omg_fast(w, c, s, Settings(share_uncond=False)),
    "OMG fast blend 0.3": lambda w, c, s: omg_fast(w, c, s, Settings(blend_start=0.3)),
    **{f"OMG blend {start}": partial(omg, settings=Settings(blend_start=start)) for start in (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)},
    "OMG maps 0-0.3": lambda w, c, s: omg(w, c, s, Settings(window=(0.0, 0.3))),
    "OMG maps 0-0.5": lambda w, c, s: omg(w, c, s, Settings(window=(0.0, 0.5))),
    "OMG maps 0.5-1": lambda w, c, s: omg(w, c, s, Settings(window=(0.5, 1.0))),
    **{f"OMG one pass {start}": partial(omg_fast, settings=Settings(concept_rows=True, blend_start=start))
       for start in (0.4, 0.45, 0.5, 0.6)},
    "OMG fast, two-pass masks": lambda w, c, s: omg_fast(w, c, s, masks=omg(w, c, s).masks),
    "OMG, fast's masks": lambda w, c, s: omg(w, c, s, Settings(window=(0.0, OmgConfig.blend_start))),
    **{f"OMG fast blend {start}": partial(omg_fast, settings=Settings(blend_start=start)) for start in (0.2, 0.5, 0.6, 0.7)},
    "OMG + hires": lambda w, c, s: omg_hires(w, c, s, blend=False),
    "OMG + hires blend": lambda w, c, s: omg_hires(w, c, s, blend=True),
}
"""OMG with one setting changed at a time (and the grounded masks): ``bench_quality.py --ablations``. The
layout-preservation settings (self-attention, layout window, reference rows) act on the host's cond rows, which
run only with the background redrawn: those ablations redraw it."""
