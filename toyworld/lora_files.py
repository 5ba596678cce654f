"""Kohya-format LoRA and LoHa files for the toy model: trained, written and read back.

Keys are the ones civitai files carry for SD1.5, built the way kohya builds them from
module names: ``lora_unet_`` + the UNet module name with dots as underscores
(``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q``), ``lora_te_`` + the text
encoder's (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). Per layer:

- LoRA (LoCon on convolutions): ``.lora_down.weight`` [r, in(, kh, kw)], ``.lora_up.weight``
  [out, r(, 1, 1)], ``.alpha``; the delta is ``up·down·alpha/r``.
- LoHa: ``.hada_w1_a`` [out, r], ``.hada_w1_b`` [r, in·kh·kw], ``.hada_w2_a``,
  ``.hada_w2_b``, ``.alpha``; the delta is ``(w1_a·w1_b) ⊙ (w2_a·w2_b)·alpha/r``.

Reading gives the engine's own deltas (``LowRankDelta`` / ``DenseDelta``), so OMG routes
these files exactly as it routes what a WebUI's LoRA parser hands it. Training attaches
the same factors as trainable parameters through forward hooks; the base stays frozen.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from omg_ext.engine.lora import DenseDelta, LowRankDelta, RowRoutedLoRA

from .model import ToyModel

PREFIXES = {"unet": "lora_unet_", "text": "lora_te_"}


def _conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


PRESETS = ("all", "attention")


def target_layers(model: ToyModel, preset: str = "all") -> dict[str, tuple[str, str, nn.Module]]:
    """Kohya key -> (part, module name, module) for every layer a LoRA may train.

    UNet: every Linear and Conv2d of the input, middle and output blocks (attention,
    feed-forward, projections, ResBlocks: LoCon's set), or with ``preset="attention"`` the
    attention projections alone (kohya's plain LoRA on SD1.5, as many civitai character LoRAs
    are trained). Text encoder: the Linear layers of its transformer layers.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    layers = {}
    for part, root in (("unet", model.unet), ("text", model.text)):
        for name, module in root.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if part == "unet" and not name.startswith(("input_blocks", "middle_block", "output_blocks")):
                continue
            if part == "unet" and preset == "attention" and not (".attn1." in name or ".attn2." in name):
                continue
            if part == "text" and ".layers." not in name:
                continue
            layers[PREFIXES[part] + name.replace(".", "_")] = (part, name, module)
    return layers


class TrainableAdapter(nn.Module):
    """LoRA or LoHa factors for every target layer, added by forward hooks while installed."""

    def __init__(self, model: ToyModel, kind: str = "lora", rank: int = 4, alpha: float = 4.0, seed: int = 0,
                 preset: str = "all"):
        super().__init__()
        if kind not in ("lora", "loha"):
            raise ValueError(f"kind must be 'lora' or 'loha', got {kind!r}")
        self.kind, self.rank, self.alpha = kind, rank, alpha
        self.layers = target_layers(model, preset)
        g = torch.Generator().manual_seed(seed)
        self.factors = nn.ParameterDict()
        for key, (_, _, module) in self.layers.items():
            out_ch, in_ch = module.weight.shape[:2]
            fan_in = module.weight[0].numel()
            for name, tensor in self._init(out_ch, in_ch, module.weight.shape[2:], fan_in, g).items():
                self.factors[f"{key}-{name}"] = nn.Parameter(tensor)  # "." is not allowed in parameter names

    def _init(self, out_ch, in_ch, kernel, fan_in, g) -> dict[str, torch.Tensor]:
        r = self.rank
        if self.kind == "lora":  # kohya: down random, up zero
            return {"lora_down": torch.randn(r, in_ch, *kernel, generator=g) / fan_in ** 0.5,
                    "lora_up": torch.zeros(out_ch, r, *(1 for _ in kernel))}
        return {"hada_w1_a": torch.randn(out_ch, r, generator=g) * 0.1, "hada_w1_b": torch.randn(r, fan_in, generator=g),
                "hada_w2_a": torch.zeros(out_ch, r), "hada_w2_b": torch.randn(r, fan_in, generator=g)}

    def _delta(self, key: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        f, scale = self.factors, self.alpha / self.rank
        if self.kind == "loha":
            weight = (f[f"{key}-hada_w1_a"] @ f[f"{key}-hada_w1_b"]) * (f[f"{key}-hada_w2_a"] @ f[f"{key}-hada_w2_b"])
            weight = weight.view_as(module.weight) * scale
            if _conv(module):
                return F.conv2d(x, weight, stride=module.stride, padding=module.padding)
            return F.linear(x, weight)
        down, up = f[f"{key}-lora_down"], f[f"{key}-lora_up"]
        if _conv(module):
            return F.conv2d(F.conv2d(x, down, stride=module.stride, padding=module.padding), up) * scale
        return F.linear(F.linear(x, down), up) * scale

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        try:
            for key, (_, _, module) in self.layers.items():
                handles.append(module.register_forward_hook(
                    lambda m, inputs, out, key=key: out + self._delta(key, m, inputs[0])))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def save(self, path: Path, trigger: str, figure: str) -> None:
        """A kohya file (fp16) with the metadata WebUIs read (trigger words from ``ss_tag_frequency``)."""
        tensors = {f"{key}.alpha": torch.tensor(float(self.alpha)).half() for key in self.layers}
        for name, value in self.factors.items():
            key, factor = name.split("-")
            tensors[f"{key}.{factor}" + (".weight" if self.kind == "lora" else "")] = value.detach().half()
        metadata = {
            "ss_network_module": "networks.lora" if self.kind == "lora" else "lycoris.kohya",
            "ss_network_dim": str(self.rank), "ss_network_alpha": str(self.alpha),
            "ss_network_args": json.dumps({"conv_dim": self.rank, "conv_alpha": self.alpha, "algo": self.kind}),
            "ss_base_model_version": "toyworld", "ss_output_name": path.stem,
            "ss_tag_frequency": json.dumps({f"10_{trigger} {figure}": {trigger: 100, figure: 100}}),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_kohya(path: Path, model: ToyModel, weight: float = 1.0) -> dict[str, dict[str, LowRankDelta | DenseDelta]]:
    """The engine's deltas of a kohya LoRA / LoHa file: ``{"unet": {name: delta}, "text": {...}}``.

    A key this model does not have is an error naming it (a LoRA for another model).
    """
    layers = target_layers(model)
    deltas: dict[str, dict] = {"unet": {}, "text": {}}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted({k.split(".", 1)[0] for k in keys}):
            if key not in layers:
                raise ValueError(f"{Path(path).name}: {key} is not a layer of the toy model")
            part, name, module = layers[key]
            get = lambda s: f.get_tensor(f"{key}.{s}").float()  # noqa: E731
            if f"{key}.lora_up.weight" in keys:
                up, down = get("lora_up.weight"), get("lora_down.weight")
                alpha = float(get("alpha")) if f"{key}.alpha" in keys else down.shape[0]
                delta = LowRankDelta(up, down, scale=weight * alpha / down.shape[0])
            elif f"{key}.hada_w1_a" in keys:
                w1a, w2a = get("hada_w1_a"), get("hada_w2_a")
                alpha = float(get("alpha")) if f"{key}.alpha" in keys else w1a.shape[1]
                dense = (w1a @ get("hada_w1_b")) * (w2a @ get("hada_w2_b")) * alpha / w1a.shape[1]
                delta = DenseDelta(dense.view_as(module.weight), scale=weight)
            else:
                raise ValueError(f"{Path(path).name}: {key} is neither LoRA nor LoHa")
            deltas[part][name] = delta.check(module, name)
    return deltas


def text_router(model: ToyModel, text_deltas: list[dict]) -> RowRoutedLoRA:
    """The text encoder with each concept's text-encoder deltas, routed as the engine routes the UNet's."""
    return RowRoutedLoRA(dict(model.text.named_modules()), text_deltas)
