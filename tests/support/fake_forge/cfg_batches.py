"""Forge's CFG batching for txt2img (no areas), as the UNet wrapper sees it.

Forge stacks the uncond rows before the cond rows in one call and says so in
``cond_or_uncond`` (0 cond, 1 uncond), e.g. ``[1, 0]``; when its memory check fails it makes
one call per chunk (``split=True`` here): ``[1]`` then ``[0]``. A ``control`` (ControlNet) gives
the call's residuals before the wrapper, as Forge's ``calc_cond_uncond_batch`` does.
"""
import math

import torch

COND, UNCOND = 0, 1


def _crossattn(conds):
    """Prompts of different token lengths share a call by repetition to a common length."""
    length = math.lcm(*(c.shape[1] for c in conds))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def sampling_function(unet_patcher, x, sigma, cond, uncond, cond_scale, split=False, control=None):
    model, options = unet_patcher.model, unet_patcher.model_options
    by_kind = {COND: cond, UNCOND: uncond}
    predictions = {}
    for kinds in ([[UNCOND], [COND]] if split else [[UNCOND, COND]]):
        conds = [by_kind[k] for k in kinds]
        c = {"c_crossattn": _crossattn([d["crossattn"] for d in conds]),
             "transformer_options": {**options.get("transformer_options", {}), "cond_or_uncond": list(kinds), "sigmas": sigma}}
        if "vector" in conds[0]:
            c["y"] = torch.cat([d["vector"] for d in conds])
        rows, t = torch.cat([x] * len(kinds)), torch.cat([sigma] * len(kinds))
        if control is not None:
            c["control"], c["control_model"] = control.get_control(rows, t, dict(c), len(kinds)), control
        wrapper = options.get("model_function_wrapper")
        if wrapper is not None:
            out = wrapper(model.apply_model, {"input": rows, "timestep": t, "c": c, "cond_or_uncond": list(kinds)})
        else:
            out = model.apply_model(rows, t, **c)
        predictions.update(zip(kinds, out.chunk(len(kinds))))
    return predictions[UNCOND] + (predictions[COND] - predictions[UNCOND]) * cond_scale
