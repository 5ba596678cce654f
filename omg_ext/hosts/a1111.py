"""The Automatic1111 v1.10 adapter: a generation's lifecycle (the Forge family's adapter extends it).

One ``A1111Generation`` per txt2img or img2img job. It replaces ``p.sample`` (and
txt2img's ``p.sample_hr_pass``) on the processing object for the job; inside the replaced
``sample`` it runs pass 1, builds the masks and runs pass 2, with the model patched only
for that call and restored in ``finally`` (errors, Interrupt, Skip). In img2img both passes
are the host's own img2img sampling from the init latent (pass 2 from the same noise); with
an inpaint mask each concept's mask is cut to the inpainted area, and SAM and the detector
look at the init picture the host prepared (resized, or cropped for "only masked"):

- an instance ``forward`` on ``p.sd_model.model.diffusion_model`` routes every UNet call
  through the engine's ``OmgSession``;
- the engine's attention processors and LoRA hooks (``OmgSession.installed``);
- an ``on_cfg_denoiser`` callback that tells which rows are cond and uncond.

Concept LoRAs are parsed by the host's own loader and never activated the host's way
(``loras``); the rows' roles come from the CFG denoiser (``row_tracker``); the WebUI's
settings, X/Y/Z axes and image saving live in ``webui_settings``, the script API's
version differences in ``host_api``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy
import torch

from ..config import ONE_PASS_MODES, OmgConfig, compact, concept_loras_in_prompt, to_infotext
from ..engine.masks import overlay
from ..engine.memory import MemoryBudget
from ..engine.record import first_blended
from ..engine.session import Concept, OmgSession
from ..masks.regions import Regions, cropped, parse_regions
from ..masks.sources import MaskInputs, concept_masks
from .concept_cache import CONCEPTS
from .controlnet_units import (RowConcepts, adopt_prompt_marks, concept_controls, controlnet_script, fresh_ip_adapter_caches,
                               ip_adapter_terms, is_ip_adapter, job_params, sd_webui_controlnet_params)
from .errors import OmgUserError
from .host_api import add_callback, add_progress_job
from .loras import fill_lora_hashes, load_concept_lora, lora_on_disk, merged
from .mask_models import mask_models, release_mask_models
from .pictures import to_pil, to_pictures
from .row_tracker import RowTracker, refuse_and
from .webui_settings import KEEP_ATTENTION_OPTION, memory_budget


NAN_MESSAGE = ("OMG: the model gave NaN (not-a-number) values before the masks were made, so none can be made. The "
               "checkpoint, a LoRA or half precision overflowed: the same prompt without OMG fails the WebUI's NaN check "
               "or gives a black image. Try lower LoRA weights (the text encoder's first), the setting \"Upcast cross "
               "attention layer to float32\" or --no-half.")


# ---------------------------------------------------------------- one generation

CONCEPT_KEY = "omg:concept"
"""Each row's concept (-1: a host or reference row), when a concept has a ControlNet unit of its own: the host
rows carry -1, each concept's conditioning its number, and the engine's expansion does the rest."""


@dataclass
class Prepared:
    concepts: list[Concept]
    labels: list[str]
    regions: Regions | None = None


class A1111Generation:
    """OMG for one txt2img or img2img job ``p``."""

    def __init__(self, p, cfg: OmgConfig) -> None:
        prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
        refuse_and(prompts)
        self.p, self.cfg = p, cfg
        self.unet = self.unet_module()
        self.prepared: Prepared | None = None
        self.layout_images: list = []
        """Per image of the job so far: the pictures shown beside it, as (image, file suffix) pairs."""
        self.to_show: tuple[torch.Tensor, list] | None = None
        """The current batch's masks and layout pictures, shown once the host has decoded its images (``keep_pictures``)."""
        self.warnings: list[str] = concept_loras_in_prompt(cfg, prompts)
        self.outside_crop: list[int] = []
        """Concepts whose drawn region lies outside the crop inpainting's "only masked" samples: not drawn."""

    def unet_module(self):
        """The UNet ``nn.Module`` of the job's model."""
        return self.p.sd_model.model.diffusion_model

    # -- wiring on p (per job; p is discarded after the job)
    def attach(self) -> None:
        p = self.p
        original_sample, original_hr = p.sample, getattr(p, "sample_hr_pass", None)

        def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
            return self.sample(original_sample, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)

        def sample_hr_pass(*args, **kwargs):
            if self.session is not None:
                self.session.begin_hires(self.cfg.hires_blend)
            return original_hr(*args, **kwargs)

        p.sample = sample
        if original_hr is not None:  # txt2img's hires fix
            p.sample_hr_pass = sample_hr_pass
        self.session: OmgSession | None = None
        fill_lora_hashes(self.cfg)
        p.extra_generation_params.update(to_infotext(self.cfg))
        logging.getLogger("sd-webui-omg").info(compact(self.cfg))

    def sample(self, original, c, uc, seeds, subseeds, subseed_strength, prompts):
        from modules import rng, shared

        p = self.p
        self.to_show = None
        if self.prepared is None:
            self.prepared = self.prepare()
        images = len(prompts)
        self.session = session = OmgSession(self.unet, self.prepared.concepts, images=images,
                                            layout=self.cfg.layout_preservation,
                                            image_tokens=self.image_tokens(prompts), memory=self.memory_budget(),
                                            keep_attention=self.cfg.background == "redrawn"  # the only user of them
                                            and bool(shared.opts.data.get(KEEP_ATTENTION_OPTION, True)))
        enable_hr = getattr(p, "enable_hr", False)
        rng_state = (p.rng.shape, p.seeds, p.subseeds, p.subseed_strength, p.seed_resize_from_h, p.seed_resize_from_w)
        try:
            with self.patched(session):
                if self.cfg.mode in ONE_PASS_MODES:
                    return self.sample_fast(session, lambda: original(c, uc, seeds, subseeds, subseed_strength, prompts))
                session.begin_pass1()
                p.enable_hr = False
                add_progress_job(p.steps)
                shared.state.textinfo = "OMG pass 1 of 2: layout"
                layout = original(c, uc, seeds, subseeds, subseed_strength, prompts)
                p.enable_hr = enable_hr
                if shared.state.interrupted or shared.state.skipped:
                    return layout
                self.check_pass1(session)
                shared.state.nextjob()
                shared.state.textinfo = "OMG: making the masks"
                results = self.concept_masks(session, layout if self.cfg.show_layout or self.masks_need_image() else None)
                masks = self.within_inpaint_area(self.skip_missing(results))
                for r in results:
                    self.warnings += r.warnings()
                p.extra_generation_params["OMG mask sources used"] = ", ".join(results[0].sources)
                session.begin_pass2(masks, blend_start=self.cfg.blend_start, self_attention_until=self.cfg.self_attention_until,
                                    share_uncond=self.cfg.concept_guidance == "shared",
                                    background_from_pass1=self.cfg.background == "pass 1")
                if session.blend_from_t == -math.inf and self.cfg.blend_start < 1:  # 1: the host's own picture, asked for
                    raise OmgUserError(no_blended_step_message(self.cfg.blend_start, len(session.record.calls)))
                shape, seeds_, subseeds_, strength, h, w = rng_state
                p.rng = rng.ImageRNG(shape, seeds_, subseeds=subseeds_, subseed_strength=strength,
                                     seed_resize_from_h=h, seed_resize_from_w=w)
                shared.state.textinfo = "OMG pass 2 of 2: concepts"
                final = original(c, uc, seeds, subseeds, subseed_strength, prompts)
        finally:
            p.enable_hr = enable_hr
            self.session = None
        self.to_show = (masks, self.pictures if self.cfg.show_layout else [])
        if self.warnings:
            p.extra_generation_params["OMG warnings"] = "; ".join(dict.fromkeys(self.warnings))
        return final

    def sample_fast(self, session: OmgSession, run) -> torch.Tensor:
        """Fast and one-pass mode: one host sampling run; at the blend start's step (see ``blending``) the masks
        are made — from the attention of the steps before it, from the drawn regions, or by SAM / the
        detector on the image the host's last denoised latent (``on_cfg_after_cfg``) decodes to —
        then the concepts act inside them (masked in the host's rows, or in rows of their own)."""
        from modules import script_callbacks, shared

        made, denoised, calls = [], [], [0]

        def keep_denoised(params) -> None:
            denoised[:] = [params.x]
            calls[0] += 1

        def make_masks(s: OmgSession) -> torch.Tensor:
            results = self.concept_masks(s, denoised[0] if self.masks_need_image() else None)
            made.append(self.within_inpaint_area(self.skip_missing(results)))
            for r in results:
                self.warnings += r.warnings()
            self.p.extra_generation_params["OMG mask sources used"] = ", ".join(results[0].sources)
            return made[0]

        state, start, counted = shared.state, self.cfg.blend_start, [0]

        def blending(t) -> bool:
            # The step being sampled. The host's counter is set by its per-step callback, after the step's
            # UNet calls: during step i it says i - 1 (0 in steps 0 and 1), and DPM fast counts solver
            # iterations, fewer than its steps. The denoiser calls made so far (one a step for most
            # samplers) bound it from the other side for samplers with two a step.
            step = min(calls[0], state.sampling_step + 1)
            counted[0] = max(counted[0], step)
            return step >= start_step()

        def start_step() -> int:
            return first_blended(start, max(state.sampling_steps, 1))

        session.begin_fast(blending, make_masks, context_key=self.context_key, share_uncond=self.cfg.concept_guidance == "shared",
                           concept_rows=self.cfg.mode == "one pass")
        add_callback(script_callbacks.on_cfg_after_cfg, keep_denoised, "omg fast mode")
        try:
            final = run()
        finally:
            script_callbacks.remove_callbacks_for_function(keep_denoised)
        if not made and not (state.interrupted or state.skipped):
            self.warnings.append(f"OMG {self.cfg.mode} mode never reached its blend start (step {start_step()} of {state.sampling_steps}; "
                                 f"sampler {getattr(self.p, 'sampler_name', '?')!r} counted to step {counted[0]}): the image "
                                 "was made without the concepts; lower the blend start, or use another sampler or two passes")
        self.to_show = (made[0], []) if made else None  # no layout pass to show
        if self.warnings:
            self.p.extra_generation_params["OMG warnings"] = "; ".join(dict.fromkeys(self.warnings))
        return final

    context_key = "context"
    """The conditioning entry the engine's calls carry the cross-attention context in."""

    def check_pass1(self, session: OmgSession) -> None:
        """Pass 1 must have gone through the engine (another extension may have replaced the UNet call)."""
        if session.counters["pass1"].calls == 0:
            raise RuntimeError("OMG: no UNet call of pass 1 reached the engine")

    @contextlib.contextmanager
    def patched(self, session: OmgSession) -> Iterator[None]:
        """The UNet forward, the engine's processors and hooks, the denoiser callback; all undone on exit."""
        from modules import script_callbacks

        unet, tracker, row_concepts = self.unet, RowTracker(session.images), RowConcepts()
        saved = unet.__dict__.get("forward")
        raw = saved or (lambda *a, **k: type(unet).forward(unet, *a, **k))
        units = self.cfg.control_units()
        ip_adapters = [param for param in job_params(controlnet_script(self.p)) if is_ip_adapter(param)]
        # the roles whose prompt marks are settled (fast mode's concept prompts go to attention directly: none needed)
        marked_roles = {True, False} if self.cfg.mode == "fast" else set()

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            def unet_fn(x_, t_, cond):
                row_concepts.now = cond.get(CONCEPT_KEY)
                fresh_ip_adapter_caches(ip_adapters)
                return raw(x_, t_, context=cond["context"], y=cond.get("y"), **kwargs)
            cond = {"context": context} if y is None else {"context": context, "y": y}
            if units:
                cond[CONCEPT_KEY] = torch.full((x.shape[0],), -1.0)
            roles = tracker.take(context)
            if len(marked_roles) < 2:  # the first calls of a sampling only: off the per-step path
                adopt_prompt_marks(context, roles, session.conds)
                marked_roles.update(role.is_cond for role in roles)
            return session(unet_fn, x, timesteps, cond, roles)

        add_callback(script_callbacks.on_cfg_denoiser, tracker.on_denoiser, "omg")
        try:
            with session.installed(), concept_controls(sd_webui_controlnet_params(self.p, units), row_concepts, unet):
                if ip_adapters:
                    session.attention_state.added_terms = ip_adapter_terms
                unet.forward = forward
                yield
        finally:
            if saved is not None:
                unet.forward = saved
            else:
                unet.__dict__.pop("forward", None)
            script_callbacks.remove_callbacks_for_function(tracker.on_denoiser)

    # -- concepts: LoRA deltas, conditioning, class-word tokens
    def prepare(self) -> Prepared:
        """The concepts of the job (loaded once: they do not depend on the images' prompts)."""
        self.cfg.validate()
        units = self.cfg.control_units()
        self.find_concept_units(units)
        concepts, labels, loaded = [], [], []
        for j, spec in enumerate(self.cfg.concepts):
            negative = spec.negative_prompt or self.p.negative_prompts[0]
            key = self.concept_key(spec, negative)
            deltas, cond, uncond = CONCEPTS.get(key) or self.load_concept(spec, negative)
            loaded.append((key, (deltas, cond, uncond)))
            cond, uncond = dict(cond), dict(uncond)  # the kept ones stay as loaded
            if units:  # each row's concept travels with it through the engine, for the concepts' own units
                cond[CONCEPT_KEY] = uncond[CONCEPT_KEY] = torch.tensor([float(j)])
            concepts.append(Concept(cond, uncond, deltas))
            labels.append(spec.class_word)
        CONCEPTS.keep(loaded)
        try:
            regions = parse_regions(self.cfg.regions, len(concepts)) if self.cfg.regions.strip() else None
        except ValueError as e:
            raise OmgUserError(str(e)) from e
        crop, whole = getattr(self.p, "paste_to", None), getattr(self.p, "mask_for_overlay", None)
        if regions is not None and crop and whole is not None:  # inpainting "only masked": the crop is sampled
            inside = cropped(regions, whole.size, crop)
            outside = sorted({*regions.boxes, *regions.masks} - {*inside.boxes, *inside.masks})
            if len(outside) == len({*regions.boxes, *regions.masks}):
                raise OmgUserError("OMG: every concept's region lies outside the inpaint area: draw them over the part the "
                                   "inpaint mask repaints")
            self.warnings += [f"OMG concept {j + 1} not drawn: its mask lies outside the inpaint area" for j in outside]
            regions, self.outside_crop = inside, outside
        return Prepared(concepts, labels, regions)

    def find_concept_units(self, units: dict[int, int]) -> None:
        """The concepts' own ControlNet units (``units``: concept -> the unit's number in the ControlNet panel),
        checked: sd-webui-controlnet's, found again for each sampling by ``patched``."""
        sd_webui_controlnet_params(self.p, units)

    def image_tokens(self, prompts: list[str]) -> list[list[list[int]]]:
        """Per image, per concept: the class word's positions in that image's own prompt.

        A batch's prompts differ with wildcards, a prompt matrix or Dynamic Prompts, and so
        do the class words' positions; each image's attention maps use its own. A concept
        whose class word an image's prompt lacks is skipped in that image (no positions, an
        empty mask: ``skip_missing``), with a warning; the other concepts are still made.
        (Its rows still run in pass 2: what a skipped concept adds is masked to nothing.)
        """
        clip, positions, self.missing = self.text_engine(), [], set()
        for i, prompt in enumerate(prompts):
            where = f" of image {i + 1} of the batch ({prompt!r})" if len(set(prompts)) > 1 else ""
            image = []
            for n, spec in enumerate(self.cfg.concepts, start=1):
                tokens = class_word_tokens(clip, prompt, spec.class_word)
                if not tokens:
                    self.missing.add((i, n - 1))
                    self.warnings.append(f"OMG concept {n} skipped: class word {spec.class_word.strip()!r} "
                                         f"does not appear in the prompt{where}")
                image.append(tokens)
            positions.append(image)
        return positions

    def skip_missing(self, results: list) -> torch.Tensor:
        """Masks [images, concepts, H, W] with each skipped concept's mask emptied in the images whose
        prompt lacks its class word (already named in a warning: not again as "empty mask")."""
        for i, j in self.missing:
            results[i].masks[j] = 0
            results[i].empty = [e for e in results[i].empty if e != j]
        return torch.stack([r.masks for r in results])

    def concept_key(self, spec, negative: str):
        """What a loaded concept depends on (``concept_cache``): the host's own key of its prompts'
        conditioning (``p.cached_params``), the model, the LoRA file as it is now, the weights;
        None where the host has no such key (nothing is then kept)."""
        cached_params = getattr(self.p, "cached_params", None)
        if cached_params is None:
            return None
        file = None
        if spec.lora:
            filename = lora_on_disk(spec.lora).filename
            stat = os.stat(filename)
            file = (filename, stat.st_size, stat.st_mtime_ns)
        return (id(self.p.sd_model), id(self.unet), spec.lora, file, spec.unet_weight, spec.te_weight,
                cached_params((spec.prompt, negative), 0, getattr(self.p, "extra_network_data", None)))

    def load_concept(self, spec, negative: str) -> tuple[dict, dict, dict]:
        """(UNet deltas, cond, uncond) of one concept: its prompts encoded with its text-encoder LoRA."""
        unet_deltas, te_deltas = {}, []
        if spec.lora:
            unet_modules = {id(m): (n, m) for n, m in self.unet.named_modules()}
            te_modules = {id(m): (n, m) for n, m in self.p.sd_model.cond_stage_model.named_modules()}
            unet_deltas, te_deltas = load_concept_lora(spec.lora, spec.unet_weight, spec.te_weight, unet_modules, te_modules)
        with torch.no_grad(), merged(te_deltas):
            cond, uncond = self.encode(spec.prompt, False), self.encode(negative, True)
        return unet_deltas, _as_cond(cond), _as_cond(uncond)

    def encode(self, text: str, negative: bool):
        """The host's conditioning of one prompt (size-aware for SDXL)."""
        from modules import prompt_parser

        p = self.p
        return p.sd_model.get_learned_conditioning(
            prompt_parser.SdConditioning([text], width=p.width, height=p.height, is_negative_prompt=negative))

    def memory_budget(self) -> MemoryBudget:
        """A1111 keeps no memory bookkeeping of its own: torch's free memory (``--medvram`` and
        ``--lowvram`` move weights off the GPU between modules, which that reading sees)."""
        return memory_budget()

    def text_engine(self):
        """The host object that tokenizes prompts into 77-token chunks (CLIP-L's for SDXL)."""
        model = self.p.sd_model.cond_stage_model
        return next((e for e in getattr(model, "embedders", [model]) if hasattr(e, "tokenize_line")), None)

    # -- masks
    def concept_masks(self, session: OmgSession, layout: torch.Tensor | None) -> list:
        """One ``MaskResult`` per image from the configured source (attention, SAM, detector, regions);
        ``layout``: the latent SAM and the detector see (None for sources that need no image)."""
        cfg = self.cfg
        init = getattr(self.p, "init_latent", None) if self.masks_need_image() else None  # img2img: the user's picture
        self.pictures = to_pictures(layout) if layout is not None and (init is None or cfg.show_layout) else []
        seen = to_pictures(init) if init is not None else self.pictures
        maps, hw = session.attention_maps(), session.record.latent_hw()
        if not bool(torch.isfinite(maps).all()):
            raise OmgUserError(NAN_MESSAGE)
        models = mask_models(cfg)
        try:
            return [concept_masks(cfg.mask_source, MaskInputs(
                maps[i], hw, self.prepared.labels, numpy.array(seen[i].convert("RGB")) if seen else None,
                cfg.mask_groups(),
                cfg.instance_order, cfg.mask_dilation, cfg.mask_feather, self.prepared.regions), models)
                for i in range(session.images)]
        finally:
            release_mask_models()

    def masks_need_image(self) -> bool:
        """Whether the mask source looks at a picture (SAM, a detector); attention and drawn regions do not,
        and then the layout latent is decoded only to be shown (SD1.5 at 128² on a 2-core CPU: 0.96 s, against
        1.62 s for a 2-row UNet call)."""
        return self.cfg.mask_source not in ("attention", "regions")

    def within_inpaint_area(self, masks: torch.Tensor) -> torch.Tensor:
        """Inpainting: each concept's mask [images, concepts, H, W] cut to the area the host repaints (its latent
        mask ``p.nmask``, blurred and rounded as the host made it); a concept left with nothing there is named
        in a warning (it cannot be drawn in this picture)."""
        area = getattr(self.p, "nmask", None) if getattr(self.p, "mask", None) is not None else None
        if area is None:
            return masks
        masks = masks.clone()
        masks[:, self.outside_crop] = 0  # their regions lie outside the crop "only masked" samples
        cut = masks * area.reshape(-1, *area.shape[-2:])[0].to(masks)  # [latent channels, h, w]: the same in each
        for i, j in ((i, j) for i in range(masks.shape[0]) for j in range(masks.shape[1])):
            if float(masks[i, j].sum()) > 0 and float(cut[i, j].sum()) == 0:
                where = f" in image {i + 1}" if masks.shape[0] > 1 else ""
                self.warnings.append(f"OMG concept {j + 1} not drawn{where}: its mask lies outside the inpaint area")
        return cut

    # -- results
    def keep_pictures(self, images: torch.Tensor) -> None:
        """Per image of the batch the host has just decoded (``images``: [B, 3, H, W] in [0, 1], after any hires
        pass): the layout image if asked for (two passes) and the masks drawn over the image itself, which the
        host decoded anyway — no VAE decode of OMG's own unless the layout is shown or a mask source looks at it."""
        to_show, self.to_show = self.to_show, None
        if to_show is None or not (self.cfg.show_masks or self.cfg.show_layout):
            return
        masks, layouts = to_show
        for i, pixels in enumerate(images[:masks.shape[0]]):
            pictures = [(picture, "-omg-layout") for picture in layouts[i:i + 1]]
            if self.cfg.show_masks:
                pixels = pixels.float().cpu()
                shown = torch.nn.functional.interpolate(masks[i:i + 1].float().cpu(), size=pixels.shape[-2:], mode="nearest")[0]
                pictures.append((to_pil(overlay(shown, pixels).clamp(0, 1)), "-omg-masks"))
            self.layout_images.append(pictures)


def no_blended_step_message(blend_start: float, calls: int) -> str:
    return (f"OMG: no step would be blended: the blend start {blend_start} of the {calls} model calls this job makes "
            "leaves none (img2img runs denoising strength × steps). Lower the blend start, or raise the steps or the "
            "denoising strength.")


def _as_cond(cond) -> dict:
    if isinstance(cond, dict):
        return {"context": cond["crossattn"], "y": cond["vector"]}
    return {"context": cond}


def class_word_tokens(clip, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the conditioning of ``prompt`` (all chunks, 77 per chunk).

    ``clip``: the host's prompt tokenizer (``tokenize``, ``tokenize_line``), A1111's and Forge's alike.
    """
    if clip is None:
        return []
    word_ids = clip.tokenize([word.strip()])[0]
    chunks, _ = clip.tokenize_line(prompt)
    positions = []
    for c, chunk in enumerate(chunks):
        tokens = list(chunk.tokens)
        for start in range(len(tokens) - len(word_ids) + 1):
            if tokens[start:start + len(word_ids)] == word_ids:
                positions += [c * len(tokens) + start + k for k in range(len(word_ids))]
    return positions
