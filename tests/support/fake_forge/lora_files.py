"""The LoRA functions the adapter imports from Forge (``backend.patcher.lora``): key maps,
``load_lora`` and ``merge_lora_to_weight``, with Forge's signatures and patch tuples.

``load_lora`` reads kohya files (``<key>.lora_up.weight``, ``.lora_down.weight``,
``.alpha``, optional ``.lora_mid.weight``) as ``("lora", (up, down, alpha, mid, None))``
and ``<key>.diff`` as ``("diff", (w,))``, Forge's patch tuples; unmatched keys are returned.
"""
import torch


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - Forge's signature
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 - Forge's signature
    for k in model.state_dict():
        if k.endswith(".weight"):
            key_map["lora_te_" + k[:-len(".weight")].replace(".", "_")] = k
    return key_map


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for name, target in to_load.items():
        up = f"{name}.lora_up.weight"
        if up in lora:
            down, alpha, mid = f"{name}.lora_down.weight", f"{name}.alpha", f"{name}.lora_mid.weight"
            patch_dict[target] = ("lora", (lora[up], lora[down], lora[alpha].item() if alpha in lora else None,
                                           lora.get(mid), None))
            loaded |= {up, down, alpha, mid}
        if f"{name}.diff" in lora:
            patch_dict[target] = ("diff", (lora[f"{name}.diff"],))
            loaded.add(f"{name}.diff")
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight = weight.clone() if weight.dtype == computation_dtype else weight.to(computation_dtype)
    for strength, patch, strength_model, offset, function in patches:
        kind, v = ("lora", patch.weights[:5]) if getattr(patch, "name", None) == "lora" else patch  # reForge's LoRAAdapter
        if kind == "diff":
            weight += strength * v[0].to(weight)
        elif kind == "set":
            weight.copy_(v[0])
        elif kind == "lora":
            up, down, alpha, mid, _ = v
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            if mid is not None:
                raise NotImplementedError("the stand-in merges plain LoRA, diff and set only")
            weight += (strength * scale * (up.flatten(1).float() @ down.flatten(1).float())).reshape(weight.shape).to(weight)
        else:
            raise NotImplementedError(kind)
    return weight
