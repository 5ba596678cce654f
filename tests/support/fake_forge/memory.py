"""``load_model_gpu(patcher)``: loading a patcher merges its LoRA patches into the shared model,
after putting back the weights an earlier patcher of that model had merged."""
import torch

from .lora_files import merge_lora_to_weight


def load_model_gpu(patcher):
    model = patcher.model
    for name, original in getattr(model, "stand_in_originals", {}).items():
        _assign(model, name, original)
    current = dict(model.named_parameters())
    model.stand_in_originals = {name: current[name] for name in patcher.patches}
    with torch.no_grad():
        for name, entries in patcher.patches.items():
            _assign(model, name, torch.nn.Parameter(merge_lora_to_weight(entries, current[name].data, name), requires_grad=False))


def _assign(model, name, parameter):
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, parameter)


FREE_BYTES = 8 << 30
"""What ``get_free_memory`` answers; a test sets it to stand in for a small card."""


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_BYTES
