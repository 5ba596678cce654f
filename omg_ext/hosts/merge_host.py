"""Merging LoRAs on the WebUI's loaded model (A1111 v1.10): the host side of ``omg_ext.merge``.

Each LoRA is parsed by the host's own ``networks.load_network`` (every format it reads: LoRA, LoCon, LoHa,
LoKr…) into per-layer modules whose ``calc_updown`` gives the dense delta. A concept's inputs are recorded
with its deltas acting through the engine's row-routed forward hooks (no weight is written), while its
trigger prompts are encoded by the host and a few DDIM steps run on the raw UNet. The model's weights are
therefore bitwise what they were after a merge, an error or an Interrupt; the hooks go as a set on exit. The
merged file goes to the host's LoRA folder (never over an existing file) and the LoRA list is read again.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.lora import DenseDelta, RowRoutedLoRA
from ..merge.fit import FitSettings
from ..merge.merge import MergeConcept, MergeError, MergeSettings, merge, to_file
from ..merge.record import recording
from ..merge.sampling import ddim_steps
from .errors import OmgUserError
from .loras import host_networks, lora_on_disk, lora_trigger_words

NAME = re.compile(r"^[\w][\w .+-]{0,120}$")


@dataclass
class MergeRequest:
    """What a user asks for, from the tab or ``POST /omg/concepts/merge``."""

    loras: list[str]
    output: str
    triggers: list[str] = field(default_factory=list)
    """Per LoRA its trigger prompt; empty: the LoRA's own trigger words (its metadata)."""
    weights: list[float] = field(default_factory=list)
    method: str = "loraclr"
    energy: float = 0.99
    steps: int = 100
    size: int = 512
    """Side of the pictures sampled while recording, in pixels."""
    record_steps: int = 8

    @classmethod
    def from_json(cls, body: dict) -> "MergeRequest":
        if not isinstance(body, dict):
            raise OmgUserError("the merge request must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(body) - known)
        if unknown:
            raise OmgUserError(f"unknown merge setting {unknown[0]!r}; valid settings: {', '.join(sorted(known))}")
        try:
            request = cls(**body)
            request.loras, request.triggers = [str(x) for x in request.loras], [str(x) for x in request.triggers]
            request.weights = [float(x) for x in request.weights]
            request.energy, request.steps = float(request.energy), int(request.steps)
            request.size, request.record_steps = int(request.size), int(request.record_steps)
        except (TypeError, ValueError) as e:
            raise OmgUserError(f"bad merge request: {e}") from e
        return request

    def settings(self) -> MergeSettings:
        return MergeSettings(method=self.method, energy=self.energy, fit=FitSettings(steps=self.steps))


def output_path(name: str) -> Path:
    """The new file in the host's LoRA folder; a name in use or one with path characters is refused."""
    from modules import shared

    stem = name.strip().removesuffix(".safetensors")
    if not NAME.match(stem):
        raise OmgUserError(f"the merged LoRA's name {name!r} must be letters, digits, spaces, '.', '+', '-' or '_'")
    path = Path(shared.cmd_opts.lora_dir) / f"{stem}.safetensors"
    if path.exists() or stem in host_networks().available_networks:
        raise OmgUserError(f"a LoRA named {stem!r} already exists ({path}): choose another name")
    return path


def concept_layers(name: str, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> tuple[dict, dict]:
    """(kohya key -> module, kohya key -> dense delta) of one LoRA, parsed by the host; the key is the one the
    file itself uses for that layer, which this host loads."""
    unet_ids = {id(m) for m in unet.modules()}
    te_ids = {id(m) for m in text_encoder.modules()}
    on_disk = lora_on_disk(name)
    net = host_networks().load_network(name, on_disk)
    net.te_multiplier = net.unet_multiplier = 1.0
    modules, deltas = {}, {}
    for module in net.modules.values():
        target = module.sd_module
        if id(target) not in unet_ids and id(target) not in te_ids:
            continue
        if getattr(target, "in_proj_weight", None) is not None:
            raise OmgUserError(f"LoRA {name!r}: merging SDXL's OpenCLIP text encoder is not supported yet")
        key = module.network_key.split(".", 1)[0]
        updown, _ = module.calc_updown(target.weight.detach().float())
        modules[key], deltas[key] = target, updown.reshape(target.weight.shape).float()
    if not deltas:
        raise OmgUserError(f"LoRA {name!r} has no layer of this checkpoint (made for another architecture?)")
    return modules, deltas


def run_merge(request: MergeRequest, progress=lambda text, done: None, check=lambda: None) -> dict:
    """Merge ``request.loras`` on the loaded model into the LoRA folder; returns what was written.
    ``check`` raises to stop (the WebUI's Interrupt) before each recorded step and fitted layer."""
    from modules import devices, shared

    started = time.perf_counter()
    sd_model = shared.sd_model
    if getattr(sd_model, "is_sdxl", False):
        raise OmgUserError("merging SDXL LoRAs is not supported yet: load an SD1.5 checkpoint")
    path = output_path(request.output)
    unet, text_encoder = sd_model.model.diffusion_model, sd_model.cond_stage_model
    layers, concepts, by_module = {}, [], {}
    for j, name in enumerate(request.loras):
        modules, deltas = concept_layers(name, unet, text_encoder)
        canonical = {}
        for key, module in modules.items():  # two files may name one layer differently: the first name stays
            canonical[key] = by_module.setdefault(id(module), key)
            layers.setdefault(canonical[key], module)
        trigger = request.triggers[j] if j < len(request.triggers) and request.triggers[j].strip() else lora_trigger_words(name)
        weight = request.weights[j] if j < len(request.weights) else 1.0
        concepts.append(MergeConcept(name, trigger, {canonical[k]: d for k, d in deltas.items()}, weight,
                                     lora_on_disk(name).filename))
    settings = request.settings()
    latent = (1, 4, request.size // 8, request.size // 8)

    def record(j: int):
        concept = concepts[j]
        router = RowRoutedLoRA(layers, [{k: DenseDelta(d, scale=concept.weight) for k, d in concept.deltas.items()}])
        with recording(layers, settings.rows, seed=j) as samples, router.installed(), \
                router.route([(0, 0, None)], batch=None), torch.no_grad(), devices.autocast():
            cond = sd_model.get_learned_conditioning([concept.trigger])
            uncond = sd_model.get_learned_conditioning([""])
            ddim_steps(lambda x, t, c: unet(x, t, context=c), sd_model.alphas_cumprod, cond, uncond, latent,
                       request.record_steps, 7.0, torch.Generator().manual_seed(j), check)
        return samples

    def report(text: str, done: float) -> None:
        check()
        progress(text, done)

    try:
        merged = merge(layers, concepts, record, settings, report)
        errors = to_file(path, merged, layers, concepts, settings)
    except MergeError as e:
        raise OmgUserError(str(e)) from e
    host_networks().list_available_networks()
    return {"lora": path.stem, "file": str(path), "layers": len(errors), "method": request.method,
            "largest relative error": round(max(errors.values(), default=0.0), 4),
            "triggers": [c.trigger for c in concepts], "seconds": round(time.perf_counter() - started, 1)}
