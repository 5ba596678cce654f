"""``on_cfg_denoiser`` / ``on_cfg_after_cfg`` / ``remove_callbacks_for_function`` and their params as in A1111 1.10.1."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_cfg_denoiser": [], "callbacks_cfg_after_cfg": []}


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def _registrar(kind: str):
    def on(callback, *, name=None):
        callback_map[f"callbacks_{kind}"].append(ScriptCallback("test", callback, name))
    return on


def _caller(kind: str):
    def call(params):
        for c in callback_map[f"callbacks_{kind}"]:
            c.callback(params)
    return call


on_cfg_denoiser, cfg_denoiser_callback = _registrar("cfg_denoiser"), _caller("cfg_denoiser")
on_cfg_after_cfg, cfg_after_cfg_callback = _registrar("cfg_after_cfg"), _caller("cfg_after_cfg")


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)
