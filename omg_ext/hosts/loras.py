"""Concept LoRAs through the host's own ``networks`` module (the built-in Lora extension, A1111's and the
Forge family's): the LoRA list, trigger words and hashes for the UI and infotext, each file checked before the
host's loader opens it, and parsed modules turned into the engine's row-routed deltas (UNet) or into weight
deltas added only while the concept's prompts are encoded (text encoder)."""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch

from ..config import OmgConfig, top_tags
from ..engine.lora import DenseDelta, LowRankDelta
from ..lora_file import BadLoraFile, check_lora_file, lora_layer_count
from .errors import OmgUserError


def host_networks():
    """The built-in Lora extension's module (imported by the WebUI at start-up)."""
    return importlib.import_module("networks")


def refresh_loras() -> None:
    """Re-read the LoRA folder (the refresh button beside each concept's LoRA list)."""
    host_networks().list_available_networks()


def lora_trigger_words(name: str) -> str:
    """The LoRA's activation text from the WebUI's user metadata, else its most frequent training tags."""
    from modules import extra_networks

    on_disk = host_networks().available_networks.get(name)
    if on_disk is None:
        return ""
    activation = extra_networks.get_user_metadata(on_disk.filename).get("activation text", "")
    return activation or top_tags(on_disk.metadata.get("ss_tag_frequency"))


def fill_lora_hashes(cfg: OmgConfig) -> None:
    """Each concept's LoRA short hash, as the WebUI computes it, for the infotext."""
    available = host_networks().available_networks
    for spec in cfg.concepts:
        on_disk = available.get(spec.lora) if spec.lora else None
        if on_disk is not None:
            on_disk.read_hash()
            spec.lora_hash = on_disk.shorthash or ""


def lora_names() -> list[str]:
    """The WebUI's own LoRA list, for the concept dropdowns."""
    return sorted(host_networks().available_networks)


def lora_on_disk(name: str):
    """The WebUI's entry for a LoRA name (the folder re-read once if it is new), its file checked
    (``lora_file``); a clear error if absent or bad."""
    networks = host_networks()
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
    net = host_networks().load_network(name, on_disk)
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
