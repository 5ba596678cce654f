"""A small UNet shaped like ldm's (SD1.5) UNetModel, with random weights, for CPU tests.

Module names follow ldm (``input_blocks.1.1.transformer_blocks.0.attn2.to_q``…), so the
engine meets the same structure it meets in a WebUI: time embedding, ResBlocks, spatial
transformers with ``attn1``/``attn2`` (``to_q/to_k/to_v/to_out``, ``heads``, ``scale``),
down- and upsampling with skips. Unlike ldm nothing is zero-initialised: a random model
whose output convolutions are zero would output zeros and prove nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, c = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # as the hosts' SDP optimisation
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim // heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim // heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1):
        super().__init__()
        self.norm = norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context=context)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest ×2 then a conv; sized to the skip so odd latent sizes work."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.size: tuple[int, int] | None = None

    def forward(self, x):
        return self.conv(F.interpolate(x, size=self.size, mode="nearest") if self.size else F.interpolate(x, scale_factor=2, mode="nearest"))


class TinyUNet(nn.Module):
    def __init__(self, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2, 2, 2),
                 attention_levels=(0, 1, 2), num_heads=4, context_dim=64, adm_in_channels=None, seed=0,
                 transformer_depth=1, num_head_channels=None):
        """``transformer_depth``: blocks per spatial transformer, one number or one per level (SDXL: 0, 2, 10);
        ``num_head_channels``: heads of 64 channels as SDXL instead of ``num_heads``; ``seed=None``: weights
        left as built (a memory benchmark on a meta device)."""
        super().__init__()
        depths = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else list(transformer_depth)

        def transformer(ch, level):
            heads = ch // num_head_channels if num_head_channels else num_heads
            return SpatialTransformer(ch, heads, context_dim, depths[level])

        emb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.model_channels = model_channels
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skips, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch), transformer(ch, len(channel_mult) - 1), ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, level))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        if seed is not None:
            self._randomise(seed)
        self.eval()

    @torch.no_grad()
    def _randomise(self, seed: int) -> None:
        """Every parameter random (scaled by fan-in), norms near 1: activations stay O(1)."""
        g = torch.Generator().manual_seed(seed)
        norm_weights = {id(m.weight) for m in self.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
        for p in self.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif id(p) in norm_weights:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)

    def forward(self, x, timesteps, context=None, y=None, control=None, **kwargs):
        """``control``: ControlNet residuals as Forge's UNet takes them (``apply_control``)."""
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(x.dtype))  # as Forge (and A1111 for its UNet dtype) cast it
        if hasattr(self, "label_emb"):
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = apply_control(block(h, emb, context), control, "input")
            hs.append(h)
        h = apply_control(self.middle_block(h, emb, context), control, "middle")
        for block in self.output_blocks:
            h = torch.cat([h, apply_control(hs.pop(), control, "output")], dim=1)
            for layer in block:
                if isinstance(layer, Upsample):
                    layer.size = tuple(hs[-1].shape[-2:]) if hs else None
            h = block(h, emb, context)
        return self.out(h)


def apply_control(h: torch.Tensor, control: dict | None, name: str) -> torch.Tensor:
    """Forge's ``apply_control``: the next residual of ``name``, popped from the end of its list."""
    if control is not None and control.get(name):
        residual = control[name].pop()
        if residual is not None:
            h = h + residual
    return h


def text_context(seed: int, rows: int = 1, dim: int = 64) -> torch.Tensor:
    """A random CLIP-shaped conditioning [rows, 77, dim], the same for the same seed."""
    return torch.randn(rows, 77, dim, generator=torch.Generator().manual_seed(seed))


def unet_fn(unet: TinyUNet):
    """The host-style raw UNet call ``fn(x, t, cond)`` with cond a dict of per-row tensors."""
    return lambda x, t, cond: unet(x, t, context=cond["context"], y=cond.get("y"))
