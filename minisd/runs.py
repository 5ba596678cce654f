"""Drive both OMG passes with the test sampler, the way a host adapter does."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omg_ext.engine.record import threshold
from omg_ext.engine.session import OmgSession
from minisd.sampling import DiscreteSchedule, generate, img2img_sigmas
from minisd.unet import unet_fn

SCHEDULE = DiscreteSchedule()


@dataclass
class OmgResult:
    layout: torch.Tensor
    final: torch.Tensor
    masks: torch.Tensor
    session: OmgSession


def _host_calls(session, raw, *, dtype=None, device=None, fail_at=None):
    """The sampler's model function: every call through the session, on ``device`` in ``dtype``
    (the sampler keeps float32 on the CPU); ``fail_at="callN"`` raises in the N-th call."""
    invocations = [0]

    def model_fn(x, t, c, rows):
        invocations[0] += 1
        if fail_at == f"call{invocations[0]}":
            raise RuntimeError(f"injected failure at {fail_at}")
        if dtype is None and device is None:
            return session(raw, x, t, c, rows)
        to = dict(device=device, dtype=dtype)
        return session(raw, x.to(**to), t.to(device), {k: v.to(**to) for k, v in c.items()}, rows).float().cpu()
    return model_fn


def run_omg(unet, concepts, cond, uncond, *, sampler="euler", seed=0, steps=8, latent_shape=(1, 4, 16, 16),
            blend_start=0.3, layout=True, self_attention_until=0.0, layout_until=1.0, share_uncond=False,
            background_from_pass1=False, max_rows=None, masks=None,
            dilation=0, feather=0, groups=None, batch_cond_uncond=True, cfg_scale=7.0,
            fail_at=None, seeds=None, dtype=None, device=None, memory=None, raw=None, keep_attention=True,
            init=None, strength=1.0) -> OmgResult:
    """Pass 1, masks, pass 2. ``fail_at`` injects an exception at a stage.

    ``masks``: a tensor [images, concepts, H, W], a function of the session and the layout
    latent after pass 1 giving one, or None for the session's attention masks. ``seeds``: one per image.
    ``dtype``: the UNet's half precision; its calls (and so the engine) see latents and
    conditioning in it, the sampler keeps float32, as the WebUIs do. ``device``: where the UNet
    (and concepts) are: the calls move there and back. ``memory``: the session's
    ``MemoryBudget``; ``raw``: the host's UNet call (default: the tiny UNet's); ``keep_attention``: pass 2's
    layout from pass 1's kept attention outputs (default) or from reference rows; ``init``, ``strength``: both
    passes img2img from ``init`` (``sampling.generate``).
    """
    session = OmgSession(unet, concepts, images=latent_shape[0], layout=layout, max_rows=max_rows, memory=memory,
                         keep_attention=keep_attention)
    raw = raw or unet_fn(unet)
    kwargs = dict(seed=seed, steps=steps, latent_shape=latent_shape, cfg_scale=cfg_scale, batch_cond_uncond=batch_cond_uncond,
                  seeds=seeds, init=init, strength=strength)

    model_fn = _host_calls(session, raw, dtype=dtype, device=device, fail_at=fail_at)

    def stage(name):
        if fail_at == name:
            raise RuntimeError(f"injected failure at {name}")

    with session.installed():
        stage("installed")
        session.begin_pass1()
        layout_latent = generate(model_fn, SCHEDULE, sampler, cond, uncond, **kwargs)
        stage("pass1")
        if masks is None:
            masks = torch.stack([m.masks for m in session.attention_masks(dilation=dilation, feather=feather, groups=groups)])
        elif callable(masks):
            masks = masks(session, layout_latent)
        stage("masks")
        session.begin_pass2(masks, blend_start=blend_start, self_attention_until=self_attention_until, layout_until=layout_until,
                            share_uncond=share_uncond, background_from_pass1=background_from_pass1)
        final = generate(model_fn, SCHEDULE, sampler, cond, uncond, **kwargs)
        stage("pass2")
    return OmgResult(layout_latent, final, masks, session)


def run_fast(unet, concepts, cond, uncond, *, sampler="euler", seed=0, steps=8, latent_shape=(1, 4, 16, 16),
             blend_start=0.3, masks=None, dilation=0, feather=0, cfg_scale=7.0, seeds=None, dtype=None,
             device=None, share_uncond=False, init=None, strength=1.0, concept_rows=False) -> OmgResult:
    """Fast mode (one pass): ``masks`` as for ``run_omg`` but a function of the session alone
    (there is no layout latent), or None for the attention masks of the steps before the blend start;
    ``init``, ``strength``: img2img from ``init``; ``concept_rows``: the "one pass" mode (concept rows from the
    blend start)."""
    session = OmgSession(unet, concepts, images=latent_shape[0])
    model_fn = _host_calls(session, unet_fn(unet), dtype=dtype, device=device)
    sigmas = SCHEDULE.get_sigmas(steps) if init is None else img2img_sigmas(SCHEDULE.get_sigmas(steps), strength)
    timesteps = [float(SCHEDULE.sigma_to_t(s)) for s in sigmas[:-1]]
    if masks is None:
        def masks(s):
            return torch.stack([m.masks for m in s.attention_masks(dilation=dilation, feather=feather)])
    elif not callable(masks):
        given = masks
        masks = lambda s: given  # noqa: E731
    with session.installed():
        start_t = threshold(timesteps, blend_start)
        session.begin_fast(lambda t: float(t.max()) <= start_t, masks, share_uncond=share_uncond, concept_rows=concept_rows)
        final = generate(model_fn, SCHEDULE, sampler, cond, uncond, seed=seed,
                         steps=steps, latent_shape=latent_shape, cfg_scale=cfg_scale, seeds=seeds, init=init, strength=strength)
    return OmgResult(None, final, None if session.masks is None else session.masks.masks, session)


def concept_on_cond_rows(unet, concept):
    """A sampler model function: cond rows run with the concept's LoRA merged and its prompt, uncond rows
    are the plain model's with the host's conditioning (shared concept guidance over the whole image)."""
    from minisd.loras import merged

    lora_fn, plain_fn = unet_fn(merged(unet, concept.deltas)), unet_fn(unet)

    def model_fn(x, t, c, rows):
        out = plain_fn(x, t, c)
        is_cond = torch.tensor([r.is_cond for r in rows])
        context = concept.cond["context"].expand(int(is_cond.sum()), -1, -1)
        out[is_cond] = lora_fn(x[is_cond], t[is_cond], {"context": context})
        return out
    return model_fn
