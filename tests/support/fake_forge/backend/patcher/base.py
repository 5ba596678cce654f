"""``ModelPatcher`` as in Forge's ``backend/patcher/base.py``: what the adapter and the stand-in sampler use."""
import copy

from .lora import LoraLoader


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    to = model_options["transformer_options"].copy()
    patches_replace = to.get("patches_replace", {}).copy()
    replaced = patches_replace.get(name, {}).copy()
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    replaced[key] = patch
    patches_replace[name] = replaced
    to["patches_replace"] = patches_replace
    model_options["transformer_options"] = to
    return model_options


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.model, self.size = model, size
        self.lora_patches, self.object_patches = {}, {}
        self.model_options = {"transformer_options": {}}
        self.load_device, self.offload_device, self.current_device = load_device, offload_device, current_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        keys = {k for k, _ in self.model.named_parameters()}
        this = {}
        for key, patch in patches.items():
            if key in keys:
                this.setdefault(key, []).append([strength_patch, patch, strength_model, None, None])
        self.lora_patches[identifier] = this
        return set(this)

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number, transformer_index)
