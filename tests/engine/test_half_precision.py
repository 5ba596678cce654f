"""OMG in the dtypes users run: fp16 (both WebUIs' default on GPU) and bf16, on the tiny UNet.

The WebUIs keep the sampler in float32 and call the UNet in its dtype; ``run_omg(dtype=)``
does the same, so the engine sees half-precision latents and conditioning. The yardstick
is the plain model's own half-precision error: OMG may not add to it.
"""
import copy

import pytest
import torch

from omg_ext.engine.session import Concept
from minisd.loras import random_concept_deltas
from minisd.runs import SCHEDULE, run_omg
from minisd.sampling import generate
from minisd.unet import TinyUNet, text_context as _ctx, unet_fn

CTX = 64
LATENT = (2, 4, 12, 16)
DTYPES = [torch.bfloat16, torch.float16]
RUN = dict(steps=6, latent_shape=LATENT, blend_start=0.3, self_attention_until=0.5, dilation=8, feather=8)



@pytest.fixture(scope="module")
def unet():
    return TinyUNet(context_dim=CTX, seed=0)


@pytest.fixture(scope="module")
def concepts(unet):
    return [Concept({"context": _ctx(10)}, {"context": _ctx(11)}, random_concept_deltas(unet, seed=1), tokens=[5]),
            Concept({"context": _ctx(20)}, {"context": _ctx(21)}, random_concept_deltas(unet, seed=2, dense_every=4), tokens=[8, 9])]


COND, UNCOND = {"context": _ctx(1, 2)}, {"context": _ctx(2, 2)}


def _masks():
    m = torch.zeros(2, 2, *LATENT[-2:])
    m[:, 0, :, :8], m[:, 1, :, 8:] = 1, 1
    return m


def _plain(unet, dtype=None):
    raw = unet_fn(unet)

    def fn(x, t, c, rows):
        if dtype is None:
            return raw(x, t, c)
        return raw(x.to(dtype), t, {k: v.to(dtype) for k, v in c.items()}).float()
    return generate(fn, SCHEDULE, "euler", COND, UNCOND, seed=0, steps=RUN["steps"], latent_shape=LATENT)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_omg_in_half_precision_is_as_close_to_fp32_as_the_plain_model_is(unet, concepts, dtype):
    half = copy.deepcopy(unet).to(dtype)
    plain_error = _rel(_plain(half, dtype), _plain(unet))  # bf16 ~3.8 %, fp16 ~0.5 %
    full = run_omg(unet, concepts, COND, UNCOND, masks=_masks(), **RUN)
    omg = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=dtype, **RUN)
    assert torch.isfinite(omg.final).all()
    assert _rel(omg.final, full.final) <= 1.25 * plain_error
    maps = omg.session.attention_maps()
    assert maps.dtype == torch.float32  # accumulated in float32 whatever the UNet's dtype
    assert _rel(maps, full.session.attention_maps()) < 0.02  # bf16 ~0.8 %, fp16 ~0.1 %


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pass1_in_half_precision_is_the_hosts_own_image_bitwise(unet, concepts, dtype):
    half = copy.deepcopy(unet).to(dtype)
    r = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=dtype, **{**RUN, "blend_start": 1.0})
    assert torch.equal(r.layout, _plain(half, dtype)) and torch.equal(r.final, r.layout)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_attention_logits_give_finite_maps_and_images(unet, concepts, dtype):
    """fp16 overflows at 65504: probabilities for masks are computed in float32."""
    loud = copy.deepcopy(unet).to(dtype)
    for name, module in loud.named_modules():
        if name.endswith("attn2"):
            module.to_q.weight.mul_(300)
    r = run_omg(loud, concepts, COND, UNCOND, dtype=dtype, **RUN)
    assert torch.isfinite(r.session.attention_maps()).all() and torch.isfinite(r.final).all()
    assert all(bool(m.masks.sum() > 0) for m in r.session.attention_masks())


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maps_stay_float32_under_the_hosts_autocast(unet, concepts, dtype):
    """A1111 runs the UNet inside ``torch.autocast`` (fp16 on CUDA): the engine's float32 matmuls must
    not be cast back to half, where large logits overflow and probabilities lose their precision."""
    full = run_omg(unet, concepts, COND, UNCOND, **RUN)
    loud = copy.deepcopy(unet)
    for name, module in loud.named_modules():
        if name.endswith("attn2"):
            module.to_q.weight.mul_(300)
    with torch.autocast("cpu", dtype=dtype):
        auto = run_omg(unet, concepts, COND, UNCOND, **RUN)
        loud_maps = run_omg(loud, concepts, COND, UNCOND, **RUN).session.attention_maps()
    maps = auto.session.attention_maps()
    assert maps.dtype == torch.float32
    assert _rel(maps, full.session.attention_maps()) < 0.02  # bf16 ~0.3 %, fp16 ~0.1 %
    assert torch.isfinite(loud_maps).all()  # fp16 logits of ~1e5 overflow
