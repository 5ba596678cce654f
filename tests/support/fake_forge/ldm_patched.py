"""The ``ldm_patched`` names the adapter imports in Forge Classic and reForge, in reForge's flavour.

reForge keeps ComfyUI's code of 2025: ``load_lora(lora, to_load, log_missing=True)`` returns the
patches only, a plain LoRA as a ``LoRAAdapter`` (``name`` "lora", ``weights`` = (up, down, alpha,
mid, dora_scale, reshape)), and ``calculate_weight(patches, weight, key)`` is a module function.
Attention and memory are the Forge stand-in's (``optimized_attention`` is Forge's
``attention_function``; ``model_management`` is ``memory``).
"""
import types

import torch

from . import attention, lora_files, memory


class LoRAAdapter:
    name = "lora"

    def __init__(self, weights: tuple) -> None:
        self.weights = weights


def as_adapters(patches: dict) -> dict:
    """Forge's ``("lora", values)`` patches as newer ComfyUI's ``LoRAAdapter`` objects (reForge, Forge Neo)."""
    return {k: LoRAAdapter((*v[1][:4], None, None)) if v[0] == "lora" else v for k, v in patches.items()}


def load_lora(lora, to_load, log_missing=True):
    return as_adapters(lora_files.load_lora(lora, to_load)[0])


def neo_load_lora(lora, to_load):
    """Forge Neo's ``load_lora``: the patches as ``LoRAAdapter`` objects, with the keys left over."""
    patches, left = lora_files.load_lora(lora, to_load)
    return as_adapters(patches), left


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    return lora_files.merge_lora_to_weight(patches, weight, key, computation_dtype=intermediate_dtype)


def modules() -> dict[str, types.ModuleType]:
    """``ldm_patched`` and its submodules as ``sys.modules`` entries."""
    root, ldm, ldm_modules, comfy = (types.ModuleType(n) for n in ("ldm_patched", "ldm_patched.ldm", "ldm_patched.ldm.modules",
                                                                    "ldm_patched.modules"))
    attention_module = types.ModuleType("ldm_patched.ldm.modules.attention")
    attention_module.optimized_attention = attention.attention_function
    lora = types.ModuleType("ldm_patched.modules.lora")
    lora.load_lora, lora.calculate_weight = load_lora, calculate_weight
    lora.model_lora_keys_unet, lora.model_lora_keys_clip = lora_files.model_lora_keys_unet, lora_files.model_lora_keys_clip
    root.ldm, root.modules, ldm.modules, ldm_modules.attention = ldm, comfy, ldm_modules, attention_module
    comfy.model_management, comfy.lora = memory, lora
    return {"ldm_patched": root, "ldm_patched.ldm": ldm, "ldm_patched.ldm.modules": ldm_modules,
            "ldm_patched.ldm.modules.attention": attention_module, "ldm_patched.modules": comfy,
            "ldm_patched.modules.model_management": memory, "ldm_patched.modules.lora": lora}
