"""Concept LoRAs through the Forge family's own loader: files parsed into patches, UNet patches turned into the
engine's row-routed deltas (plain LoRA low-rank, anything else the dense difference the host's merge makes, on
weights however Forge stores them), text-encoder patches on a cloned CLIP patcher while a concept is encoded."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..engine.lora import DenseDelta, LowRankDelta
from .forge_backend import ForgeBackend, plain_low_rank
from .loras import host_networks, lora_on_disk


UNET_PREFIX = "diffusion_model."

def forge_lora_patches(backend: ForgeBackend, objects, name: str) -> tuple[dict, dict, str]:
    """(UNet patches, text-encoder patches, file name) of one LoRA, parsed by the host's own loader."""
    on_disk = lora_on_disk(name)
    unet_patches, clip_patches = backend.lora_patches(host_networks().load_lora_state_dict(on_disk.filename), objects)
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
