"""Fast mode (one pass, masked LoRAs and prompts in the host's rows): its exact invariants."""
import pytest
import torch
import torch.nn.functional as F

from omg_ext.engine.attention import AttentionCall, AttentionState, ProjectedAttention, fast_cross_attention, layer_factor
from omg_ext.engine.fast import FastCall, LayerMasks
from omg_ext.engine.lora import RowRoutedLoRA, StackedLowRank
from omg_ext.engine.rows import roles_cond_then_uncond
from minisd.loras import merged
from minisd.runs import SCHEDULE, concept_on_cond_rows, run_fast
from minisd.sampling import generate
from minisd.unet import text_context, unet_fn

HW = (12, 20)
"""A non-square latent: a transposed mask or token layout would show."""


def _plain(fn, cond, uncond, images=1, steps=6):
    return generate(fn, SCHEDULE, "euler", cond, uncond, seed=0, steps=steps, latent_shape=(images, 4, *HW), cfg_scale=7.0)


def _masks(values):
    """[1, 2, H, W]: concept 1 on the left columns, concept 2 on the right ones, at the given strengths."""
    m = torch.zeros(1, 2, *HW)
    m[:, 0, :, :8] = values[0]
    m[:, 1, :, 12:] = values[1]
    return m


@torch.no_grad()
def test_blend_start_one_is_the_plain_image(unet, concepts):
    cond, uncond = {"context": text_context(1)}, {"context": text_context(2)}
    plain = _plain(lambda x, t, c, rows: unet_fn(unet)(x, t, c), cond, uncond)
    r = run_fast(unet, concepts, cond, uncond, steps=6, latent_shape=(1, 4, *HW), blend_start=1.0, masks=_masks((1, 1)))
    assert torch.equal(r.final, plain)


@torch.no_grad()
def test_zero_masks_give_the_plain_image(unet, concepts):
    cond, uncond = {"context": text_context(1)}, {"context": text_context(2)}
    plain = _plain(lambda x, t, c, rows: unet_fn(unet)(x, t, c), cond, uncond)
    r = run_fast(unet, concepts, cond, uncond, steps=6, latent_shape=(1, 4, *HW), blend_start=0.0, masks=_masks((0, 0)))
    torch.testing.assert_close(r.final, plain, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("which", [0, 1])
def test_one_concept_over_the_whole_image_is_its_lora_merged_with_its_prompts(unet, concepts, which):
    c = concepts[which]
    masks = torch.zeros(1, 2, *HW)
    masks[:, which] = 1
    alone = _plain(lambda x, t, cond, rows: unet_fn(merged(unet, c.deltas))(x, t, cond), c.cond, c.uncond)
    r = run_fast(unet, concepts, {"context": text_context(1)}, {"context": text_context(2)}, steps=6,
                 latent_shape=(1, 4, *HW), blend_start=0.0, masks=masks)
    torch.testing.assert_close(r.final, alone, rtol=1e-3, atol=1e-3)  # merged vs unmerged rounding, 6 steps


@torch.no_grad()
def test_shared_guidance_leaves_the_uncond_rows_to_the_host(unet, concepts):
    """One concept over the whole image: cond rows its LoRA and prompt, uncond rows the plain model's."""
    masks = torch.zeros(1, 2, *HW)
    masks[:, 1] = 1
    cond, uncond = {"context": text_context(1)}, {"context": text_context(2)}
    r = run_fast(unet, concepts, cond, uncond, steps=6, latent_shape=(1, 4, *HW), blend_start=0.0, masks=masks,
                 share_uncond=True)
    reference = _plain(concept_on_cond_rows(unet, concepts[1]), cond, uncond)
    torch.testing.assert_close(r.final, reference, rtol=1e-3, atol=1e-3)  # merged vs unmerged rounding, 6 steps


def _row_masks(rows=2):
    """[rows, 2, H, W] soft, exclusive, different per row."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(rows, 2, *HW, generator=g)
    return m / m.sum(dim=1, keepdim=True).clamp(min=1) * 0.9


@torch.no_grad()
@pytest.mark.parametrize("layer", [
    "input_blocks.1.0.in_layers.2", "input_blocks.3.1.transformer_blocks.0.attn1.to_q",  # a Tucker or a dense delta: per concept
    "input_blocks.3.0.in_layers.2", "input_blocks.5.1.transformer_blocks.0.ff.net.2",  # plain low-rank pairs: stacked
])
def test_a_layer_adds_each_concepts_delta_times_its_mask_at_the_layers_resolution(unet, concepts, layer):
    modules = dict(unet.named_modules())
    module, masks = modules[layer], _row_masks()
    router = RowRoutedLoRA(modules, [c.deltas for c in concepts])
    captured = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.update(x=i[0].clone()))
    x = torch.randn(2, 4, *HW)
    unet_fn(unet)(x, torch.tensor([500.0, 300.0]), {"context": text_context(1, rows=2)})
    handle.remove()
    inp = captured["x"]
    plain = module(inp)
    with router.installed(), router.masked(LayerMasks(masks)):
        out = module(inp)
    expected = plain.clone()
    for j, c in enumerate(concepts):
        delta = torch.zeros_like(plain)
        c.deltas[layer].check(module, layer).add_to(delta, inp, module)
        if plain.dim() == 4:
            m = F.interpolate(masks[:, j:j + 1], size=plain.shape[-2:], mode="area")
        else:  # tokens: the layer's (h, w) flattened row-major
            hw = layer_factor(plain.shape[1], HW)[1]
            m = F.interpolate(masks[:, j:j + 1], size=hw, mode="area").flatten(2).transpose(1, 2)
        expected += delta * m
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cross_attention_combines_each_concepts_keys_and_values_by_mask(unet, concepts):
    name = "input_blocks.3.1.transformer_blocks.0.attn2"
    modules = dict(unet.named_modules())
    attn, masks = modules[name], _row_masks()
    router = RowRoutedLoRA(modules, [c.deltas for c in concepts])
    hw = ((HW[0] + 1) // 2, (HW[1] + 1) // 2)
    x = torch.randn(2, hw[0] * hw[1], attn.to_q.in_features)
    context = text_context(1, rows=2)
    contexts = [torch.cat([c.cond["context"], c.uncond["context"]]) for c in concepts]  # row 0 cond, row 1 uncond
    layer_masks = LayerMasks(masks)
    with router.installed(), router.masked(layer_masks):
        out = fast_cross_attention(attn, x, context, FastCall(layer_masks, contexts, router.route_all))

    def attend(k, v):
        q = attn.to_q(x)
        for j, c in enumerate(concepts):  # masked deltas on q
            d = torch.zeros_like(q)
            c.deltas[name + ".to_q"].check(attn.to_q, "q").add_to(d, x, attn.to_q)
            q = q + d * m[:, j, :, None]
        heads = lambda t: t.view(2, t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        o = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * attn.scale, -1) @ heads(v)
        return o.transpose(1, 2).reshape(2, x.shape[1], -1)

    def with_delta(leaf, j, inp):
        layer = getattr(attn, leaf)
        y = layer(inp)
        concepts[j].deltas[f"{name}.{leaf}"].check(layer, leaf).add_to(y, inp, layer)
        return y

    m = F.interpolate(masks, size=hw, mode="area").flatten(2)
    combined = attend(attn.to_k(context), attn.to_v(context)) * (1 - m.sum(1))[..., None]
    for j in range(2):
        combined += m[:, j, :, None] * attend(with_delta("to_k", j, contexts[j]), with_delta("to_v", j, contexts[j]))
    expected = attn.to_out(combined)
    for j, c in enumerate(concepts):  # masked delta on the output projection
        d = torch.zeros_like(expected)
        c.deltas[name + ".to_out.0"].check(attn.to_out[0], "out").add_to(d, combined, attn.to_out[0])
        expected = expected + d * m[:, j, :, None]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_hires_pass_after_fast_mode_stays_masked_with_resized_masks_or_runs_plain(unet, concepts):
    masks = torch.zeros(1, 2, *HW)
    masks[:, 0] = 1  # concept 1 over the whole image: a masked call is its LoRA merged with its prompts
    r = run_fast(unet, concepts, {"context": text_context(1)}, {"context": text_context(2)}, steps=4,
                 latent_shape=(1, 4, *HW), blend_start=0.0, masks=masks)
    session, c = r.session, concepts[0]
    x, t = torch.randn(2, 4, 18, 30), torch.tensor([400.0, 400.0])  # the latent upscaled 1.5x, cond and uncond rows
    rows = roles_cond_then_uncond(1)
    host = {"context": torch.cat([text_context(1), text_context(2)])}
    with session.installed():
        session.begin_hires(True)
        blended = session(unet_fn(unet), x, t, host, rows)
    alone = unet_fn(merged(unet, c.deltas))(x, t, {"context": torch.cat([c.cond["context"], c.uncond["context"]])})
    torch.testing.assert_close(blended, alone, rtol=1e-4, atol=1e-4)
    assert session.counters["hires_blend"].calls == 0 and session.counters["fast"].calls == 4 + 1  # one call per step, then the hires one: no concept rows
    with session.installed():
        session.begin_hires(False)
        assert torch.equal(session(unet_fn(unet), x, t, host, rows), unet_fn(unet)(x, t, host))


@torch.no_grad()
def test_a_hires_pass_after_a_fast_pass_that_never_blended_runs_plain(unet, concepts):
    """A blend start the sampler never reached (the host warns): no masks to resize, so the
    hires pass runs the plain model instead of failing for want of them."""
    r = run_fast(unet, concepts, {"context": text_context(1)}, {"context": text_context(2)}, steps=4,
                 latent_shape=(1, 4, *HW), blend_start=1.0)
    assert r.masks is None
    x, t = torch.randn(2, 4, 18, 30), torch.tensor([400.0, 400.0])
    host = {"context": torch.cat([text_context(1), text_context(2)])}
    with r.session.installed():
        r.session.begin_hires(True)
        assert torch.equal(r.session(unet_fn(unet), x, t, host, roles_cond_then_uncond(1)), unet_fn(unet)(x, t, host))


@torch.no_grad()
def test_a_host_handing_over_projections_gets_the_same_fast_cross_attention(unet, concepts):
    """Forge's attn2 replace patch: projected q, k, v and the block's key; the module found by that key."""
    name = "input_blocks.3.1.transformer_blocks.0.attn2"
    modules = dict(unet.named_modules())
    attn, masks = modules[name], LayerMasks(_row_masks())
    router = RowRoutedLoRA(modules, [c.deltas for c in concepts])
    x = torch.randn(2, 6 * 10, attn.to_q.in_features)
    context = text_context(1, rows=2)
    fast = FastCall(masks, [torch.cat([c.cond["context"], c.uncond["context"]]) for c in concepts], router.route_all)
    state = AttentionState(AttentionCall(HW, fast=fast))
    patch = ProjectedAttention(state, True, lambda q, k, v, heads: None, {("input", 3, 0): attn})
    extra = {"n_heads": attn.heads, "dim_head": attn.to_q.out_features // attn.heads, "block": ("input", 3), "block_index": 0}
    with router.installed(), router.masked(masks):
        projected = attn.to_out(patch(attn.to_q(x), attn.to_k(context), attn.to_v(context), extra))
        direct = fast_cross_attention(attn, x, context, fast)
        with pytest.raises(RuntimeError, match=r"no cross-attention module known for transformer block \('output', 9, 0\)"):
            patch(attn.to_q(x), attn.to_k(context), attn.to_v(context), {**extra, "block": ("output", 9)})
    torch.testing.assert_close(projected, direct, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_rows_no_mask_touches_get_neither_deltas_nor_concept_attention(unet, concepts, monkeypatch):
    """An uncond row under shared guidance (masks all zero) keeps the host's output bitwise, and the
    deltas and concept attentions run on the touched rows only: there is nothing to add there."""
    modules = dict(unet.named_modules())
    router = RowRoutedLoRA(modules, [c.deltas for c in concepts])
    masks = torch.zeros(3, 2, *HW)
    masks[1] = _row_masks(1)[0]  # rows 0 and 2 untouched
    layer_masks = LayerMasks(masks)
    assert layer_masks.rows == slice(1, 2) and layer_masks.masks.shape[0] == 1
    assert LayerMasks(torch.zeros(2, 2, *HW)).rows == slice(0, 0)

    seen = []
    stacked_add = StackedLowRank.add_to
    monkeypatch.setattr(StackedLowRank, "add_to", lambda self, out, x, *a: (seen.append(x.shape[0]),
                                                                              stacked_add(self, out, x, *a)))
    layer = modules["input_blocks.3.0.in_layers.2"]
    inp = torch.randn(3, layer.in_channels, 6, 10)
    with router.installed(), router.masked(layer_masks):
        out = layer(inp)
    plain = layer(inp)
    assert seen == [1]
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2]) and not torch.allclose(out[1], plain[1])
    with router.installed(), router.masked(LayerMasks(masks[1:2])):
        torch.testing.assert_close(out[1:2], layer(inp[1:2]), rtol=1e-5, atol=1e-5)  # a batch of 1: rounding

    attn = modules["input_blocks.3.1.transformer_blocks.0.attn2"]
    x, context = torch.randn(3, 6 * 10, attn.to_q.in_features), text_context(1, rows=3)
    contexts = [c.cond["context"] for c in concepts]  # the touched row's only
    with router.installed(), router.masked(layer_masks):
        out = fast_cross_attention(attn, x, context, FastCall(layer_masks, contexts, router.route_all))
    plain = attn(x, context)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-6)
    with router.installed(), router.masked(LayerMasks(masks[1:2])):
        alone = fast_cross_attention(attn, x[1:2], context[1:2], FastCall(LayerMasks(masks[1:2]), contexts, router.route_all))
    torch.testing.assert_close(out[1:2], alone, rtol=1e-5, atol=1e-6)
