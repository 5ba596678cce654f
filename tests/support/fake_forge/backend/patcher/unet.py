"""``UnetPatcher`` as in Forge's ``backend/patcher/unet.py``."""
import copy

from .base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_replace_all(self, patch, target="attn1"):
        for block_name in ["input", "middle", "output"]:
            for number in range(16):
                for transformer_index in range(16):
                    self.set_model_patch_replace(patch, target, block_name, number, transformer_index)
