"""Merging LoRAs on the WebUI's loaded model: the host side of ``omg_ext.merge``, shared by A1111
(``A1111Merge``, below) and the Forge family (``merge_forge``), which each say how to parse a LoRA.

Each LoRA is parsed by the host's own loader (every format it reads: LoRA, LoCon, LoHa, LoKr…) into a dense
delta per layer. A concept's inputs are recorded with its deltas acting through the engine's row-routed forward
hooks (no weight is written), while its trigger prompt is encoded by the host's text encoder and a few DDIM
steps run on the raw UNet — the model as an extraction sees it (``ConceptModel``). The model's weights are
therefore bitwise what they were after a merge, an error or an Interrupt; the hooks go as a set on exit. The
merged file goes to the host's LoRA folder (never over an existing file) and the LoRA list is read again.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..concepts.model import ConceptModel
from ..engine.lora import DenseDelta, RowRoutedLoRA
from ..merge.distil import DistilSettings, Teaching
from ..merge.fit import FitSettings
from ..merge.merge import MergeConcept, MergeError, MergeSettings, merge, to_file
from ..merge.record import recording
from ..merge.sampling import ddim_steps
from .errors import OmgUserError
from .extract_a1111 import A1111Extract
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
    method: str = "distil"
    """distil keeps the most of each character (toy world, docs/merge.md); it trains, so it is the slowest."""
    energy: float = 0.99
    steps: int = 100
    """loraclr's optimisation steps per layer."""
    distil_steps: int = DistilSettings.steps
    """distil's training steps (the whole UNet)."""
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
            request.energy, request.steps, request.distil_steps = float(request.energy), int(request.steps), int(request.distil_steps)
            request.size, request.record_steps = int(request.size), int(request.record_steps)
        except (TypeError, ValueError) as e:
            raise OmgUserError(f"bad merge request: {e}") from e
        return request

    def settings(self) -> MergeSettings:
        return MergeSettings(method=self.method, energy=self.energy, fit=FitSettings(steps=self.steps),
                             distil=DistilSettings(steps=self.distil_steps, rows=1))  # one row at a time: extraction's 4.9 GB


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


class MergeHost(Protocol):
    def loaded_model(self): ...
    def concept_model(self, sd_model, size: tuple[int, int]) -> ConceptModel: ...
    def lora_layers(self, sd_model, name: str) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
        """(kohya key -> layer, kohya key -> dense weight delta) of one LoRA, parsed by the host; the key is one
        both hosts' loaders map to that layer."""


class A1111Merge(A1111Extract):
    """A1111's LoRAs through its ``networks.load_network``: each parsed module's ``calc_updown`` is the delta."""

    def lora_layers(self, sd_model, name: str) -> tuple[dict, dict]:
        unet, text_encoder = sd_model.model.diffusion_model, sd_model.cond_stage_model
        unet_ids = {id(m) for m in unet.modules()}
        te_ids = {id(m) for m in text_encoder.modules()}
        net = host_networks().load_network(name, lora_on_disk(name))
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
        return modules, deltas


def merge_host() -> MergeHost:
    """This WebUI's side of a merge."""
    from . import running_forge

    if running_forge():
        from .merge_forge import ForgeMerge

        return ForgeMerge()
    return A1111Merge()


def run_merge(host: MergeHost, request: MergeRequest, progress=lambda text, done: None, check=lambda: None) -> dict:
    """Merge ``request.loras`` on the loaded model into the LoRA folder; returns what was written.
    ``check`` raises to stop (the WebUI's Interrupt) before each recorded step and fitted layer."""
    started = time.perf_counter()
    sd_model = host.loaded_model()
    if getattr(sd_model, "is_sdxl", False):
        raise OmgUserError("merging SDXL LoRAs is not supported yet: load an SD1.5 checkpoint")
    path = output_path(request.output)
    model = host.concept_model(sd_model, (request.size, request.size))
    layers, concepts, by_module = {}, [], {}
    for j, name in enumerate(request.loras):
        modules, deltas = host.lora_layers(sd_model, name)
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
    own = [RowRoutedLoRA(layers, [{k: DenseDelta(d, scale=c.weight) for k, d in c.deltas.items()}]) for c in concepts]
    pictures, contexts = [], []

    def record(j: int, keys: list[str]):
        with recording({k: layers[k] for k in keys}, settings.rows, seed=j) as samples, own[j].installed(), own[j].route_all(0), torch.no_grad():
            cond, uncond = model.encode([concepts[j].trigger], {}), model.encode([""], {})
            pictures.append(ddim_steps(model.predict, model.alphas_cumprod, cond, uncond, latent, request.record_steps, 7.0,
                                       torch.Generator().manual_seed(j), check))
            contexts.append(cond)
        return samples

    def teach(text: dict[str, torch.Tensor]) -> Teaching:
        """distil's view of the host: each concept's recorded picture and prompt, encoded with its own LoRA (the
        teacher, which also runs its UNet part) and with the merged text layers ``text`` (the student)."""
        merged_text = RowRoutedLoRA(layers, [{k: DenseDelta(d) for k, d in text.items()}])
        with merged_text.installed(), merged_text.route_all(0), torch.no_grad():
            merged = [model.encode([c.trigger], {}) for c in concepts]

        def teacher(j: int, index: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with own[j].installed(), own[j].route_all(0):
                return model.predict(x_t, t, contexts[j].expand(len(index), *contexts[j].shape[1:]))

        def student(j: int, index: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.predict(x_t, t, merged[j].expand(len(index), *merged[j].shape[1:]))

        return Teaching(pictures, teacher, student, model.alphas_cumprod)

    def report(text: str, done: float) -> None:
        check()
        progress(text, done)

    try:
        merged = merge(layers, concepts, record, settings, report, teach)
        errors = to_file(path, merged, layers, concepts, settings)
    except MergeError as e:
        raise OmgUserError(str(e)) from e
    host_networks().list_available_networks()
    return {"lora": path.stem, "file": str(path), "layers": len(errors), "method": request.method,
            "largest relative error": round(max(errors.values(), default=0.0), 4),
            "triggers": [c.trigger for c in concepts], "seconds": round(time.perf_counter() - started, 1)}
