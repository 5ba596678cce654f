"""The Automatic1111 v1.10 adapter: the only code that touches A1111's ``modules.*``.

One ``A1111Generation`` per txt2img job. It replaces ``p.sample`` (and
``p.sample_hr_pass``) on the processing object for the job; inside the replaced
``sample`` it runs pass 1, builds the masks and runs pass 2, with the model patched only
for that call and restored in ``finally`` (errors, Interrupt, Skip):

- an instance ``forward`` on ``p.sd_model.model.diffusion_model`` routes every UNet call
  through the engine's ``OmgSession``;
- the engine's attention processors and LoRA hooks (``OmgSession.installed``);
- an ``on_cfg_denoiser`` callback that tells which rows are cond and uncond.

Concept LoRAs are parsed by the host's own ``networks.load_network`` (every format the
WebUI reads) and never activated the host's way. Their UNet part is row-routed:
low-rank modules become ``LowRankDelta``s, every other type the dense ``calc_updown``
delta. Their text-encoder part is added to the text encoder only while that concept's
prompts are encoded, and the previous values are restored exactly (``merged``).
"""
from __future__ import annotations

import contextlib
import inspect
import importlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy
import torch

from ..config import CHOICES, XYZ_AXES, OmgConfig, compact, to_infotext, top_tags
from ..engine.lora import DenseDelta, LowRankDelta
from ..engine.masks import overlay
from ..engine.memory import MemoryBudget, free_device_bytes
from ..engine.record import first_blended
from ..engine.rows import RowRole
from ..engine.session import Concept, OmgSession
from ..lora_file import BadLoraFile, check_lora_file, lora_layer_count
from ..masks.regions import Regions, parse_regions
from ..masks.sources import MaskInputs, concept_masks
from .concept_cache import CONCEPTS
from .controlnet_units import (RowConcepts, adopt_prompt_marks, concept_controls, controlnet_script, fresh_ip_adapter_caches,
                               ip_adapter_terms, is_ip_adapter, job_params, sd_webui_controlnet_params)
from .errors import OmgUserError
from .mask_models import DOWNLOAD_OPTION, KEEP_OPTION, mask_models, release_mask_models


def _networks():
    """The built-in Lora extension's module (imported by the WebUI at start-up)."""
    return importlib.import_module("networks")


def add_callback(register, callback, name: str) -> None:
    """A host callback, named where the host's ``on_…`` takes a name (A1111 1.8+, Forge, reForge);
    Forge Classic's older script API does not."""
    if "name" in inspect.signature(register).parameters:
        register(callback, name=name)
    else:
        register(callback)


def add_progress_job(steps: int) -> None:
    """OMG's pass 1 as one more job of ``steps`` steps: in the WebUI's progress bar and ETA
    (``state.job_count``; the host moves to the next job after it) and in the console's total bar,
    whose total the host set from the job count before (for hires fix, or from the first step on)."""
    from modules import shared

    shared.state.job_count += 1
    bar = getattr(shared.total_tqdm, "_tqdm", None)
    if bar is not None:
        bar.total += steps
        bar.refresh()


NAN_MESSAGE = ("OMG: the model gave NaN (not-a-number) values before the masks were made, so none can be made. The "
               "checkpoint, a LoRA or half precision overflowed: the same prompt without OMG fails the WebUI's NaN check "
               "or gives a black image. Try lower LoRA weights (the text encoder's first), the setting \"Upcast cross "
               "attention layer to float32\" or --no-half.")
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


def fail_job(p, message: str) -> None:
    """Make the job fail with ``message`` when it starts sampling (UI and API show it)."""
    def sample(*args, **kwargs):
        raise OmgUserError(message)
    p.sample = sample


def add_xyz_axes() -> None:
    """Add the OMG axes to the built-in X/Y/Z plot; each stores its value on ``p.omg_xyz``."""
    from modules import scripts

    found = [x for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py"]
    if not found:
        return
    xyz = found[0].module

    def setter(path):
        def apply(p, x, xs):
            p.__dict__.setdefault("omg_xyz", {})[path] = x
        return apply

    xyz.axis_options.extend(
        xyz.AxisOption(label, kind, setter(path), choices=(lambda c=CHOICES[path]: list(c)) if path in CHOICES else None)
        for label, kind, path in XYZ_AXES
    )


def refresh_loras() -> None:
    """Re-read the LoRA folder (the refresh button beside each concept's LoRA list)."""
    _networks().list_available_networks()


def lora_trigger_words(name: str) -> str:
    """The LoRA's activation text from the WebUI's user metadata, else its most frequent training tags."""
    from modules import extra_networks

    on_disk = _networks().available_networks.get(name)
    if on_disk is None:
        return ""
    activation = extra_networks.get_user_metadata(on_disk.filename).get("activation text", "")
    return activation or top_tags(on_disk.metadata.get("ss_tag_frequency"))


SAVE_OPTION = "omg_save_layout"
MEMORY_OPTION = "omg_pass2_memory_mb"
KEEP_ATTENTION_OPTION = "omg_keep_attention"


def add_settings() -> None:
    """OMG's WebUI settings: saving layout images and mask overlays (off by default), the mask models, pass 2's memory
    and how its layout reference is made."""
    import gradio as gr
    from modules import shared

    section = ("omg", "OMG multi-concept")
    shared.opts.add_option(SAVE_OPTION, shared.OptionInfo(
        False, "Save the OMG layout image and mask overlay beside each image", section=section))
    shared.opts.add_option(DOWNLOAD_OPTION, shared.OptionInfo(
        True, "Download missing Segment Anything / detector models on first use (models/sam, models/omg-detectors)", section=section))
    shared.opts.add_option(KEEP_OPTION, shared.OptionInfo(
        True, "Keep OMG mask models in RAM between jobs (off: free them after each job; never on the GPU while the UNet runs)",
        section=section))
    shared.opts.add_option(MEMORY_OPTION, shared.OptionInfo(
        0, "Most memory one OMG pass-2 UNet call may use, in MB (0: what is free on the GPU; no limit on a CPU)",
        gr.Number, {"precision": 0}, section=section))
    shared.opts.add_option(KEEP_ATTENTION_OPTION, shared.OptionInfo(
        True, "Keep pass 1's cross-attention for pass 2's layout (faster: one UNet row fewer per image; takes up to half "
        "the memory free when pass 1 starts — off: a reference row per image, the same image)", section=section))


def memory_budget(free_bytes=free_device_bytes) -> MemoryBudget:
    """Pass 2's memory: the user's cap from the settings, else the free memory ``free_bytes`` reads."""
    from modules import shared

    megabytes = int(shared.opts.data.get(MEMORY_OPTION, 0) or 0)
    return MemoryBudget(budget_bytes=megabytes << 20 if megabytes > 0 else None, free_bytes=free_bytes)


def save_layout_images(p, generation: "A1111Generation", infotext: str) -> None:
    """Save the layout image and mask overlay when the WebUI's OMG setting asks for it."""
    from modules import images, shared

    if not shared.opts.data.get(SAVE_OPTION, False):
        return
    for i, pictures in enumerate(generation.layout_images):
        for image, suffix in pictures:
            images.save_image(image, p.outpath_samples, "", p.all_seeds[min(i, len(p.all_seeds) - 1)], p.all_prompts[0],
                              shared.opts.samples_format, info=infotext, p=p, suffix=suffix)


def fill_lora_hashes(cfg: OmgConfig) -> None:
    """Each concept's LoRA short hash, as the WebUI computes it, for the infotext."""
    available = _networks().available_networks
    for spec in cfg.concepts:
        on_disk = available.get(spec.lora) if spec.lora else None
        if on_disk is not None:
            on_disk.read_hash()
            spec.lora_hash = on_disk.shorthash or ""


def lora_names() -> list[str]:
    """The WebUI's own LoRA list, for the concept dropdowns."""
    return sorted(_networks().available_networks)


# ---------------------------------------------------------------- LoRA files -> deltas

def lora_on_disk(name: str):
    """The WebUI's entry for a LoRA name (the folder re-read once if it is new), its file checked
    (``lora_file``); a clear error if absent or bad."""
    networks = _networks()
    if name not in networks.available_networks:
        networks.list_available_networks()
    on_disk = networks.available_networks.get(name)
    if on_disk is None:
        raise OmgUserError(f"OMG: LoRA {name!r} is not in the WebUI's LoRA list")
    try:  # before the host's loader can half-apply it or rename it (Forge: ".corrupted")
        check_lora_file(on_disk.filename)
    except BadLoraFile as e:
        raise OmgUserError(f"OMG: LoRA {name!r}: {e}") from e
    return on_disk


def load_concept_lora(name: str, unet_weight: float, te_weight: float, unet_modules: dict, te_modules: dict):
    """Parse one LoRA with the host's code: (UNet deltas by layer name, text-encoder weight deltas).

    ``*_modules`` map ``id(module)`` to (layer name, module). The UNet part becomes
    row-routed deltas; the text-encoder part becomes (parameter, dense delta) pairs, added
    only while the concept's prompts are encoded (``merged``): every row of that encode
    belongs to the concept, and a weight delta also reaches layers a forward hook cannot,
    such as OpenCLIP's ``MultiheadAttention`` in SDXL.
    """
    on_disk = lora_on_disk(name)
    net = _networks().load_network(name, on_disk)
    net.te_multiplier, net.unet_multiplier = te_weight, unet_weight
    unet, te = {}, []
    try:
        for key, module in net.modules.items():
            if id(module.sd_module) in unet_modules:
                layer, target = unet_modules[id(module.sd_module)]
                unet[layer] = module_delta(module, unet_weight).check(target, layer)
            elif id(module.sd_module) in te_modules:
                te += text_encoder_deltas(key, module)
    except (ValueError, RuntimeError) as e:
        raise OmgUserError(f"OMG: LoRA {name!r} does not fit this checkpoint (made for another architecture?): {e}") from e
    if not unet:
        raise OmgUserError(f"OMG: LoRA {name!r} has no layer of this checkpoint's UNet (made for another architecture?)")
    refuse_mostly_unmatched(name, on_disk.filename, len(net.modules))
    return unet, te


def refuse_mostly_unmatched(name: str, filename: str, matched: int) -> None:
    """Refuse a LoRA of which the host's parser found fewer than half the layers in this checkpoint: made
    for another model family, it would act on a few layers that happen to share a name and shape (the
    hosts apply such a file silently or skip it with a console warning)."""
    total = lora_layer_count(filename)
    if total and 2 * matched < total:
        raise OmgUserError(f"OMG: LoRA {name!r} fits only {matched} of its {total} layers to this checkpoint "
                           "(made for another architecture?)")


def text_encoder_deltas(key: str, module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, delta) pairs of one host network module on the text encoder, multipliers applied.

    A ``MultiheadAttention`` gets its q, k or v LoRA as rows of ``in_proj_weight``, as the
    host's own ``network_apply_weights`` does.
    """
    target = module.sd_module
    in_proj = getattr(target, "in_proj_weight", None)
    if in_proj is not None:
        part = ("q_proj", "k_proj", "v_proj").index(key.rsplit("_", 2)[-2] + "_" + key.rsplit("_", 2)[-1])
        chunk = in_proj.chunk(3, 0)[part]
        updown, _ = module.calc_updown(chunk.detach())
        full = torch.zeros_like(in_proj)
        full[part * chunk.shape[0]:(part + 1) * chunk.shape[0]] = updown.reshape(chunk.shape)
        return [(in_proj, full)]
    updown, ex_bias = module.calc_updown(target.weight.detach())
    pairs = [(target.weight, updown.reshape(target.weight.shape))]
    if ex_bias is not None and getattr(target, "bias", None) is not None:
        pairs.append((target.bias, ex_bias.reshape(target.bias.shape)))
    return pairs


@contextlib.contextmanager
def merged(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """The deltas added to their parameters for the scope; the exact previous values restored on exit."""
    saved = [(param, param.detach().clone()) for param, _ in pairs]
    try:
        with torch.no_grad():
            for param, delta in pairs:
                param += delta.to(param)
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def module_delta(module, multiplier: float):
    """A host network module as an engine delta: low-rank when it is plain LoRA, dense otherwise."""
    plain_lora = (
        hasattr(module, "up_model") and hasattr(module, "down_model")
        and getattr(module, "bias", None) is None and getattr(module, "dora_scale", None) is None
        and getattr(module.network, "dyn_dim", None) is None
    )
    if plain_lora:
        mid = module.mid_model.weight if module.mid_model is not None else None
        return LowRankDelta(module.up_model.weight.detach(), module.down_model.weight.detach(), mid,
                            scale=module.calc_scale() * multiplier)
    weight = module.sd_module.weight
    updown, ex_bias = module.calc_updown(weight.detach().float())
    return DenseDelta(updown.to(weight.dtype), None if ex_bias is None else ex_bias.to(weight.dtype))


# ---------------------------------------------------------------- rows of UNet calls

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
    """OMG for one txt2img job ``p``."""

    def __init__(self, p, cfg: OmgConfig) -> None:
        refuse_and(list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")]))
        self.p, self.cfg = p, cfg
        self.unet = self.unet_module()
        self.prepared: Prepared | None = None
        self.layout_images: list = []
        """Per image of the job so far: the pictures shown beside it, as (image, file suffix) pairs."""
        self.to_show: tuple[torch.Tensor, list] | None = None
        """The current batch's masks and layout pictures, shown once the host has decoded its images (``keep_pictures``)."""
        self.warnings: list[str] = []

    def unet_module(self):
        """The UNet ``nn.Module`` of the job's model."""
        return self.p.sd_model.model.diffusion_model

    # -- wiring on p (per job; p is discarded after the job)
    def attach(self) -> None:
        p = self.p
        original_sample, original_hr = p.sample, p.sample_hr_pass

        def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
            return self.sample(original_sample, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)

        def sample_hr_pass(*args, **kwargs):
            if self.session is not None:
                self.session.begin_hires(self.cfg.hires_blend)
            return original_hr(*args, **kwargs)

        p.sample, p.sample_hr_pass = sample, sample_hr_pass
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
                if self.cfg.mode == "fast":
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
                masks = self.skip_missing(results)
                for r in results:
                    self.warnings += r.warnings()
                p.extra_generation_params["OMG mask sources used"] = ", ".join(results[0].sources)
                session.begin_pass2(masks, blend_start=self.cfg.blend_start, self_attention_until=self.cfg.self_attention_until,
                                    share_uncond=self.cfg.concept_guidance == "shared",
                                    background_from_pass1=self.cfg.background == "pass 1")
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
        """Fast mode: one host sampling run; at the blend start's step (see ``blending``) the masks are
        made — from the attention of the steps before it, from the drawn regions, or by SAM / the
        detector on the image the host's last denoised latent (``on_cfg_after_cfg``) decodes to —
        then the concepts act inside them."""
        from modules import script_callbacks, shared

        made, denoised, calls = [], [], [0]

        def keep_denoised(params) -> None:
            denoised[:] = [params.x]
            calls[0] += 1

        def make_masks(s: OmgSession) -> torch.Tensor:
            results = self.concept_masks(s, denoised[0] if self.masks_need_image() else None)
            made.append(self.skip_missing(results))
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

        session.begin_fast(blending, make_masks, context_key=self.context_key, share_uncond=self.cfg.concept_guidance == "shared")
        add_callback(script_callbacks.on_cfg_after_cfg, keep_denoised, "omg fast mode")
        try:
            final = run()
        finally:
            script_callbacks.remove_callbacks_for_function(keep_denoised)
        if not made and not (state.interrupted or state.skipped):
            self.warnings.append(f"OMG fast mode never reached its blend start (step {start_step()} of {state.sampling_steps}; "
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
        self.pictures = [] if layout is None else to_pictures(layout)
        maps, hw = session.attention_maps(), session.record.latent_hw()
        if not bool(torch.isfinite(maps).all()):
            raise OmgUserError(NAN_MESSAGE)
        models = mask_models(cfg)
        try:
            return [concept_masks(cfg.mask_source, MaskInputs(
                maps[i], hw, self.prepared.labels, numpy.array(self.pictures[i].convert("RGB")) if self.pictures else None,
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
                pictures.append((_to_pil(overlay(shown, pixels).clamp(0, 1)), "-omg-masks"))
            self.layout_images.append(pictures)


def _as_cond(cond) -> dict:
    if isinstance(cond, dict):
        return {"context": cond["crossattn"], "y": cond["vector"]}
    return {"context": cond}


def to_pictures(samples) -> list:
    """PIL images of a sampling result: latents, or the decoded images ([3, H, W] in [-1, 1],
    ``DecodedSamples``) that a job with hires fix returns."""
    from modules import sd_samplers_common

    if getattr(samples, "already_decoded", False):
        return [_to_pil(((x.float().cpu() + 1) / 2).clamp(0, 1)) for x in samples]
    return [sd_samplers_common.sample_to_image(samples, i, approximation=0) for i in range(len(samples))]


def _to_pil(chw: torch.Tensor):
    from PIL import Image

    return Image.fromarray((chw.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


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
