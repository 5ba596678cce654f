"""The blend start as a timestep: the threshold must select exactly the last (1 - s) of the steps."""
import math

import pytest
import torch

from omg_ext.pipeline import NEVER, blend_threshold
from tests.support.omg_run import SCHEDULE
from tests.support.sampling import generate, step_timesteps


def test_blend_threshold_edges():
    ts = [900.0, 700.0, 500.0, 300.0, 100.0]
    assert blend_threshold(ts, 0.0) == math.inf
    assert blend_threshold(ts, 1.0) == NEVER == -math.inf
    assert blend_threshold(ts, 0.9) == NEVER  # rounds to 5 of 5 steps: nothing left to blend
    assert blend_threshold(ts, 0.32) == 500.0  # 0.32 * 5 = 1.6 -> the first 2 steps are not blended
    assert blend_threshold(ts, 0.5) == 300.0  # 2.5 rounds half up -> 3


@pytest.mark.parametrize("karras", [False, True])
def test_step_timesteps_are_the_timesteps_the_sampler_calls_with(karras):
    seen = []

    def model_fn(x, t, c, rows):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    steps = 7
    generate(model_fn, SCHEDULE, "euler", {"context": torch.zeros(1, 1, 1)}, {"context": torch.zeros(1, 1, 1)},
             seed=0, steps=steps, latent_shape=(1, 4, 8, 8), karras=karras)
    sigmas = SCHEDULE.get_sigmas_karras(steps) if karras else SCHEDULE.get_sigmas(steps)
    assert seen == step_timesteps(SCHEDULE, sigmas)
    threshold = blend_threshold(seen, 0.32)
    assert sum(t <= threshold for t in seen) == steps - 2  # round(0.32 * 7) = 2 steps before the blend
