"""Merging LoRAs on the Forge family's loaded model: each LoRA parsed by the host's own loader into Forge's
patches, each patched weight's dense delta the difference the host's merge makes to it (LoRA, LoCon, LoHa,
LoKr… as Forge reads them), on the checkpoint's own patchers (``forge_objects_original``: no LoRA of an
earlier job in them). Recording runs on the model as an extraction sees it (``ForgeExtract``).

The merged file names each layer as both hosts' loaders map it: the UNet's by its ldm path
(``lora_unet_input_blocks_1_1_…``), the text encoder's by the kohya name the host maps to it
(``lora_te_text_model_encoder_layers_0_…``). Bias patches (rare: kohya's LoRA has none) are not merged.
"""
from __future__ import annotations

import torch

from .errors import OmgUserError
from .extract_forge import ForgeExtract, original_objects
from .forge_lora import UNET_PREFIX, dense_difference
from .loras import host_networks, lora_on_disk


class ForgeMerge(ForgeExtract):
    def lora_layers(self, sd_model, name: str) -> tuple[dict, dict]:
        objects = original_objects(sd_model)
        state = host_networks().load_lora_state_dict(lora_on_disk(name).filename)
        unet_patches, clip_patches = self.backend.lora_patches(state, objects)
        names = kohya_names(self.backend.lora_key_map(objects))
        roots = ((unet_patches, objects.unet.model), (clip_patches, objects.clip.cond_stage_model))
        modules, deltas = {}, {}
        for patches, root in roots:
            by_name = dict(root.named_modules())
            for param, patch in patches.items():
                if not isinstance(param, str):
                    raise OmgUserError(f"LoRA {name!r} patches part of a weight ({param[0]}): merging such a LoRA is not supported")
                path, _, kind = param.rpartition(".")
                if kind != "weight":
                    continue
                module = by_name[path]
                if is_quantised(module.weight):
                    raise OmgUserError("merging needs the checkpoint's weights in fp16 or fp32: it is loaded quantised "
                                       "(fp8, GGUF or NF4); choose another 'Diffusion in Low Bits'")
                key = "lora_unet_" + path[len(UNET_PREFIX):].replace(".", "_") if path.startswith(UNET_PREFIX) else names.get(param)
                if key is None:
                    raise OmgUserError(f"LoRA {name!r} patches {param}, a weight this Forge names no LoRA key for: "
                                       "the merged file could not name it (a text encoder of another architecture?)")
                modules[key] = module
                deltas[key] = dense_difference(module.weight, patch, lambda p, base, k: self.backend.merge(objects, p, base, 1.0, k),
                                               param).reshape(module.weight.shape)
        return modules, deltas


def kohya_names(key_map: dict) -> dict[str, str]:
    """Parameter name -> the kohya name a merged file gives it: the host's own ``lora_te_…`` name for it (which
    A1111 maps too), else its shortest ``lora_…`` name."""
    names: dict[str, str] = {}
    for kohya, param in key_map.items():
        if isinstance(kohya, str) and kohya.startswith("lora_") and isinstance(param, str):
            best = names.get(param)
            if best is None or (not kohya.startswith("lora_te_"), len(kohya)) < (not best.startswith("lora_te_"), len(best)):
                names[param] = kohya
    return names


def is_quantised(weight: torch.Tensor) -> bool:
    return (getattr(weight, "gguf_cls", None) is not None or getattr(weight, "bnb_quantized", False)
            or weight.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)))
