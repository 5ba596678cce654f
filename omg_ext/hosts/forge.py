"""The Forge adapter (``lllyasviel/stable-diffusion-webui-forge``, Forge Classic, reForge): the only
code that touches a Forge.

What differs between the Forge family's backends (``backend.*`` or ``ldm_patched.*``:
attention function, memory, LoRA parsing and merging) is behind ``forge_backend``.

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
import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..engine.attention import ProjectedAttention
from ..engine.lora import DenseDelta, LowRankDelta
from ..engine.rows import RowRole
from ..engine.session import OmgSession
from ..engine.memory import MemoryBudget
from .a1111 import CONCEPT_KEY, A1111Generation, OmgUserError, _networks, lora_on_disk, memory_budget, refuse_mostly_unmatched
from .controlnet_units import not_enabled, panel_units, without_model
from .forge_backend import ForgeBackend, forge_backend, plain_low_rank

COND = 0
"""Forge's mark of a cond chunk in ``cond_or_uncond`` (uncond is 1)."""

UNET_PREFIX = "diffusion_model."


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


ROW_CONCEPTS = "omg_row_concepts"
"""Transformer option of an engine call: each row's concept (-1: host or reference row), when a concept has a unit."""


def row_options(options: dict, uncond: torch.Tensor, concept: torch.Tensor | None = None) -> dict:
    """Forge's transformer options for rows whose marks are ``uncond``: ``cond_or_uncond`` one chunk per row
    (so a patch that splits rows by it — IP-Adapter — finds each row's own), with the ``cond_mark`` and
    index lists Forge derives from it; ``concept``: each row's concept, for per-concept image prompts."""
    marks = [int(m) for m in uncond.tolist()]
    row = {**options, "cond_or_uncond": marks, "cond_mark": uncond.to(options["cond_mark"]) if "cond_mark" in options else uncond,
           "cond_indices": [i for i, m in enumerate(marks) if m == 0],
           "uncond_indices": [i for i, m in enumerate(marks) if m == 1]}
    if concept is not None:
        row[ROW_CONCEPTS] = concept
    return row


class AroundPatch:
    """OMG's attention on a block where another extension has its own attn2 replace patch (IP-Adapter).

    Such a patch returns the plain attention plus what it adds (the image prompt's attention);
    OMG's attention takes the place of the plain one: ``omg + (theirs - plain)``. Without an OMG
    call in progress it is their patch alone, exactly.

    ``image_prompts`` (IP-Adapter entry -> concept): entries that act on that concept's rows
    only. IP-Adapter's patch adds one term per unit (``CrossAttentionPatch``: parallel lists,
    one entry per unit); the patch is run with the other entries for every row and with
    each such entry alone for its concept's rows.
    """

    def __init__(self, omg: ProjectedAttention, theirs, image_prompts: dict[int, int] | None = None) -> None:
        self.omg, self.theirs, self.image_prompts = omg, theirs, image_prompts or {}
        self._parts: tuple | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if not self.image_prompts:
            theirs = self.theirs(q, k, v, extra_options)
            if self.omg.state.call is None:
                return theirs
            return self.omg(q, k, v, extra_options) + (theirs - self.omg.attention(q, k, v, extra_options["n_heads"]))
        plain = self.omg.attention(q, k, v, extra_options["n_heads"])
        everyone, alone = self.parts()
        own = plain if self.omg.state.call is None else self.omg(q, k, v, extra_options)
        out = own + (everyone(q, k, v, extra_options) - plain)
        concepts = extra_options.get(ROW_CONCEPTS)
        for concept, patch in alone:
            rows = None if concepts is None else (concepts == concept).view(-1, 1, 1)
            if rows is not None and bool(rows.any()):
                out = out + (patch(q, k, v, extra_options) - plain) * rows.to(out.dtype)
        return out

    def parts(self) -> tuple:
        """(their patch without the per-concept entries, [(concept, their patch with its entry alone)])."""
        if self._parts is None:
            self._parts = (image_prompt_entries(self.theirs, lambda i: i not in self.image_prompts),
                           [(j, image_prompt_entries(self.theirs, lambda i, e=e: i == e)) for e, j in self.image_prompts.items()])
        return self._parts


def image_prompt_entries(patch, keep: Callable[[int], bool]):
    """A copy of IP-Adapter's ``CrossAttentionPatch`` holding only the entries (units) ``keep`` accepts: every
    per-unit list of it (weights, conds, unconds, masks, sigma ranges…) filtered alike."""
    weights = getattr(patch, "weights", None)
    if not isinstance(weights, list):
        raise RuntimeError(f"OMG: this IP-Adapter's attention patch ({type(patch).__name__}) keeps no per-unit lists; "
                           "a unit for one concept is not possible with it")
    clone = copy.copy(patch)
    for name, value in vars(patch).items():
        if isinstance(value, list) and len(value) == len(weights):
            setattr(clone, name, [item for i, item in enumerate(value) if keep(i)])
    return clone


FORGE_BLOCKS = [(name, number, index) for name in ("input", "middle", "output") for number in range(16) for index in range(16)]
"""Every key Forge's ``set_model_replace_all`` covers: (block name, number, transformer index)."""


def with_omg_patches(replace: dict, cross: ProjectedAttention, self_attention: ProjectedAttention | None,
                     image_prompts: dict[int, int] | None = None) -> dict:
    """A ``patches_replace`` table: OMG's attn2 (around another extension's patch of that block, looked up as
    Forge does: by block and index, then by block) and, for self-attention preservation, its attn1.
    ``image_prompts``: IP-Adapter entries given to one concept (``AroundPatch``)."""
    theirs = replace.get("attn2", {})
    attn2 = {}
    for key in FORGE_BLOCKS:
        other = theirs.get(key, theirs.get(key[:2]))
        attn2[key] = cross if other is None else AroundPatch(cross, other, image_prompts)
    table = {**replace, "attn2": attn2}
    if self_attention is not None:
        table["attn1"] = dict.fromkeys(FORGE_BLOCKS, self_attention)
    return table


CONTROL_KEY = "control:{}:{}"
"""How one ControlNet residual travels through the engine as a per-row conditioning entry."""


def split_control(control: dict | None, rows: int) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """Forge's ControlNet residuals — ``{"input"|"middle"|"output": [tensor or None, …]}``, summed over
    all units and computed for the call's host rows — as per-row entries the engine expands like any
    conditioning (a concept row and a reference row get their host row's residuals), plus the
    template that ``join_control`` fills back: a residual's place holds its key; ``None`` and a residual
    that broadcasts over rows stay as they are."""
    if control is None:
        return None, {}
    template, per_row = {}, {}
    for name, residuals in control.items():
        template[name] = []
        for i, residual in enumerate(residuals):
            if isinstance(residual, torch.Tensor) and residual.dim() > 0 and residual.shape[0] == rows:
                key = CONTROL_KEY.format(name, i)
                per_row[key] = residual
                residual = key
            template[name].append(residual)
    return template, per_row


def concept_unit_residuals(units: dict[int, "ConceptUnit"], c: dict, x: torch.Tensor, t: torch.Tensor, chunks: int,
                           per_row: dict) -> dict[int, dict]:
    """Each concept's own ControlNet unit taken out of the residuals Forge summed for the host rows (which keep
    the other units) and computed alone, for that concept's rows: ``per_row`` gets them as entries, and the
    templates to rebuild them per engine call are returned by concept."""
    chain = []
    node = c.get("control_model")
    while node is not None:
        chain.append(node)
        node = node.previous_controlnet
    templates = {}
    for j, concept_unit in units.items():
        unit = concept_unit.find(chain[::-1])
        if unit is None:
            continue  # not active in this sampling (its image failed, or another sampling than the unit's)
        previous, unit.previous_controlnet = unit.previous_controlnet, None
        extra = {"transformer_options": c.get("transformer_options", {})} if takes_options(unit.get_control) else {}
        try:
            alone = unit.get_control(x, t, dict(c), chunks, **extra)
        finally:
            unit.previous_controlnet = previous
        if alone is None:  # outside the unit's guidance start/end
            continue
        template, rows = split_control(alone, x.shape[0])
        for key, residual in rows.items():
            per_row[key] = per_row[key] - residual  # the host rows: the summed residuals without this unit
            per_row[f"{key}+{j}"] = residual
        templates[j] = {name: [f"{item}+{j}" if isinstance(item, str) else item for item in items]
                        for name, items in template.items()}
    return templates


def takes_options(get_control) -> bool:
    """reForge's ``get_control`` takes the call's transformer options too; Forge's and Classic's do not."""
    return "transformer_options" in inspect.signature(get_control).parameters


def add_to_rows(control: dict, extra: dict, rows: torch.Tensor) -> None:
    """``extra``'s residuals added to the ``rows`` (a bool per row) of ``control``."""
    where = rows.view(-1, 1, 1, 1)
    for name, residuals in extra.items():
        for i, residual in enumerate(residuals):
            if isinstance(residual, torch.Tensor):
                control[name][i] = control[name][i] + torch.where(where, residual, torch.zeros_like(residual))


def join_control(template: dict, cond: dict) -> dict:
    """The residuals of one engine call, taken out of ``cond``; fresh lists, because Forge's UNet pops them."""
    return {name: [cond.pop(item) if isinstance(item, str) else item for item in residuals]
            for name, residuals in template.items()}


def attention_modules_by_block(unet: torch.nn.Module) -> dict[tuple[str, int, int], torch.nn.Module]:
    """Forge's key of each transformer block's ``attn2`` — ``extra_options``' (block name, number) and
    ``block_index`` — to the module: fast mode projects the concept prompts with it."""
    names = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    found = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[-1] == "attn2" and parts[0] in names and "transformer_blocks" in parts:
            number = 0 if parts[0] == "middle_block" else int(parts[1])
            found[names[parts[0]], number, int(parts[parts.index("transformer_blocks") + 1])] = module
    return found


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
            keep_self = self.cfg.self_attention_until > 0 and self.cfg.mode != "fast"
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


def controlnet_unit_modules(p, units: dict[int, int]) -> tuple[dict[int, "ConceptUnit"], dict[int, int]]:
    """Concept -> its ControlNet unit, and IP-Adapter entry -> concept, for the concepts' own units (``units``:
    concept -> the unit's number in the ControlNet panel), read from the ControlNet script of the job: its units
    in the panel's order and, per enabled unit, the loaded model it keeps in ``current_params``. An IP-Adapter
    unit's entry is its place among the enabled IP-Adapter units (the order their patches were added in)."""
    if not units:
        return {}, {}
    script, enabled = panel_units(p)
    params = getattr(script, "current_params", {})
    models = {k: getattr(params.get(i), "model", None) for i, k in enumerate(enabled)}
    networks = {k: getattr(getattr(model, "model_patcher", None), "control_model", None) for k, model in models.items()}
    in_chain = [k for k in enabled if networks[k] is not None]  # the units that put a ControlNet in Forge's chain, in order
    image_units = [k for k in enabled if hasattr(models[k], "ip_adapter")]  # IP-Adapter units, in the order they patch
    found, image_prompts = {}, {}
    for j, k in units.items():
        if k not in enabled:
            raise not_enabled(j, k)
        if networks[k] is not None:
            found[j] = ConceptUnit(networks[k], in_chain.index(k))
        elif k in image_units:
            image_prompts[image_units.index(k)] = j
        else:
            raise without_model(j, k)
    return found, image_prompts


@dataclass(frozen=True)
class ConceptUnit:
    """A concept's own ControlNet unit: its network and its place among the chain's units (first added = 0).
    Two units with the same model file share the network (Forge caches loaded models): the place tells them apart."""

    network: torch.nn.Module
    place: int

    def find(self, chain_in_order: list):
        """This unit's ControlNet object in the sampling's chain, or None."""
        if self.place < len(chain_in_order) and chain_in_order[self.place].control_model is self.network:
            return chain_in_order[self.place]
        return next((n for n in chain_in_order if getattr(n, "control_model", None) is self.network), None)


def forge_lora_patches(backend: ForgeBackend, objects, name: str) -> tuple[dict, dict, str]:
    """(UNet patches, text-encoder patches, file name) of one LoRA, parsed by the host's own loader."""
    on_disk = lora_on_disk(name)
    unet_patches, clip_patches = backend.lora_patches(_networks().load_lora_state_dict(on_disk.filename), objects)
    return unet_patches, clip_patches, on_disk.filename


def unet_deltas(patches: dict, diffusion_model: torch.nn.Module, strength: float,
                merge: Callable[[object, torch.Tensor, str], torch.Tensor]) -> dict:
    """Host patches (``diffusion_model.<layer>.weight|bias`` -> patch) as row-routed engine deltas;
    ``merge(patch, base, key)``: ``base`` with the patch merged at the concept's strength, by the host."""
    by_layer: dict[str, dict[str, object]] = {}
    for key, patch in patches.items():
        if not isinstance(key, str) or not key.startswith(UNET_PREFIX):
            raise ValueError(f"unsupported patch target {key!r}")
        layer, _, param = key[len(UNET_PREFIX):].rpartition(".")
        by_layer.setdefault(layer, {})[param] = patch
    modules = dict(diffusion_model.named_modules())
    deltas = {}
    for layer, params in by_layer.items():
        target = modules.get(layer)
        if target is None:
            raise ValueError(f"no layer {layer}")
        low_rank = plain_low_rank(params["weight"]) if set(params) == {"weight"} else None
        if low_rank is not None:
            up, down, alpha, mid = low_rank
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            deltas[layer] = LowRankDelta(up, down, mid, scale=scale).check(target, layer)
        else:
            weight = dense_difference(target.weight, params.get("weight"), merge, f"{layer}.weight",
                                      scale=getattr(target, "scale_weight", None))
            bias = params.get("bias")
            bias = None if bias is None else dense_difference(target.bias, bias, merge, f"{layer}.bias")
            deltas[layer] = DenseDelta(weight, bias).check(target, layer)
    return deltas


def dense_difference(param: torch.Tensor, patch, merge, key: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the host's merge would add to ``param`` in float32: dequantised and, for scaled fp8
    checkpoints, times the layer's ``scale_weight`` first, as Forge's layers do per call."""
    base = dequantized(param)
    if scale is not None:
        base = base * scale.float()
    if patch is None:
        return torch.zeros_like(base)
    return merge(patch, base.clone(), key).float() - base


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a weight however Forge stores it (plain, fp8, GGUF or bitsandbytes 4-bit)."""
    with torch.no_grad():
        if getattr(param, "gguf_cls", None) is not None:
            from backend.operations_gguf import dequantize_tensor

            return dequantize_tensor(param).float()
        if getattr(param, "bnb_quantized", False):
            from backend.operations_bnb import functional_dequantize_4bit

            return functional_dequantize_4bit(param).float()
        return param.detach().float()


@contextlib.contextmanager
def clip_patched(backend: ForgeBackend, objects, patches: dict, label: str, strength: float) -> Iterator[None]:
    """The model encodes with a clone of its CLIP patcher carrying ``patches``; the original put back and reloaded on exit.

    The patches are added under ``label``, never under the LoRA's file path: Forge keys a patcher's LoRA
    patches by that name, and an extension that finds a file's patches by it to change their strength
    finds none of OMG's (Regional Prompter's Latent mode leaves such a hook on the text encoder's first
    layer after its job, and it scaled OMG's concept encodings by its last job's regions: the same OMG
    request then gave another image each time)."""
    if not patches:
        yield
        return
    original = objects.clip
    clone = original.clone()
    backend.add_clip_patches(clone, patches, label, strength)
    objects.clip = clone
    try:
        yield
    finally:
        objects.clip = original
        backend.load_patcher(original.patcher)
