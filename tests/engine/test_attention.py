"""The two faces of the engine's attention agree: ``ProjectedAttention`` (a host hands over
projected q, k, v, as Forge's replace patches do) gives exactly what ``OmgAttention`` (the
engine's processor on an ldm attention module) gives, in every action and on a non-square layer."""
import contextlib

import pytest
import torch
from torch import nn

from omg_ext.engine.attention import (
    SELF_REPLACE_FACTOR, AttentionCall, ProjectedAttention, installed_attention, no_autocast, probabilities,
)
from minisd.unet import CrossAttention

HEADS, DIM_HEAD, CTX = 2, 8, 12
LATENT = (12, 8)


def _host_attention(q, k, v, heads):
    """A host's own attention of projected tensors ([rows, n, heads·d] in and out)."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, c)


def _layer(is_cross):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.add_module("attn2" if is_cross else "attn1",
                      CrossAttention(16, CTX if is_cross else None, heads=HEADS, dim_head=DIM_HEAD))
    return holder, next(iter(holder.children()))


def _calls(factor):
    """Each action's AttentionCall, and a fresh maps accumulator where it captures."""
    maps = torch.zeros(2, 2, 6, 4)
    return {
        "none": None,
        "capture": AttentionCall(LATENT, capture_rows=[(0, 0), (2, 1)], capture_tokens=[[[1], [3, 4]], [[5], [2]]], maps=maps),
        "replace": AttentionCall(LATENT, replace=[(0, [1, 3]), (2, [4])], replace_self=True),
    }


@torch.no_grad()
@pytest.mark.parametrize("is_cross,factor", [(True, 2), (True, 4), (False, SELF_REPLACE_FACTOR)])
@pytest.mark.parametrize("action", ["none", "capture", "replace"])
def test_projected_attention_equals_the_module_processor(is_cross, factor, action):
    holder, module = _layer(is_cross)
    n = (LATENT[0] // factor) * (LATENT[1] // factor)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, n, 16, generator=g)
    context = torch.randn(5, 7, CTX, generator=g) if is_cross else None
    source = x if context is None else context
    q, k, v = module.to_q(x), module.to_k(source), module.to_v(source)
    plain = module(x, context=context)
    module_call, projected_call = _calls(factor)[action], _calls(factor)[action]
    with installed_attention(holder) as state:
        with state.during(module_call):
            expected = module(x, context=context)
        patch = ProjectedAttention(state, is_cross, _host_attention)
        with state.during(projected_call):
            got = module.to_out(patch(q, k, v, {"n_heads": HEADS, "dim_head": DIM_HEAD}))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if action == "replace":
        assert not torch.allclose(got[1], plain[1]) and torch.allclose(got[0], plain[0], atol=1e-5)
    else:
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    if action == "capture" and is_cross:
        assert module_call.maps.abs().sum() > 0
        torch.testing.assert_close(projected_call.maps, module_call.maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent, tokens, expected", [
    ((16, 12), 192, (1, (16, 12))),
    ((16, 12), 48, (2, (8, 6))),
    ((16, 12), 12, (4, (4, 3))),
    ((15, 9), 40, (2, (8, 5))),   # ldm's stride-2 convolutions round odd sizes up
    ((15, 9), 12, (4, (4, 3))),
    ((13, 21), 4 * 6, (4, (4, 6))),
    ((2, 64), 32, (2, (1, 32))),  # a wide strip reaches height 1
])
def test_layer_factor_is_the_downsampling_of_the_layer(latent, tokens, expected):
    from omg_ext.engine.attention import layer_factor
    assert layer_factor(tokens, latent) == expected


def test_a_layer_that_matches_no_downsampling_is_named():
    from omg_ext.engine.attention import layer_factor
    with pytest.raises(ValueError, match=r"^attention over 50 positions does not match latent \(16, 12\)$"):
        layer_factor(50, (16, 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_probabilities_are_float32_inside_the_hosts_autocast(dtype):
    """A1111 samples inside ``torch.autocast``: its matmuls in half precision would overflow (fp16)
    or round (bf16) the logits of the masks' probabilities."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 24, 64, generator=g) * 40, torch.randn(2, 77, 64, generator=g) * 40
    exact = probabilities(q, k, 4, 0.25)  # no autocast: float32
    with torch.autocast("cpu", dtype=dtype):
        probs = probabilities(q, k, 4, 0.25)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs, exact, rtol=0, atol=1e-6)


def test_autocast_is_switched_off_only_where_torch_has_it():
    """torch 2.1 (A1111's) raises for ``torch.autocast("mps")`` even disabled; MPS has no autocast to undo."""
    assert isinstance(no_autocast(torch.empty(1, device="meta")), contextlib.nullcontext)
    assert isinstance(no_autocast(torch.empty(1)), torch.autocast)
