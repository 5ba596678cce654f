"""Forge's ``calc_cond_uncond_batch`` and ``sampling_function_inner`` for txt2img (no areas, no ControlNet).

The chunk list is built cond first, then reversed: a call stacks uncond rows before cond
rows, and ``cond_or_uncond`` (0 cond, 1 uncond) says so. ``split=True`` stands for
Forge's memory check failing for two chunks: one chunk per call.
"""
import math

import torch

COND, UNCOND = 0, 1


def _concat_crossattn(conds):
    length = math.lcm(*(c.shape[1] for c in conds))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def calc_cond_uncond_batch(model, model_options, cond, uncond, x_in, timestep, split=False):
    out = {COND: torch.zeros_like(x_in), UNCOND: torch.zeros_like(x_in)}
    to_run = [(cond, COND), (uncond, UNCOND)]
    while to_run:
        order = list(range(len(to_run)))
        order.reverse()
        batch = order[:1] if split else order
        chunks = [to_run.pop(i) for i in batch]
        cond_or_uncond = [kind for _, kind in chunks]
        input_x = torch.cat([x_in] * len(chunks))
        c = {"c_crossattn": _concat_crossattn([conditioning["crossattn"] for conditioning, _ in chunks])}
        if "vector" in chunks[0][0]:
            c["y"] = torch.cat([conditioning["vector"] for conditioning, _ in chunks])
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        timestep_ = torch.cat([timestep] * len(chunks))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}).chunk(len(chunks))
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(len(chunks))
        for o, kind in zip(output, cond_or_uncond):
            out[kind] += o
    return out[COND], out[UNCOND]


def sampling_function(unet_patcher, x, sigma, cond, uncond, cond_scale, split=False):
    cond_pred, uncond_pred = calc_cond_uncond_batch(unet_patcher.model, unet_patcher.model_options, cond, uncond, x, sigma, split)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
