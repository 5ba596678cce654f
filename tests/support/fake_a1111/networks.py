"""A stand-in of A1111's built-in Lora extension (``extensions-builtin/Lora/networks.py``) that really parses
kohya LoRA / LoCon files: ``available_networks`` from ``shared.cmd_opts.lora_dir``, ``load_network(name, on_disk)``
giving a network whose ``modules`` are keyed by A1111's layer name (``diffusion_model_…``, ``transformer_…``),
each with ``sd_module``, ``network_key`` (the file's own key) and ``calc_updown(weight)`` → (ΔW, None) times
the network's multiplier, as ``network_lora.NetworkModuleLora`` does."""
import types
from pathlib import Path

from safetensors.torch import load_file

available_networks: dict = {}


def list_available_networks() -> None:
    from modules import shared

    available_networks.clear()
    for path in sorted(Path(shared.cmd_opts.lora_dir).glob("*.safetensors")):
        available_networks[path.stem] = types.SimpleNamespace(filename=str(path), name=path.stem, shorthash="0123456789ab",
                                                             read_hash=lambda: None, metadata={})


def layer_mapping(sd_model) -> dict:
    """A1111's ``network_layer_mapping``: every module of the UNet and the text encoder by its name, dots as '_'."""
    mapping = {}
    for prefix, root in (("diffusion_model", sd_model.model.diffusion_model), ("transformer", sd_model.cond_stage_model)):
        for name, module in root.named_modules():
            mapping[f"{prefix}_{name.replace('.', '_')}"] = module
    return mapping


class _Module:
    def __init__(self, net, key, sd_module, weights):
        self.network, self.network_key, self.sd_module, self.w = net, key, sd_module, weights

    def calc_updown(self, orig_weight):
        up, down = self.w["lora_up.weight"].float(), self.w["lora_down.weight"].float()
        alpha = float(self.w["alpha"]) if "alpha" in self.w else down.shape[0]
        updown = (up.flatten(1) @ down.flatten(1)).reshape(orig_weight.shape) * alpha / down.shape[0]
        multiplier = self.network.te_multiplier if self.network_key.startswith("lora_te") else self.network.unet_multiplier
        return updown * multiplier, None


def load_network(name, network_on_disk):
    from modules import shared

    mapping = layer_mapping(shared.sd_model)
    net = types.SimpleNamespace(name=name, modules={}, te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None)
    grouped: dict = {}
    for key, tensor in load_file(network_on_disk.filename).items():
        base, part = key.split(".", 1)
        grouped.setdefault(base, {})[part] = tensor
    for base, weights in grouped.items():
        sd_key = base.replace("lora_unet_", "diffusion_model_", 1).replace("lora_te_", "transformer_", 1)
        if sd_key in mapping:
            net.modules[sd_key] = _Module(net, f"{base}.lora_up.weight", mapping[sd_key], weights)
    return net


