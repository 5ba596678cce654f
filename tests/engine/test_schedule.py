"""The blend start as a timestep: a fraction of pass 1's calls is the same fraction of its steps."""
import math

import pytest
import torch

from omg_ext.engine.record import PassRecord
from minisd.runs import SCHEDULE
from minisd.sampling import generate


def _record(timesteps):
    record = PassRecord()
    for t in timesteps:
        record.add(torch.zeros(1), torch.tensor([t]), torch.zeros(1))
    return record


def test_threshold_edges():
    record = _record([900.0, 700.0, 500.0, 300.0, 100.0])
    assert record.threshold(0.0) == math.inf
    assert record.threshold(1.0) == record.threshold(0.9) == -math.inf  # 4.5 rounds to 5 of 5: nothing to blend
    assert record.threshold(0.32) == 500.0  # 1.6 rounds to 2: the first 2 steps are replayed
    assert record.threshold(0.5) == 300.0  # 2.5 rounds half up


@pytest.mark.parametrize("sampler,steps,calls_per_step", [("euler", 7, 1), ("dpmpp_2m", 10, 1), ("heun", 8, 2)])
@pytest.mark.parametrize("split", [False, True])
def test_threshold_selects_the_last_steps_for_any_sampler(sampler, steps, calls_per_step, split):
    seen = []

    def model_fn(x, t, c, rows):
        seen.append(float(t.max()))
        return torch.zeros_like(x)

    generate(model_fn, SCHEDULE, sampler, {"context": torch.zeros(1, 1, 1)}, {"context": torch.zeros(1, 1, 1)},
             seed=0, steps=steps, latent_shape=(1, 4, 8, 8), batch_cond_uncond=not split)
    threshold = _record(seen).threshold(0.32)
    first_blended_step = math.floor(0.32 * steps + 0.5)
    sigmas = SCHEDULE.get_sigmas(steps)
    assert threshold == pytest.approx(float(SCHEDULE.sigma_to_t(sigmas[first_blended_step:first_blended_step + 1])[0]), abs=1e-3)
    blended_calls = sum(t <= threshold for t in seen)
    per_eval = 2 if split else 1
    # heun: its last step evaluates once, but the corrector of the step before the start runs at the start's sigma
    assert blended_calls == per_eval * (steps - first_blended_step) * calls_per_step


def test_the_first_blended_step_rounds_half_up_in_both_modes():
    """0.35 of 30 steps is 10.5: both passes and fast mode (``a1111.py``'s step counter) start at step 11."""
    from omg_ext.engine.record import first_blended
    assert [first_blended(0.35, n) for n in (20, 30, 10, 70)] == [7, 11, 4, 25]
    assert float(_record(list(range(30, 0, -1))).threshold(0.35)) == 30 - 11
