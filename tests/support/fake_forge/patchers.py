"""Stand-ins for Forge's model patchers, reduced to what the adapter and the stand-in job call.

The behaviour the adapter depends on: ``clone()`` shares the model but owns a deep copy of
``model_options``, so whatever is set on a clone never reaches the original; replace patches
are looked up in ``transformer_options["patches_replace"][target][(block, number, index)]``, then
``[(block, number)]``;
LoRA patches added to a patcher change the weights only when the patcher is loaded
(``memory.load_model_gpu``).
"""
import copy


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.patches: dict[str, list] = {}
        """Parameter name -> ``[strength, patch, strength_model, offset, function]`` entries."""
        self.lora_patches: dict[tuple, dict[str, list]] = {}
        """Forge's view of the same entries: ``(filename, strength_patch, strength_model, online_mode)`` ->
        parameter name -> entries (the same lists, so a strength changed here is merged)."""

    def clone(self):
        twin = copy.copy(self)
        twin.model_options = copy.deepcopy(self.model_options)
        twin.patches = {name: list(entries) for name, entries in self.patches.items()}
        twin.lora_patches = dict(self.lora_patches)
        return twin

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        """Forge's keyword-only signature (Classic and reForge: ``LdmCLIP``)."""
        parameters = dict(self.model.named_parameters())
        taken = {name for name in patches if name in parameters}
        entries = {name: [[strength_patch, patches[name], strength_model, None, None]] for name in taken}
        for name, entry in entries.items():
            self.patches.setdefault(name, []).extend(entry)
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = entries
        return taken

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function


class UnetPatcher(ModelPatcher):
    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        """``patch`` for one block (or, without an index, each of its transformer blocks); the option dicts are
        replaced, never edited in place (Forge's ``set_model_patch_replace``)."""
        options = self.model_options["transformer_options"]
        replace = {target: dict(table) for target, table in options.get("patches_replace", {}).items()}
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        replace.setdefault(name, {})[key] = patch
        self.model_options["transformer_options"] = {**options, "patches_replace": replace}


class CLIP:
    """Forge's ``CLIP``: the text encoder (``cond_stage_model``) and a patcher over it."""

    def __init__(self, cond_stage_model):
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        twin = copy.copy(self)
        twin.patcher = self.patcher.clone()
        return twin

    def add_patches(self, **kwargs):
        return self.patcher.add_patches(**kwargs)


class LdmCLIP(CLIP):
    """Forge Classic's and reForge's ``CLIP``: ComfyUI's positional ``add_patches(patches, strength_patch)``."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(filename=None, patches=patches, strength_patch=strength_patch, strength_model=strength_model)
