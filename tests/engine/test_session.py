"""The DESIGN §1 invariants of the two passes, on the tiny ldm-shaped UNet."""
import math

import pytest
import torch
import torch.nn.functional as F

from omg_ext.engine.attention import CAPTURE_FACTORS
from omg_ext.engine.resolution import layer_factor
from omg_ext.engine.masks import masks_from_attention
from omg_ext.engine.session import Concept, OmgSession
from omg_ext.engine.rows import RowRole, roles_cond_then_uncond
from minisd.loras import merged, random_concept_deltas
from minisd.runs import SCHEDULE, concept_on_cond_rows, run_omg
from minisd.sampling import generate
from minisd.unet import TinyUNet, unet_fn

CTX = 64
SAMPLERS = ["euler", "euler_a", "dpmpp_2m", "heun"]


def _ctx(seed, rows=1, tokens=77):
    return torch.randn(rows, tokens, CTX, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet():
    return TinyUNet(context_dim=CTX, seed=0)


@pytest.fixture(scope="module")
def concepts(unet):
    return [
        Concept({"context": _ctx(10)}, {"context": _ctx(11)}, random_concept_deltas(unet, seed=1), tokens=[5]),
        Concept({"context": _ctx(20)}, {"context": _ctx(21)}, random_concept_deltas(unet, seed=2, dense_every=4), tokens=[8, 9]),
    ]


def _global(images=1):
    return {"context": _ctx(1, images)}, {"context": _ctx(2, images)}


def _half_masks(images=1, hw=(16, 16)):
    m = torch.zeros(images, 2, *hw)
    m[:, 0, :, : hw[1] // 2] = 1
    m[:, 1, :, hw[1] // 2:] = 0.75
    return m


@torch.no_grad()
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_blend_start_one_reproduces_pass1_without_unet_calls(unet, concepts, sampler):
    cond, uncond = _global()
    r = run_omg(unet, concepts, cond, uncond, sampler=sampler, blend_start=1.0, masks=_half_masks())
    assert torch.equal(r.final, r.layout)
    assert r.session.counters["pass2"].calls == 0
    assert r.session.counters["pass2"].replayed == r.session.counters["pass1"].calls > 0


@torch.no_grad()
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_call_before_blend_start_is_replayed(unet, concepts, sampler):
    cond, uncond = _global()
    r = run_omg(unet, concepts, cond, uncond, sampler=sampler, steps=8, blend_start=0.5, masks=_half_masks())
    record = r.session.record.calls
    before = sum(call.out is not None for call in record)
    after = len(record) - before
    assert before >= 4 and after >= 4  # 4 of 8 steps on each side, more for heun
    p2 = r.session.counters["pass2"]
    assert p2.replayed == before
    # every blended call: 2 host rows + 2 concepts x 2 rows, one UNet call (the layout from pass 1's kept attention)
    assert (p2.calls, p2.rows) == (after, after * 6)
    assert not torch.equal(r.final, r.layout)


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_full_mask_from_step_zero_equals_plain_run_with_merged_lora(unet, concepts, sampler):
    concept = concepts[1]  # low-rank and dense deltas, Linear and Conv2d
    cond, uncond = _global()
    r = run_omg(unet, [concept], cond, uncond, sampler=sampler, steps=6, blend_start=0.0, masks=torch.ones(1, 1, 16, 16))
    plain_fn = unet_fn(merged(unet, concept.deltas))
    reference = generate(lambda x, t, c, rows: plain_fn(x, t, c), SCHEDULE, sampler, concept.cond, concept.uncond,
                         seed=0, steps=6, latent_shape=(1, 4, 16, 16))
    assert not torch.allclose(reference, r.layout, atol=1e-2)
    torch.testing.assert_close(r.final, reference, rtol=1e-3, atol=1e-3)  # merged vs unmerged rounding, 6 steps


@torch.no_grad()
def test_shared_uncond_guides_the_concept_against_the_hosts_uncond_row(unet, concepts):
    """``share_uncond``: cond rows as the concept's (LoRA merged, its prompt), uncond rows the host's own (no LoRA)."""
    concept = concepts[1]
    cond, uncond = _global()
    r = run_omg(unet, [concept], cond, uncond, steps=6, blend_start=0.0, masks=torch.ones(1, 1, 16, 16), share_uncond=True)
    reference = generate(concept_on_cond_rows(unet, concept), SCHEDULE, "euler", cond, uncond, seed=0, steps=6,
                         latent_shape=(1, 4, 16, 16))
    torch.testing.assert_close(r.final, reference, rtol=1e-3, atol=1e-3)  # merged vs unmerged rounding, 6 steps
    blended = r.session.counters["pass2"]
    assert blended.rows == blended.calls * 3  # host cond + uncond, one concept cond row: no concept uncond row


def _one_blended_call(unet, concepts, x, t, cond, rows, masks, max_rows=None, layout=True, raw=None, keep_attention=True):
    session = OmgSession(unet, concepts, images=masks.shape[0], layout=layout, max_rows=max_rows,
                         keep_attention=keep_attention)
    raw = raw or unet_fn(unet)
    with session.installed():
        session.begin_pass1()
        session(raw, x, t, cond, rows)
        session.begin_pass2(masks, blend_start=0.0)
        return session(raw, x, t, cond, rows), session


@torch.no_grad()
@pytest.mark.parametrize("which", [0, 1])
def test_concept_row_in_shared_batch_equals_it_alone_with_lora_merged(unet, concepts, which):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 500.0)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, which] = 1  # the host rows come back as exactly this concept's rows
    out, session = _one_blended_call(unet, concepts, x, t, cond, roles_cond_then_uncond(1), masks)
    assert session.counters["pass2"].rows == 6
    c = concepts[which]
    alone = unet_fn(merged(unet, c.deltas))(x, t, {"context": torch.cat([c.cond["context"], c.uncond["context"]])})
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("keep_attention,max_rows,calls", [(False, 2, 7), (False, 3, 5), (False, 5, 3), (True, 2, 6),
                                                           (True, 5, 3)])
def test_chunked_equals_unchunked(unet, concepts, keep_attention, max_rows, calls):
    """A reference row never leaves its host row's call (units of 2); kept attention needs no unit."""
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 300.0)
    cond = {"context": torch.cat([_ctx(1, 2), _ctx(2, 2)])}
    masks = _half_masks(2)
    masks[1] = masks[1].flip(-1)  # each image its own masks
    rows = roles_cond_then_uncond(2)
    whole, s1 = _one_blended_call(unet, concepts, x, t, cond, rows, masks, keep_attention=keep_attention)
    chunked, s2 = _one_blended_call(unet, concepts, x, t, cond, rows, masks, max_rows=max_rows,
                                    keep_attention=keep_attention)
    assert s1.counters["pass2"].calls == 1 and s2.counters["pass2"].calls == calls
    assert s1.counters["pass2"].rows == s2.counters["pass2"].rows == (12 if keep_attention else 14)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prompts_of_different_lengths_run_in_separate_calls(unet, concepts):
    long = Concept({"context": _ctx(30, tokens=154)}, {"context": _ctx(31)}, concepts[0].deltas, tokens=[5])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.full((2,), 400.0)
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0] = 1
    out, session = _one_blended_call(unet, [long], x, t, {"context": torch.cat([_ctx(1), _ctx(2)])}, roles_cond_then_uncond(1), masks)
    assert session.counters["pass2"].calls == 2
    alone_cond = unet_fn(merged(unet, long.deltas))(x[:1], t[:1], long.cond)
    torch.testing.assert_close(out[:1], alone_cond, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_split_cond_uncond_calls_give_the_same_image(unet, concepts):
    cond, uncond = _global(2)
    kw = dict(steps=5, blend_start=0.4, latent_shape=(2, 4, 16, 16), masks=_half_masks(2), sampler="euler_a")
    together = run_omg(unet, concepts, cond, uncond, **kw)
    split = run_omg(unet, concepts, cond, uncond, batch_cond_uncond=False, **kw)
    assert split.session.counters["pass2"].replayed == 2 * together.session.counters["pass2"].replayed
    torch.testing.assert_close(split.final, together.final, rtol=1e-3, atol=1e-3)  # batch-size rounding only


class _AttentionProbe:
    """Forward hooks that keep q, k, v and the pre-projection output of every attention layer."""

    def __init__(self, unet):
        self.seen, self.handles = {}, []
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                for part in ("to_q", "to_k", "to_v"):
                    self.handles.append(getattr(module, part).register_forward_hook(self._keep(name, part)))
                self.handles.append(module.to_out[0].register_forward_pre_hook(self._keep_in(name)))

    def _keep(self, name, part):
        def hook(_, __, out):
            self.seen.setdefault(name, {}).setdefault(part, []).append(out)
        return hook

    def _keep_in(self, name):
        def hook(_, inputs):
            self.seen.setdefault(name, {}).setdefault("out", []).append(inputs[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _probs(q, k, heads, scale):
    b, n, c = q.shape
    qh = q.view(b, n, heads, -1).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2) * scale).softmax(-1)


@torch.no_grad()
@pytest.mark.parametrize("self_too", [False, True])
def test_layout_replacement_gives_host_cond_rows_the_reference_probabilities(unet, concepts, self_too):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    t = torch.full((2,), 700.0)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    session = OmgSession(unet, concepts, images=1, keep_attention=False)
    raw = unet_fn(unet)
    modules = dict(unet.named_modules())
    with session.installed():
        session.begin_pass1()
        session(raw, x + 0.5, t, cond, roles_cond_then_uncond(1))  # the reference latent differs from x
        session.begin_pass2(_half_masks(), blend_start=0.0, self_attention_until=1.0 if self_too else 0.0)
        probe = _AttentionProbe(unet)
        try:
            session(raw, x, t, cond, roles_cond_then_uncond(1))
        finally:
            probe.remove()
    checked = {"attn1": 0, "attn2": 0}
    for name, seen in probe.seen.items():
        m = modules[name]
        q, k, v, out = seen["to_q"][-1], seen["to_k"][-1], seen["to_v"][-1], seen["out"][-1]
        assert q.shape[0] == 7  # host cond, reference, host uncond, 2 concepts x 2
        factor, _ = layer_factor(q.shape[1], (16, 16))
        replaced = name.endswith("attn2") or (self_too and factor == 4)
        host, ref = 0, 1
        p_ref = _probs(q[ref:ref + 1], k[ref:ref + 1], m.heads, m.scale)
        p_own = _probs(q[host:host + 1], k[host:host + 1], m.heads, m.scale)
        vh = v[host:host + 1].view(1, v.shape[1], m.heads, -1).transpose(1, 2)
        expected = ((p_ref if replaced else p_own) @ vh).transpose(1, 2).reshape(1, q.shape[1], -1)
        torch.testing.assert_close(out[host:host + 1], expected, rtol=1e-4, atol=1e-5)
        if replaced:
            assert not torch.allclose(p_ref, p_own, atol=1e-4)
            checked[name.rsplit(".", 1)[-1]] += 1
    assert checked["attn2"] == sum(1 for n in modules if n.endswith("attn2"))
    quarter = sum(1 for n, s in probe.seen.items() if n.endswith("attn1") and layer_factor(s["to_q"][-1].shape[1], (16, 16))[0] == 4)
    assert quarter >= 1 and checked["attn1"] == (quarter if self_too else 0)


@torch.no_grad()
@pytest.mark.parametrize("latent", [(16, 16), (16, 12), (12, 20)])
def test_pass1_captures_each_images_class_word_attention_at_half_and_quarter_resolution(unet, concepts, latent):
    # two images whose prompts differ (wildcards): image 1's class words sit elsewhere
    image_tokens = [[c.tokens for c in concepts], [[11], [2, 3]]]
    x = torch.randn(4, 4, *latent, generator=torch.Generator().manual_seed(7))
    t = torch.full((4,), 600.0)
    cond = {"context": torch.cat([_ctx(1, 2), _ctx(2, 2)])}
    session = OmgSession(unet, concepts, images=2, image_tokens=image_tokens)
    modules = dict(unet.named_modules())
    with session.installed():
        session.begin_pass1()
        probe = _AttentionProbe(unet)
        try:
            plain_out = session(unet_fn(unet), x, t, cond, roles_cond_then_uncond(2))
        finally:
            probe.remove()
    torch.testing.assert_close(plain_out, unet_fn(unet)(x, t, cond), rtol=0, atol=0)  # pass 1 is the host's own image
    maps_hw = ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
    expected = torch.zeros(2, 2, *maps_hw)
    layers = 0
    for name, seen in probe.seen.items():
        if not name.endswith("attn2"):
            continue
        q, k = seen["to_q"][0], seen["to_k"][0]
        factor, hw = layer_factor(q.shape[1], latent)
        if factor not in CAPTURE_FACTORS:
            continue
        layers += 1
        for image in range(2):  # rows 0 and 1 are the images' cond rows
            p = _probs(q[image:image + 1], k[image:image + 1], modules[name].heads, modules[name].scale).mean(1)[0]
            for j, tokens in enumerate(image_tokens[image]):
                word = p[:, list(tokens)].sum(-1).view(1, 1, *hw)
                expected[image, j] += torch.nn.functional.interpolate(word, size=maps_hw, mode="bilinear", align_corners=False)[0, 0]
    assert layers >= 4
    torch.testing.assert_close(session.attention_maps(), expected, rtol=1e-4, atol=1e-6)
    assert all(len(seen["to_q"]) == len(seen["to_k"]) == 1 for seen in probe.seen.values())  # nothing projected twice
    with pytest.raises(ValueError, match="image_tokens must list 2 concepts' positions for each of 2 images"):
        OmgSession(unet, concepts, images=2, image_tokens=image_tokens[:1])


@torch.no_grad()
def test_capture_projects_again_only_for_a_host_attention_that_does_not_call_the_projection_modules(unet, concepts):
    """An attention forward that uses the projection weights without calling ``to_q``/``to_k`` (no hook sees
    its q and k) gets the same maps: the capture rows are projected again."""
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    t, cond = torch.full((2,), 600.0), {"context": _ctx(1, 2)}

    def maps() -> tuple[torch.Tensor, torch.Tensor]:
        session = OmgSession(unet, concepts, images=1)
        with session.installed():
            session.begin_pass1()
            out = session(unet_fn(unet), x, t, cond, roles_cond_then_uncond(1))
        return out, session.attention_maps()

    hooked_out, hooked = maps()
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]

    def by_weights(m):
        def forward(x, context=None, mask=None, **kwargs):
            q, k, v = F.linear(x, m.to_q.weight), F.linear(context, m.to_k.weight), F.linear(context, m.to_v.weight)
            b, n, c = q.shape
            q, k, v = (p.reshape(b, -1, m.heads, c // m.heads).transpose(1, 2) for p in (q, k, v))
            return m.to_out(F.scaled_dot_product_attention(q, k, v, scale=m.scale).transpose(1, 2).reshape(b, n, c))
        return forward

    for m in cross:
        m.forward = by_weights(m)
    try:
        out, again = maps()
    finally:
        for m in cross:
            del m.forward
    torch.testing.assert_close(out, hooked_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, hooked, rtol=1e-5, atol=1e-6)
    assert hooked.abs().sum() > 0



@torch.no_grad()
def test_a_host_attention_that_fails_inside_a_captured_layer_leaves_no_hook(unet, concepts):
    """The capture's forward hooks on ``to_q``/``to_k`` go with the call, also when the host's attention raises."""
    x, t, cond = torch.randn(2, 4, 16, 12), torch.full((2,), 600.0), {"context": _ctx(1, 2)}
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]

    def failing(m):  # at the first layer that captures
        def forward(x, context=None, mask=None, **kwargs):
            if layer_factor(x.shape[1], (16, 12))[0] not in CAPTURE_FACTORS:
                return type(m).forward(m, x, context, mask)
            m.to_q(x)
            raise RuntimeError("host attention failed")
        return forward

    for m in cross:
        m.forward = failing(m)
    session = OmgSession(unet, concepts, images=1)
    try:
        with session.installed():
            session.begin_pass1()
            with pytest.raises(RuntimeError, match="host attention failed"):
                session(unet_fn(unet), x, t, cond, roles_cond_then_uncond(1))
    finally:
        for m in cross:
            del m.forward
    assert not any(module._forward_hooks for module in unet.modules())

def _snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


@torch.no_grad()
@pytest.mark.parametrize("fail_at", [None, "installed", "call2", "pass1", "masks", "call20", "pass2"])
def test_no_patch_survives_a_run_and_weights_are_bitwise_unchanged(unet, concepts, fail_at):
    before = _snapshot(unet)
    cond, uncond = _global()
    if fail_at is None:
        run_omg(unet, concepts, cond, uncond, steps=12, blend_start=0.5)
    else:
        with pytest.raises(RuntimeError, match=f"injected failure at {fail_at}"):
            run_omg(unet, concepts, cond, uncond, steps=12, blend_start=0.5, fail_at=fail_at)
    for name, module in unet.named_modules():
        assert "forward" not in module.__dict__, name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class _SmallGpu:
    """A UNet call that runs out of memory above ``fits`` rows, as CUDA (or another backend) says it."""

    def __init__(self, unet, fits, error=torch.OutOfMemoryError):
        self.raw, self.fits, self.error, self.sizes = unet_fn(unet), fits, error, []

    def __call__(self, x, t, cond):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise self.error("CUDA out of memory. Tried to allocate 3.00 GiB")
        return self.raw(x, t, cond)


@torch.no_grad()
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError], ids=["cuda", "other backend"])
def test_a_call_out_of_memory_is_halved_until_it_fits_and_stays_so(unet, concepts, error, caplog):
    x = torch.randn(4, 4, 12, 16, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 300.0)
    cond = {"context": torch.cat([_ctx(1, 2), _ctx(2, 2)])}
    masks = _half_masks(2, (12, 16))
    whole, _ = _one_blended_call(unet, concepts, x, t, cond, roles_cond_then_uncond(2), masks, keep_attention=False)
    gpu = _SmallGpu(unet, fits=4, error=error)
    chunked, session = _one_blended_call(unet, concepts, x, t, cond, roles_cond_then_uncond(2), masks, raw=gpu,
                                         keep_attention=False)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # pass 1's 4 rows fit; pass 2's 14 rows fail, then 7, then calls of at most 3 rows (a reference beside its host)
    assert gpu.sizes[:3] == [4, 14, 7] and max(gpu.sizes[3:]) <= 3 and sum(gpu.sizes[3:]) == 14
    assert session.row_limit.rows == 3  # the session's next calls start there
    assert caplog.text.count("OMG: out of memory in a UNet call of") == 2  # one line per lowering


@torch.no_grad()
def test_out_of_memory_with_one_unit_left_or_another_error_is_raised(unet, concepts):
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    with pytest.raises(torch.OutOfMemoryError):  # a host row and its reference need 2 rows
        _one_blended_call(unet, concepts, x, t, cond, roles_cond_then_uncond(1), _half_masks(1, (8, 8)), raw=_SmallGpu(unet, fits=1),
                          keep_attention=False)

    def broken(x, t, cond):
        raise RuntimeError("expected scalar type Half but found Float")
    session = OmgSession(unet, concepts, images=1)
    with session.installed(), pytest.raises(RuntimeError, match="expected scalar type Half"):
        session.begin_pass2(_half_masks(1, (8, 8)), blend_start=0.0)
        session(broken, x, t, cond, roles_cond_then_uncond(1))
    assert session.row_limit.rows is None


def test_bad_session_input_is_named(unet, concepts):
    with pytest.raises(ValueError, match="at least one concept"):
        OmgSession(unet, [], images=1)
    with pytest.raises(ValueError, match="max_rows must be at least 2"):
        OmgSession(unet, concepts, images=1, max_rows=1)
    session = OmgSession(unet, concepts, images=1)
    with pytest.raises(ValueError, match="masks must be"):
        session.begin_pass2(torch.ones(1, 2, 16, 16), blend_start=0.3)  # sums to 2
    with pytest.raises(ValueError, match=r"\[images, concepts, H, W\]"):
        session.begin_pass2(torch.ones(1, 3, 16, 16) / 3, blend_start=0.3)
    with pytest.raises(ValueError, match=r"blend_start must be a fraction of the steps in \[0, 1\], got 1.2"):
        session.begin_pass2(_half_masks(), blend_start=1.2)
    with pytest.raises(ValueError, match="2 row roles for a call of 1 rows"):
        session(lambda *a: None, torch.zeros(1, 4, 8, 8), torch.zeros(1), {}, [RowRole(True, 0)] * 2)


@torch.no_grad()
def test_a_call_that_differs_from_the_record_runs_for_real(unet, concepts):
    cond, uncond = _global()
    session = OmgSession(unet, concepts, images=1)
    raw = unet_fn(unet)
    model_fn = lambda x, t, c, rows: session(raw, x, t, c, rows)  # noqa: E731
    kw = dict(steps=4, latent_shape=(1, 4, 16, 16))
    with session.installed():
        session.begin_pass1()
        generate(model_fn, SCHEDULE, "euler", cond, uncond, seed=0, **kw)
        session.begin_pass2(_half_masks(), blend_start=1.0)
        other_seed = generate(model_fn, SCHEDULE, "euler", cond, uncond, seed=1, **kw)
    assert session.counters["pass2"].replayed == 0 and session.counters["pass2"].calls == 4
    plain = generate(lambda x, t, c, rows: raw(x, t, c), SCHEDULE, "euler", cond, uncond, seed=1, **kw)
    assert torch.equal(other_seed, plain)


@torch.no_grad()
def test_hires_pass_blends_with_resized_masks_or_runs_plain(unet, concepts):
    x = torch.randn(2, 4, 24, 24, generator=torch.Generator().manual_seed(8))
    t = torch.full((2,), 400.0)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    raw = unet_fn(unet)
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0] = 1  # everything to concept 0: the hires call must equal concept 0 alone at 24x24
    session = OmgSession(unet, concepts, images=1)
    with session.installed():
        session.begin_pass1()
        session(raw, x[:, :, :16, :16], t, cond, roles_cond_then_uncond(1))
        session.begin_pass2(masks, blend_start=0.0)
        session.begin_hires(blend=True)
        blended = session(raw, x, t, cond, roles_cond_then_uncond(1))
        session.begin_hires(blend=False)
        plain = session(raw, x, t, cond, roles_cond_then_uncond(1))
    assert session.counters["hires_blend"].rows == 6  # no reference row without a record
    torch.testing.assert_close(plain, raw(x, t, cond), rtol=0, atol=0)
    c = concepts[0]
    alone = unet_fn(merged(unet, c.deltas))(x, t, {"context": torch.cat([c.cond["context"], c.uncond["context"]])})
    torch.testing.assert_close(blended, alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_attention_window_averages_exactly_the_calls_in_it(unet, concepts):
    """Four pass-1 calls at falling timesteps, each image captured once per call: a window is the mean of its calls."""
    session = OmgSession(unet, concepts, images=2)
    g = torch.Generator().manual_seed(3)
    cond = {"context": torch.cat([_ctx(1), _ctx(2), _ctx(3), _ctx(4)])}
    singles = []
    with session.installed():
        session.begin_pass1()
        for step, time in enumerate((900.0, 700.0, 400.0, 100.0)):
            x = torch.randn(4, 4, 16, 12, generator=g)  # non-square
            session(unet_fn(unet), x, torch.full((4,), time), cond, roles_cond_then_uncond(2))
            singles.append(session.maps.calls[-1][1].clone())
    per_call = torch.stack(singles)  # each call captured each image once
    torch.testing.assert_close(session.attention_maps(), per_call.mean(0))
    torch.testing.assert_close(session.attention_maps((0.0, 0.5)), per_call[:2].mean(0))
    torch.testing.assert_close(session.attention_maps((0.5, 1.0)), per_call[2:].mean(0))
    torch.testing.assert_close(session.attention_maps((0.25, 0.75)), per_call[1:3].mean(0))
    assert not torch.allclose(per_call[0], per_call[3])
    with pytest.raises(ValueError, match="attention window must be two fractions"):
        session.attention_maps((0.5, 0.5))


@torch.no_grad()
@pytest.mark.parametrize("hw", [(12, 20), (20, 12)])
def test_each_image_is_blended_with_its_own_masks_in_its_own_orientation(hw):
    """Rows answer with a constant naming their conditioning, so the blend's result is known exactly per pixel:
    ``(1 - Σ M_j)·host + Σ M_j·concept_j`` with image b's masks, never image 0's, never transposed."""
    h, w = hw
    value = lambda v: torch.full((1, 2, 4), float(v))  # noqa: E731  a conditioning that names itself
    concepts = [Concept({"context": value(10 + j)}, {"context": value(20 + j)}, tokens=[1]) for j in range(2)]
    session = OmgSession(torch.nn.Linear(1, 1), concepts, images=2)

    def unet_fn(x, t, cond):
        return cond["context"][:, 0, 0].view(-1, 1, 1, 1).expand(-1, *x.shape[1:]).clone()

    masks = torch.zeros(2, 2, h, w)
    masks[0, 0, : h // 3] = 1.0              # image 0: concept 1 on the top rows
    masks[0, 1, :, : w // 4] = 0.5           # ... concept 2 at half strength on the left columns
    masks[0, 1, : h // 3, : w // 4] = 0.0
    masks[1, 1, h // 2:, w // 2:] = 1.0      # image 1: concept 2 in the bottom-right quarter only
    cond = {"context": torch.cat([value(1), value(2), value(3), value(4)])}  # cond 1, 2; uncond 3, 4
    x, t = torch.zeros(4, 3, h, w), torch.full((4,), 500.0)
    with session.installed():
        session.begin_pass1()
        session(unet_fn, x, t, cond, roles_cond_then_uncond(2))
        session.begin_pass2(masks, blend_start=0.0)
        out = session(unet_fn, x, t, cond, roles_cond_then_uncond(2))
    for row, (host, image, concept_values) in enumerate([(1, 0, (10, 11)), (2, 1, (10, 11)), (3, 0, (20, 21)), (4, 1, (20, 21))]):
        m = masks[image]
        expected = host * (1 - m.sum(0)) + concept_values[0] * m[0] + concept_values[1] * m[1]
        torch.testing.assert_close(out[row, 0], expected, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("until, replaced_calls", [(0.5, 2), (0.25, 1), (0.75, 3)])
def test_self_attention_is_taken_from_the_reference_exactly_until_its_cut_off(unet, concepts, monkeypatch, until, replaced_calls):
    """Four calls at falling timesteps, all blended: quarter-resolution self-attention is replaced in the first
    ``until`` of them and in none after (values between 0 and 1, not just the ends)."""
    from omg_ext.engine.attention import OmgAttention
    replaced = []
    original = OmgAttention._replaced

    def counting(self, x, context, call):
        replaced[-1] += 0 if self.is_cross else 1
        return original(self, x, context, call)

    monkeypatch.setattr(OmgAttention, "_replaced", counting)
    session = OmgSession(unet, concepts, images=1)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    x, times = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(2)), (900.0, 700.0, 400.0, 100.0)
    with session.installed():
        session.begin_pass1()
        for time in times:
            session(unet_fn(unet), x, torch.full((2,), time), cond, roles_cond_then_uncond(1))
        session.begin_pass2(_half_masks(hw=(16, 12)), blend_start=0.0, self_attention_until=until)
        for time in times:
            replaced.append(0)
            session(unet_fn(unet), x + 0.1, torch.full((2,), time), cond, roles_cond_then_uncond(1))
    quarter = replaced[0]
    assert quarter >= 1
    assert replaced == [quarter] * replaced_calls + [0] * (len(times) - replaced_calls)


@torch.no_grad()
def test_attention_masks_are_the_mask_pipeline_on_each_images_maps(unet, concepts):
    """Every setting reaches the mask pipeline, per image, at the latent's (non-square) size."""
    cond, uncond = _global(2)
    r = run_omg(unet, concepts, cond, uncond, steps=4, latent_shape=(2, 4, 12, 20), blend_start=1.0, masks=_half_masks(2, (12, 20)))
    session, maps = r.session, r.session.attention_maps()
    settings = dict(dilation=8, feather=16, groups=[[0, 1]], order="attention", labels=["man", "man"])
    got = session.attention_masks(**settings)
    for b in range(2):
        expected = masks_from_attention(maps[b], (12, 20), **settings)
        assert torch.equal(got[b].masks, expected.masks) and got[b].warnings() == expected.warnings()
        assert torch.equal(session.attention_masks()[b].masks, masks_from_attention(maps[b], (12, 20)).masks)
    assert not torch.equal(got[0].masks, got[1].masks)  # each image its own maps
    assert not torch.equal(got[0].masks, session.attention_masks(dilation=8, feather=16, labels=["man", "man"])[0].masks)
    with pytest.raises(ValueError, match="^OMG: no pass-1 step lies in the attention window$"):
        session.attention_maps(window=(0.9, 0.95))


def test_masks_before_pass1_name_the_cause(unet, concepts):
    session = OmgSession(unet, concepts, images=1)
    with pytest.raises(RuntimeError, match=r"^OMG: pass 1 captured no attention \(no cond rows reached the UNet\)$"):
        session.maps.mean()
    with pytest.raises(RuntimeError, match="^OMG: pass 1 made no UNet call$"):
        session.record.latent_hw()


@torch.no_grad()
@pytest.mark.parametrize("keep_attention", [False, True])
def test_a_call_at_another_time_than_pass_1s_has_no_layout_reference(unet, concepts, keep_attention):
    """The reference row (or kept attention) is the pass-1 latent of the same call; a call at another
    timestep (a sampler that diverged, a hires pass) must blend without one, not borrow a wrong layout."""
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    cond, rows, masks = {"context": torch.cat([_ctx(1), _ctx(2)])}, roles_cond_then_uncond(1), _half_masks(1, (8, 12))
    raw = unet_fn(unet)

    def pass2_output(layout, pass1_t, **pass2):
        session = OmgSession(unet, concepts, images=1, layout=layout, keep_attention=keep_attention)
        with session.installed():
            session.begin_pass1()
            session(raw, x, torch.full((2,), pass1_t), cond, rows)
            session.begin_pass2(masks, blend_start=0.0, **pass2)
            return session(raw, x, torch.full((2,), 300.0), cond, rows), session

    shifted, session = pass2_output(True, 500.0)
    assert session.counters["pass2"].rows == 6  # no reference row ran
    assert torch.equal(shifted, pass2_output(False, 500.0)[0])
    same, session = pass2_output(True, 300.0)
    assert session.counters["pass2"].rows == (6 if keep_attention else 7) and not torch.equal(same, shifted)
    # self-attention preservation is off unless asked for
    assert torch.equal(same, pass2_output(True, 300.0, self_attention_until=0.0)[0])
    assert not torch.equal(same, pass2_output(True, 300.0, self_attention_until=1.0)[0])


def test_blend_masks_follow_a_hires_latent_bilinearly_per_image():
    from omg_ext.engine.expand import BlendMasks
    masks = torch.zeros(2, 2, 4, 6)
    masks[0, 0, :, :3], masks[0, 1, :, 3:], masks[1, 0, :2], masks[1, 1, 2:] = 1, 1, 1, 1
    blend_masks = BlendMasks(masks, images=2, concepts=2)
    rows = [RowRole(True, 1), RowRole(True, 0), RowRole(False, 1)]
    big = blend_masks.for_rows(torch.zeros(3, 4, 8, 12), rows)
    expected = torch.nn.functional.interpolate(masks, size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(big, expected[[1, 0, 1]])
    assert big.sum(1).max() <= 1 + 1e-6 and big[0, 0, 0, 5] == 1 and big[1, 0, 7, 0] == 1  # image 1 top, image 0 left
    assert torch.equal(blend_masks.for_rows(torch.zeros(1, 4, 4, 6), rows[1:2]), masks[[0]])
    with pytest.raises(ValueError, match=r"^masks must be non-negative and sum to at most 1 at every pixel$"):
        BlendMasks(masks * 1.1, images=2, concepts=2)


@torch.no_grad()
def test_layout_until_drops_the_reference_rows_for_the_last_steps(unet, concepts):
    cond, uncond = _global()
    run = dict(steps=8, blend_start=0.5, masks=_half_masks(), keep_attention=False)
    full = run_omg(unet, concepts, cond, uncond, **run)
    window = run_omg(unet, concepts, cond, uncond, layout_until=0.75, **run)
    none = run_omg(unet, concepts, cond, uncond, layout=False, **run)
    # steps 4 and 5 with a reference row (2 + 1 + 2 x 2 rows), steps 6 and 7 without (2 + 2 x 2)
    assert [r.session.counters["pass2"].rows for r in (full, window, none)] == [4 * 7, 2 * 7 + 2 * 6, 4 * 6]
    assert not torch.equal(window.final, full.final) and not torch.equal(window.final, none.final)
    at_blend_start = run_omg(unet, concepts, cond, uncond, layout_until=0.5, **run)
    assert torch.equal(at_blend_start.final, none.final)
    with pytest.raises(ValueError, match=r"layout_until must be a fraction of the steps in \[0, 1\], got -0.1"):
        run_omg(unet, concepts, cond, uncond, layout_until=-0.1, **run)


@torch.no_grad()
@pytest.mark.parametrize("sampler,latent", [("euler", (16, 12)), ("dpmpp_2m", (12, 20)), ("heun", (16, 16))])
def test_kept_attention_gives_the_reference_rows_image_with_a_row_fewer(unet, concepts, sampler, latent):
    """Pass 1's kept cross-attention outputs are what a reference row computes: the same image, one row
    fewer per host cond row and blended call. Without layout preservation the image differs."""
    cond, uncond = {"context": torch.cat([_ctx(1), _ctx(3)])}, {"context": _ctx(2, 2)}  # two images, two prompts
    masks = torch.zeros(2, 2, *latent)  # the host rows show in the middle third
    masks[:, 0, :, :latent[1] // 3], masks[:, 1, :, 2 * latent[1] // 3:] = 1, 1
    run = dict(sampler=sampler, steps=6, latent_shape=(2, 4, *latent), blend_start=0.5, masks=masks, seeds=[1, 2])
    kept = run_omg(unet, concepts, cond, uncond, **run)
    reference = run_omg(unet, concepts, cond, uncond, keep_attention=False, **run)
    none = run_omg(unet, concepts, cond, uncond, layout=False, **run)
    # batch composition moves floats by up to ~3e-4; layout preservation (small in a random UNet) by 10x more
    assert (kept.final - reference.final).abs().max() * 10 < (kept.final - none.final).abs().max()
    k2, r2 = kept.session.counters["pass2"], reference.session.counters["pass2"]
    assert k2.calls == r2.calls > 0 and r2.rows - k2.rows == 2 * k2.calls  # the two images' cond rows


@torch.no_grad()
def test_kept_outputs_over_their_limit_give_way_to_reference_rows_in_the_earliest_blended_calls(unet, concepts, monkeypatch):
    from omg_ext.engine import session as session_module
    cond, uncond = _global()
    run = dict(steps=8, blend_start=0.5, masks=_half_masks())
    full = run_omg(unet, concepts, cond, uncond, **run)
    record = full.session.record
    kept = [c.layout is not None for c in record.calls]
    assert kept == [False] * 4 + [True] * 4  # the replayed calls' outputs are dropped when pass 2 starts
    per_call = record.calls[-1].layout.nbytes
    assert per_call > 0 and record.layout_nbytes == 4 * per_call
    monkeypatch.setattr(session_module, "keep_limit", lambda free: int(2.5 * per_call))
    limited = run_omg(unet, concepts, cond, uncond, **run)
    assert [c.layout is not None for c in limited.session.record.calls] == [False] * 6 + [True] * 2
    assert limited.session.counters["pass2"].rows == full.session.counters["pass2"].rows + 2  # two reference rows
    torch.testing.assert_close(limited.final, full.final, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_host_cond_row_takes_pass_1s_cross_attention_output_at_every_layer(unet, concepts):
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(6))
    t = torch.full((2,), 700.0)
    cond = {"context": torch.cat([_ctx(1), _ctx(2)])}
    session, raw = OmgSession(unet, concepts, images=1), unet_fn(unet)
    layers = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    seen, handles = {}, []
    for name, module in layers.items():
        handles.append(module.register_forward_hook(lambda m, i, out, name=name: seen.setdefault(name, []).append(out)))
    try:
        with session.installed():
            session.begin_pass1()
            session(raw, x + 0.5, t, cond, roles_cond_then_uncond(1))  # pass 1's latent differs from pass 2's
            session.begin_pass2(_half_masks(1, (16, 12)), blend_start=0.0)
            session(raw, x, t, cond, roles_cond_then_uncond(1))
    finally:
        for h in handles:
            h.remove()
    assert session.counters["pass2"].rows == 6  # host cond, host uncond, 2 concepts x 2: no reference row
    for name in layers:
        pass1, pass2 = seen[name]
        assert torch.equal(pass2[0], pass1[0]), name  # host cond row: pass 1's output, as kept
        assert not torch.allclose(pass2[1], pass1[1], atol=1e-3), name  # host uncond row: its own


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])  # fresh noise each step; a history of outputs
@pytest.mark.parametrize("share_uncond", [True, False])
def test_a_background_from_pass_1_is_pass_1_outside_the_masks_and_runs_no_host_cond_row(unet, concepts, sampler, share_uncond):
    """``background_from_pass1``: where no mask is, pass 2 takes pass 1's outputs, so with empty masks the image is
    the layout image bitwise; with a mask over the whole image it is the image made with host rows (whose output
    the mask hides). Pass 2 runs per image and call the concept rows and, where concepts share the host's uncond,
    the host uncond row: no host cond row, no layout reference."""
    cond, uncond = _global(2)
    shape, steps = (2, 4, 8, 12), 6
    nothing = run_omg(unet, concepts, cond, uncond, sampler=sampler, latent_shape=shape, steps=steps, share_uncond=share_uncond,
                      masks=torch.zeros(2, 2, 8, 12), background_from_pass1=True, seeds=[3, 4])
    assert torch.equal(nothing.final, nothing.layout)
    counters = nothing.session.counters["pass2"]
    assert counters.calls > 0 and counters.rows == counters.calls * (3 if share_uncond else 4) * 2
    whole = torch.zeros(2, 2, 8, 12)
    whole[0, 0], whole[1, 1] = 1, 1
    runs = [run_omg(unet, concepts, cond, uncond, sampler=sampler, latent_shape=shape, steps=steps, share_uncond=share_uncond,
                    masks=whole, background_from_pass1=background, seeds=[3, 4]) for background in (True, False)]
    torch.testing.assert_close(runs[0].final, runs[1].final, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(runs[0].final, runs[0].layout, atol=1e-2)
