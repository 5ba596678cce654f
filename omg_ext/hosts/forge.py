"""The Forge adapter (``lllyasviel/stable-diffusion-webui-forge``, Forge Classic, reForge): the only
code that touches a Forge.

What differs between the Forge family's backends (``backend.*`` or ``ldm_patched.*``:
attention function, memory, LoRA parsing and merging) is behind ``forge_backend``; the
attention patches are in ``forge_attention``, ControlNet residuals in ``forge_controlnet``,
LoRA files in ``forge_lora``.

Forge keeps A1111's processing and script API (``p.sample``, ``modules.rng``, the
``networks`` module of its built-in LoRA extension), so a ``ForgeGeneration`` is an
``A1111Generation`` with the three things Forge does its own way replaced:

- The UNet. Forge rebuilds ``p.sd_model.forge_objects`` before every sampling and then
  calls the scripts' ``process_before_every_sampling``; there ``patch_unet`` puts a
  *clone* of the UNet patcher in place with a ``model_function_wrapper``: every UNet call
  goes through the engine (Forge's ``cond_or_uncond`` says which chunk of rows is cond).
  Each engine call gets its own transformer options: its rows' cond/uncond marks, one
  chunk per row, and attn2 (and, for self-attention preservation, attn1) replace patches,
  which receive projected q, k, v: the engine's ``ProjectedAttention``, around another
  extension's patch of the same block (IP-Adapter) — whichever script ran first. A
  ControlNet's residuals, computed by Forge for the host rows, reach every engine row
  from its host row. The hook runs twice before a hires pass; patching is idempotent. The original patcher is never modified and is put
  back when the job ends. Row-routed LoRA forward hooks go on the UNet's modules (Forge's
  ``ForgeOperations`` layers, whatever their storage: the hook adds to their output) for
  the two passes only.
- LoRA files are parsed by the host's own loader (``load_lora`` with
  ``model_lora_keys_unet`` / ``model_lora_keys_clip``), so every format it reads works.
  Plain LoRA becomes a ``LowRankDelta``; every other type (LoHa, LoKr, DoRA, diff…) the
  dense difference the host's own merge (``merge_lora_to_weight``, ``calculate_weight``) makes.
- A concept's prompts are encoded on a cloned CLIP patcher carrying that concept's
  text-encoder patches; Forge merges them when it loads the clone, and loading the
  original patcher again afterwards restores its weights (Forge's ``LoraLoader`` backup).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..engine.attention import ProjectedAttention
from ..engine.memory import MemoryBudget
from ..engine.rows import RowRole
from ..engine.session import OmgSession
from .a1111 import CONCEPT_KEY, A1111Generation
from .errors import OmgUserError
from .forge_attention import attention_modules_by_block, row_options, with_omg_patches
from .forge_backend import forge_backend
from .forge_controlnet import ConceptUnit, add_to_rows, concept_unit_residuals, controlnet_unit_modules, join_control, split_control
from .forge_lora import clip_patched, forge_lora_patches, unet_deltas
from .loras import refuse_mostly_unmatched
from .webui_settings import memory_budget

COND = 0
"""Forge's mark of a cond chunk in ``cond_or_uncond`` (uncond is 1)."""


def check_model(sd_model) -> None:
    """OMG needs a UNet with cross-attention: SD1.5, SD2 and SDXL checkpoints (Pony, Illustrious…)."""
    if getattr(sd_model, "is_sd1", False) or getattr(sd_model, "is_sd2", False) or getattr(sd_model, "is_sdxl", False):
        return
    kind = type(sd_model).__name__
    if "flux" in kind.lower() or "chroma" in kind.lower():
        raise OmgUserError("OMG does not support Flux checkpoints yet: use an SD1.5 or SDXL checkpoint")
    raise OmgUserError(f"OMG supports SD1.5 and SDXL checkpoints, not {kind}")


def row_roles(cond_or_uncond: list[int], rows: int) -> list[RowRole]:
    """Roles of a call's rows: Forge stacks chunks of one row per image, each cond or uncond.

    The order is Forge's (uncond before cond, reversed from the list it was built from),
    and a memory split sends a subset of chunks: the list says which.
    """
    if not cond_or_uncond or rows % len(cond_or_uncond):
        raise RuntimeError(f"OMG: {rows} rows do not split into chunks {cond_or_uncond}")
    per_chunk = rows // len(cond_or_uncond)
    return [RowRole(kind == COND, image) for kind in cond_or_uncond for image in range(per_chunk)]


class UnetWrapper:
    """Forge's ``model_function_wrapper``: a UNet call of the job, through the engine.

    Forge deep-copies patcher options when a patcher is cloned; this object holds the
    job's state and must stay shared, so copying returns it. Another extension's wrapper
    found on the UNet patcher (``inner``: e.g. the one Regional Prompter leaves there after
    its first job, idle from then on) keeps running inside it: it sees each of OMG's calls
    as a UNet call of those rows.
    """

    def __init__(self, generation: "ForgeGeneration") -> None:
        self.generation = generation
        self.inner = None

    def __deepcopy__(self, memo) -> "UnetWrapper":
        return self

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        x, t, c = args["input"], args["timestep"], args["c"]
        generation = self.generation
        session = generation.session
        if session is None:
            return self.through_inner(apply_model, x, t, c, args["cond_or_uncond"])
        rows = x.shape[0]
        roles = row_roles(args["cond_or_uncond"], rows)
        control, control_rows = split_control(c.get("control"), rows)
        per_row = {k: v for k, v in c.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows}
        shared = {k: v for k, v in c.items() if k not in per_row and k not in ("control", "transformer_options")}
        options = c.get("transformer_options", {})
        per_row.update(control_rows)
        per_row[UNCOND_KEY] = torch.tensor([0.0 if role.is_cond else 1.0 for role in roles])  # on the CPU: read per call, no sync
        unit_rows = {}
        if generation.concept_units or generation.image_prompts:
            per_row[CONCEPT_KEY] = torch.full((rows,), -1.0, device=x.device)
        if generation.concept_units and control is not None:
            unit_rows = concept_unit_residuals(generation.concept_units, c, x, t, len(args["cond_or_uncond"]), per_row)

        def unet_fn(x_, t_, cond):
            cond = dict(cond)
            uncond = cond.pop(UNCOND_KEY)
            concept = cond.pop(CONCEPT_KEY, None)
            if control is not None:
                cond["control"] = join_control(control, cond)
                for j, template in unit_rows.items():
                    add_to_rows(cond["control"], join_control(template, cond), concept == j)
            call = {**shared, **cond, "transformer_options": generation.call_options(options, uncond, concept)}
            return self.through_inner(apply_model, x_, t_, call, [int(m) for m in uncond.tolist()])

        return session(unet_fn, x, t, per_row, roles)

    def through_inner(self, apply_model, x: torch.Tensor, t: torch.Tensor, c: dict, cond_or_uncond: list) -> torch.Tensor:
        """One UNet call, through the other extension's wrapper if there is one. A wrapper that calls the
        UNet with another input than it was given (tiles, resizes: MultiDiffusion…) is refused: OMG's
        rows, masks and attention are laid out for the whole latent."""
        inner = self.inner
        if inner is None:
            return apply_model(x, t, **c)

        def same_input(x_, t_, **c_):
            if x_.shape != x.shape:
                raise conflict_error(inner)
            return apply_model(x_, t_, **c_)

        return inner(same_input, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond})


UNCOND_KEY = "omg:uncond"
"""Each row's mark (0 cond, 1 uncond) travelling with it through the engine: an engine call's rows are
described to Forge's patches (IP-Adapter, ControlNet weighting) as one chunk per row."""


def conflict_error(wrapper) -> OmgUserError:
    """The refusal when another extension's wrapper of Forge's UNet function tiles or resizes its input
    (MultiDiffusion…), or replaces OMG's wrapper."""
    return OmgUserError("OMG cannot run together with another extension that wraps Forge's UNet function and "
                        "changes its input or replaces OMG's wrapper (tiled diffusion, MultiDiffusion…): "
                        f"{getattr(wrapper, '__qualname__', type(wrapper).__name__)}")


class ForgeGeneration(A1111Generation):
    """OMG for one txt2img job ``p`` in Forge."""

    def __init__(self, p, cfg) -> None:
        check_model(p.sd_model)
        super().__init__(p, cfg)
        self.backend = forge_backend()
        self.wrapper = UnetWrapper(self)
        self.patches: tuple[ProjectedAttention, ProjectedAttention] | None = None
        self.patch_tables: dict[tuple, dict] = {}
        self.concept_units: dict[int, ConceptUnit] = {}
        self.image_prompts: dict[int, int] = {}
        """IP-Adapter entry (the unit's place among the enabled IP-Adapter units) -> the concept it acts on alone."""
        self.swapped: list[tuple[object, object, object]] = []
        self.patch_error: Exception | None = None

    context_key = "c_crossattn"

    def unet_module(self):
        return self.p.sd_model.forge_objects.unet.model.diffusion_model

    # -- the UNet: hooks for the two passes, patcher clones per sampling
    @contextlib.contextmanager
    def patched(self, session: OmgSession) -> Iterator[None]:
        """LoRA hooks and attention patches for the scope; the job's original UNet patchers put back on exit."""
        attention_function = self.backend.attention()
        try:
            with session.installed(module_attention=False):
                state = session.attention_state
                modules = attention_modules_by_block(self.unet)
                self.patches = (ProjectedAttention(state, True, attention_function, modules),
                                ProjectedAttention(state, False, attention_function, modules))
                yield
        finally:
            self.patches = None
            self.patch_tables.clear()
            for objects, original, clone in reversed(self.swapped):
                if objects.unet is clone:
                    objects.unet = original
            self.swapped.clear()

    def check_pass1(self, session: OmgSession) -> None:
        if self.patch_error is not None:
            raise self.patch_error
        if session.counters["pass1"].calls == 0:  # a script after ours replaced the wrapper on (a clone of) our clone
            existing = self.p.sd_model.forge_objects.unet.model_options.get("model_function_wrapper")
            if existing is not None and existing is not self.wrapper:
                raise conflict_error(existing)
        super().check_pass1(session)

    def patch_unet(self) -> None:
        """``process_before_every_sampling``: the current UNet patcher replaced by a patched clone.

        Forge only logs exceptions raised there, so an error is kept and raised after pass 1.
        """
        try:
            if self.patches is None:
                return
            objects = self.p.sd_model.forge_objects
            unet = objects.unet
            existing = unet.model_options.get("model_function_wrapper")
            if existing is self.wrapper:
                return
            self.wrapper.inner = existing
            clone = unet.clone()
            clone.set_model_unet_function_wrapper(self.wrapper)
            objects.unet = clone
            self.swapped.append((objects, unet, clone))
        except Exception as e:  # noqa: BLE001 - re-raised by `patched`
            self.patch_error = e

    def find_concept_units(self, units: dict[int, int]) -> None:
        """For each concept that has a ControlNet unit of its own, the unit's network (which the ControlNet
        objects of the sampling share) or its IP-Adapter entry."""
        self.concept_units, self.image_prompts = controlnet_unit_modules(self.p, units)

    def call_options(self, options: dict, uncond: torch.Tensor, concept: torch.Tensor | None = None) -> dict:
        """The transformer options of one engine call: its rows' own marks (and concepts) and OMG's attention
        patches (built once per table of other extensions' patches: they are the same on every call)."""
        replace = options.get("patches_replace", {})
        key = tuple((target, block, id(patch)) for target, patches in replace.items() for block, patch in patches.items())
        if key not in self.patch_tables:
            cross, self_attention = self.patches
            keep_self = self.cfg.self_attention_until > 0 and self.cfg.mode == "two passes"
            self.patch_tables[key] = with_omg_patches(replace, cross, self_attention if keep_self else None, self.image_prompts)
        return {**row_options(options, uncond, concept), "patches_replace": self.patch_tables[key]}

    # -- concepts
    def load_concept(self, spec, negative: str) -> tuple[dict, dict, dict]:
        """(UNet deltas, cond, uncond): Forge's LoRA loader, the prompts encoded on a cloned CLIP patcher."""
        objects = self.p.sd_model.forge_objects
        unet_patches, clip_patches, filename = ({}, {}, "") if not spec.lora else forge_lora_patches(self.backend, objects, spec.lora)
        if spec.lora and not unet_patches:
            raise OmgUserError(f"OMG: LoRA {spec.lora!r} has no layer of this checkpoint's UNet (made for another architecture?)")
        if spec.lora:
            refuse_mostly_unmatched(spec.lora, filename, len(unet_patches) + len(clip_patches))
        try:
            deltas = unet_deltas(unet_patches, self.unet, spec.unet_weight,
                                 lambda patch, base, key: self.backend.merge(objects, patch, base, spec.unet_weight, key))
        except (ValueError, RuntimeError) as e:
            raise OmgUserError(f"OMG: LoRA {spec.lora!r} does not fit this checkpoint (made for another architecture?): {e}") from e
        with clip_patched(self.backend, objects, clip_patches, f"OMG concept: {spec.lora}", spec.te_weight):
            cond, uncond = self.encode(spec.prompt, False), self.encode(negative, True)
        return deltas, as_forge_cond(cond), as_forge_cond(uncond)

    def memory_budget(self) -> MemoryBudget:
        """The host's own reading of free memory (CUDA, XPU, DirectML; the RAM on a CPU), the one its
        model loader plans with."""
        return memory_budget(self.backend.free_memory)

    def text_engine(self):
        """Forge's ``text_processing_engine`` (CLIP-L's for SDXL); Classic and reForge keep A1111's."""
        model = self.p.sd_model
        engine = getattr(model, "text_processing_engine", None) or getattr(model, "text_processing_engine_l", None)
        return engine or super().text_engine()


def as_forge_cond(cond) -> dict:
    """A conditioning as the keyword arguments of Forge's ``apply_model``."""
    if isinstance(cond, dict):
        return {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
    return {"c_crossattn": cond}
