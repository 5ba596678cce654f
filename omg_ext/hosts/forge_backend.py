"""The two backends of the Forge family, behind one small interface the Forge adapter calls.

Every Forge keeps the same UNet patcher API (``forge_objects``, ``clone()``,
``set_model_unet_function_wrapper``, replace patches in ``transformer_options``,
``cond_or_uncond``), so one adapter serves them all. What lives elsewhere is the backend:

- ``backend.*``: lllyasviel's Forge since its rewrite of August 2024 (and Forge Neo, built
  on it): ``backend.attention``, ``backend.memory_management``, ``backend.patcher.lora``
  (Neo's ``load_lora`` is newer ComfyUI's: plain LoRA as a ``LoRAAdapter``, the keys left
  over returned with the patches).
- ``ldm_patched.*``: Forge Classic and reForge (and Forge before the rewrite), ComfyUI's
  code of 2024 kept in the WebUI: ``ldm_patched.ldm.modules.attention``,
  ``ldm_patched.modules.model_management``, ``ldm_patched.modules.lora``. Within it reForge
  follows newer ComfyUI: ``load_lora`` returns only the patches, plain LoRA comes as a
  ``LoRAAdapter`` object and ``calculate_weight`` is a function; Classic returns the unused
  keys too, keeps ``("lora", (up, down, alpha, mid))`` tuples and merges with the patcher's
  ``calculate_weight`` method.

The host is recognised by what it has (``backend`` or ``ldm_patched`` importable), never by
its folder name.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Callable

import torch


class ForgeBackend:
    """lllyasviel's Forge (``backend.*``)."""

    name = "Forge"

    def attention(self) -> Callable[..., torch.Tensor]:
        from backend.attention import attention_function  # the one Forge's CrossAttention calls

        return attention_function

    def memory_module(self):
        """The host's memory manager: ``get_free_memory``, ``load_model_gpu``."""
        from backend import memory_management

        return memory_management

    def free_memory(self, device) -> int:
        return int(self.memory_module().get_free_memory(device))

    def load_patcher(self, patcher) -> None:
        self.memory_module().load_model_gpu(patcher)

    def lora_module(self):
        """The host's LoRA module: ``load_lora``, ``model_lora_keys_unet``, ``model_lora_keys_clip``."""
        from backend.patcher import lora

        return lora

    def lora_patches(self, state_dict: dict, objects) -> tuple[dict, dict]:
        """(UNet patches, text-encoder patches) of a LoRA state dict, parsed by the host's own loader: both
        key maps in one ``load_lora`` call (reForge's ``load_lora`` returns only the patches, Forge's,
        Neo's and Classic's also the keys left over); the UNet's patches are the ones aimed at
        ``diffusion_model.*``."""
        patches = self.lora_module().load_lora(state_dict, self.lora_key_map(objects))
        if isinstance(patches, tuple):
            patches = patches[0]
        unet = {k: v for k, v in patches.items() if (k if isinstance(k, str) else k[0]).startswith("diffusion_model.")}
        return unet, {k: v for k, v in patches.items() if k not in unet}

    def lora_key_map(self, objects) -> dict:
        """The host's map of a LoRA file's layer names (kohya's, diffusers'…) to the model's parameter names."""
        lora = self.lora_module()
        return lora.model_lora_keys_clip(objects.clip.cond_stage_model, lora.model_lora_keys_unet(objects.unet.model, {}))

    def merge(self, objects, patch, base: torch.Tensor, strength: float, key: str) -> torch.Tensor:
        """``base`` (float32) with ``patch`` merged at ``strength``, as Forge merges it."""
        return self.lora_module().merge_lora_to_weight([[strength, patch, 1.0, None, None]], base, key, computation_dtype=torch.float32)

    def add_clip_patches(self, clip, patches: dict, label: str, strength: float) -> None:
        clip.add_patches(filename=label, patches=patches, strength_patch=strength)


class LdmPatchedBackend(ForgeBackend):
    """Forge Classic and reForge (``ldm_patched.*``)."""

    name = "Forge Classic / reForge"

    def attention(self) -> Callable[..., torch.Tensor]:
        from ldm_patched.ldm.modules import attention  # chosen at start-up (xformers, sdpa, sage…)

        return attention.optimized_attention

    def memory_module(self):
        from ldm_patched.modules import model_management

        return model_management

    def lora_module(self):
        from ldm_patched.modules import lora

        return lora

    def merge(self, objects, patch, base: torch.Tensor, strength: float, key: str) -> torch.Tensor:
        lora = self.lora_module()
        if hasattr(lora, "calculate_weight"):  # reForge
            return lora.calculate_weight([(strength, patch, 1.0, None, None)], base, key)
        return objects.unet.calculate_weight([(strength, patch, 1.0)], base, key)  # Classic: the patcher's method

    def add_clip_patches(self, clip, patches: dict, label: str, strength: float) -> None:
        clip.add_patches(patches, strength)


def forge_backend() -> ForgeBackend:
    """The running Forge's backend, by what it has."""
    if "ldm_patched" in sys.modules or importlib.util.find_spec("ldm_patched") is not None:
        return LdmPatchedBackend()
    return ForgeBackend()


def plain_low_rank(patch) -> tuple | None:
    """``(up, down, alpha, mid)`` of a plain LoRA patch in any backend's form — Forge's
    ``("lora", (up, down, alpha, mid, dora_scale))``, Classic's ``("lora", (up, down, alpha, mid))``,
    reForge's ``LoRAAdapter`` (``weights`` with ``dora_scale`` and ``reshape`` after them) — or
    None for anything else (LoHa, LoKr, DoRA, diff…), which is merged densely."""
    if isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[1], tuple):
        kind, values = patch
    elif getattr(patch, "name", None) == "lora" and isinstance(getattr(patch, "weights", None), tuple):
        kind, values = "lora", patch.weights
    else:
        return None
    if kind != "lora" or any(extra is not None for extra in values[4:]):
        return None
    return values[:4]
