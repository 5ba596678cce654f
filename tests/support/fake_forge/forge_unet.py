"""A test UNet as Forge runs it: ``KModel.apply_model`` and transformer blocks that honour replace patches.

Built around ``tests/support/tiny_unet.TinyUNet`` (module names as ldm's, so LoRA keys
are ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``...). Each
transformer block follows Forge's ``BasicTransformerBlock._forward``: when an attn1/attn2
replace patch is registered for its ``(block_name, number, transformer_index)`` (or else its
``(block_name, number)``) the patch
gets the projected q, k, v and ``extra_options`` (the transformer options plus
``n_heads``, ``dim_head``, ``block``, ``block_index``); otherwise the attention module
runs ``backend.attention.attention_function``. Like Forge's, the block adds to its input in place
(``x += n``): fine for sampling, an error for autograd unless the saved activations are kept apart.
"""
import torch
from torch import nn

from minisd.sampling import DiscreteSchedule
from minisd.unet import TinyUNet
from .attention import attention_function

BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class ForgeTransformerBlock(nn.Module):
    def __init__(self, block: nn.Module, key: tuple, options: dict) -> None:
        super().__init__()
        self.attn1, self.attn2, self.ff = block.attn1, block.attn2, block.ff
        self.norm1, self.norm2, self.norm3 = block.norm1, block.norm2, block.norm3
        self.key, self._options = key, options

    def forward(self, x, context=None):
        to = self._options.get("transformer_options", {})
        replace = to.get("patches_replace", {})
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        heads = self.attn1.heads
        extra.update(n_heads=heads, dim_head=self.attn1.to_q.out_features // heads, block=self.key[:2], block_index=self.key[2])
        n = self.norm1(x)
        x += self._attend(self.attn1, replace.get("attn1", {}), n, n, extra)  # in place, as Forge's block adds
        x += self._attend(self.attn2, replace.get("attn2", {}), self.norm2(x), context, extra)
        x += self.ff(self.norm3(x))
        return x

    def _attend(self, attn, patches, n, context, extra):
        q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(context)
        patch = patches.get(self.key, patches.get(self.key[:2]))
        return attn.to_out(patch(q, k, v, extra) if patch is not None else attention_function(q, k, v, attn.heads))


class ForgeUNet(TinyUNet):
    """Forge's UNet call: ``transformer_options`` (replace patches among them) reach its transformer blocks."""

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
        if transformer_options is None:  # KModel.apply_model has set them
            return super().forward(x, timesteps, context=context, y=y, control=control)
        self.forge_options["transformer_options"] = transformer_options
        try:
            return super().forward(x, timesteps, context=context, y=y, control=control)
        finally:
            self.forge_options.pop("transformer_options", None)


def forge_unet(context_dim: int, seed: int = 0, adm_in_channels=None, **config) -> TinyUNet:
    """A ``TinyUNet`` whose transformer blocks are Forge's."""
    unet = ForgeUNet(context_dim=context_dim, seed=seed, adm_in_channels=adm_in_channels, **config)
    unet.forge_options = {}
    for name, module in list(unet.named_modules()):
        if name.endswith("transformer_blocks"):
            parts = name.split(".")
            number = 0 if parts[0] == "middle_block" else int(parts[1])
            for index in range(len(module)):
                module[index] = ForgeTransformerBlock(module[index], (BLOCK_NAMES[parts[0]], number, index), unet.forge_options)
    return unet


class KModel(nn.Module):
    """Forge's ``KModel``: ``apply_model(x, sigma, c_crossattn=..., y=..., transformer_options=...)`` -> denoised."""

    def __init__(self, diffusion_model: TinyUNet) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.schedule = DiscreteSchedule()

    def apply_model(self, x, t, c_crossattn=None, y=None, transformer_options={}, control=None, **kwargs):  # noqa: B006
        unet = self.diffusion_model
        unet.forge_options["transformer_options"] = transformer_options
        try:
            c_in = 1 / (t ** 2 + 1) ** 0.5
            eps = unet(x * c_in[:, None, None, None], self.schedule.sigma_to_t(t), context=c_crossattn, y=y, control=control)
        finally:
            unet.forge_options.clear()
        return x - eps * t[:, None, None, None]


class ForgeLinear(nn.Module):
    """Forge's ``ForgeOperations.Linear`` with manual cast: not an ``nn.Linear``; the weight stays as
    stored (fp8 here) and is cast to the input's dtype, times ``scale_weight`` if any, on every call."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype, scale: float | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        factor = 1.0 if scale is None else scale
        self.weight = nn.Parameter((linear.weight.detach() / factor).to(storage), requires_grad=False)
        self.scale_weight = None if scale is None else nn.Parameter(torch.tensor(scale), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.parameters_manual_cast = True

    def forward(self, x):
        weight = self.weight.to(x.dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def with_forge_linears(unet: nn.Module, storage: torch.dtype = torch.float8_e4m3fn, scale: float | None = 0.5) -> nn.Module:
    """Every ``nn.Linear`` of ``unet`` replaced by a manual-cast ``ForgeLinear`` storing its weight as ``storage``."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, leaf, ForgeLinear(module, storage, scale))
    return unet
