"""The one-pass mode (the host's rows until the blend start, then concept rows of their own, the background
their mean): its exact invariants, and that it is not fast mode's masked rows."""
import pytest
import torch

from omg_ext.engine.rows import roles_cond_then_uncond
from omg_ext.engine.session import OmgSession
from minisd.loras import merged
from minisd.runs import SCHEDULE, run_fast
from minisd.sampling import generate
from minisd.unet import text_context, unet_fn

HW = (12, 20)
"""A non-square latent: a transposed mask would show."""


def _masks(images=1):
    """[images, 2, H, W]: concept 1 on the left columns, concept 2 on the right ones (soft at 0.6 in the second
    image), the middle columns background."""
    m = torch.zeros(images, 2, *HW)
    m[:, 0, :, :7] = 1
    m[:, 1, :, 13:] = 1
    m[1:, 1, :, 13:] = 0.6
    return m


def _call(unet, concepts, masks, concept_rows, share_uncond=True):
    """One blending call of two images (cond rows, then uncond rows) through a session in the one-pass or fast mode."""
    x, t = torch.randn(4, 4, *HW, generator=torch.Generator().manual_seed(5)), torch.full((4,), 500.0)
    host = {"context": torch.cat([text_context(1), text_context(3), text_context(2), text_context(2)])}
    session = OmgSession(unet, concepts, images=2)
    with session.installed():
        session.begin_fast(lambda t: True, lambda s: masks, share_uncond=share_uncond, concept_rows=concept_rows)
        out = session(unet_fn(unet), x, t, host, roles_cond_then_uncond(2))
    return out, x, t, host, session


@torch.no_grad()
def test_a_blended_call_is_each_concepts_own_row_inside_its_mask_and_their_mean_outside(unet, concepts):
    masks = _masks(2)
    out, x, t, host, session = _call(unet, concepts, masks, concept_rows=True)
    own = [unet_fn(merged(unet, c.deltas))(x[:2], t[:2], {"context": c.cond["context"].expand(2, -1, -1)}) for c in concepts]
    m = masks.unsqueeze(2)  # [images, k, 1, H, W]
    background = (own[0] + own[1]) / 2
    expected = (1 - m.sum(dim=1)) * background + m[:, 0] * own[0] + m[:, 1] * own[1]
    torch.testing.assert_close(out[:2], expected, rtol=1e-4, atol=1e-4)  # merged vs routed LoRA rounding
    host_uncond = unet_fn(unet)(x[2:], t[2:], {"context": host["context"][2:]})
    torch.testing.assert_close(out[2:], host_uncond, rtol=1e-5, atol=1e-5)  # the host's (in a batch of other rows)
    assert session.counters["fast"].rows == 2 + 2 * 2  # the host uncond rows and a row per concept and image: no host cond row
    fast, *_ = _call(unet, concepts, masks, concept_rows=False)  # masked deltas in the host's rows are something else
    assert (fast[:2] - out[:2]).abs().max() > 0.05


@torch.no_grad()
def test_with_own_guidance_every_row_is_a_concepts(unet, concepts):
    masks = _masks(2)
    out, x, t, host, session = _call(unet, concepts, masks, concept_rows=True, share_uncond=False)
    own = [unet_fn(merged(unet, c.deltas))(x[2:], t[2:], {"context": c.uncond["context"].expand(2, -1, -1)}) for c in concepts]
    m = masks.unsqueeze(2)
    expected = (1 - m.sum(dim=1)) * (own[0] + own[1]) / 2 + m[:, 0] * own[0] + m[:, 1] * own[1]
    torch.testing.assert_close(out[2:], expected, rtol=1e-4, atol=1e-4)
    assert session.counters["fast"].rows == 2 * 2 * 2  # 2 concepts x (cond, uncond) x 2 images, no host row


@torch.no_grad()
@pytest.mark.parametrize("blend_start, blended", [(0.5, 3), (0.35, 4)])
def test_rows_are_the_hosts_until_the_blend_start_then_one_plus_a_row_per_concept(unet, concepts, blend_start, blended):
    cond = {"context": torch.cat([text_context(1), text_context(3)])}
    uncond = {"context": text_context(2, rows=2)}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    r = run_fast(unet, concepts, cond, uncond, steps=6, latent_shape=(2, 4, *HW), blend_start=blend_start,
                 share_uncond=True, concept_rows=True)
    counters = r.session.counters["fast"]
    assert counters.calls == 6 and counters.rows == (6 - blended) * 4 + blended * (2 + 2 * 2)
    assert tuple(r.masks.shape) == (2, 2, *HW)  # the attention masks of the steps before the blend start
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


@torch.no_grad()
def test_blend_start_one_is_the_plain_image(unet, concepts):
    cond, uncond = {"context": text_context(1)}, {"context": text_context(2)}
    plain = generate(lambda x, t, c, rows: unet_fn(unet)(x, t, c), SCHEDULE, "euler", cond, uncond, seed=0, steps=6,
                     latent_shape=(1, 4, *HW), cfg_scale=7.0)
    r = run_fast(unet, concepts, cond, uncond, steps=6, latent_shape=(1, 4, *HW), blend_start=1.0, masks=_masks(),
                 concept_rows=True)
    assert torch.equal(r.final, plain)
