"""Pass 2 sized to the memory: the row meter, the budget, and the chunked calls they give."""
import logging

import pytest
import torch

from omg_ext.engine.memory import LiveBytes, MemoryBudget, measure_peak
from omg_ext.engine.session import Concept, OmgSession
from minisd.loras import random_concept_deltas
from minisd.runs import run_omg
from minisd.unet import TinyUNet, text_context as _ctx, unet_fn

CTX = 64



@pytest.fixture(scope="module")
def unet():
    return TinyUNet(context_dim=CTX, seed=0)


@pytest.fixture(scope="module")
def concepts(unet):
    return [Concept({"context": _ctx(10 + j)}, {"context": _ctx(20 + j)}, random_concept_deltas(unet, seed=j), tokens=[5 + j])
            for j in range(3)]


def test_live_bytes_counts_each_storage_once_while_it_lives():
    with LiveBytes() as meter:
        a = torch.zeros(1000)            # 4000 bytes
        view = a[:10]                    # a view: no new storage
        b = torch.zeros(500, dtype=torch.float16)  # 1000 bytes
        assert meter.live == 5000
        del a                            # the view still holds the storage
        assert meter.live == 5000
        del view
        assert meter.live == 1000
        c = torch.zeros(2000)            # 8000 bytes: the peak is 9000, not 13000
        del b, c
    assert (meter.peak, meter.live) == (9000, 0)


@torch.no_grad()
def test_a_unet_call_costs_bytes_in_proportion_to_its_rows_and_area(unet):
    def peak(rows, h, w):
        x = torch.randn(rows, 4, h, w)
        return measure_peak(lambda: unet(x, torch.full((rows,), 500.0), _ctx(1, rows)), x.device)[1]

    one = peak(1, 16, 16)
    assert one > 16 * 16 * 32 * 4  # at least one full-resolution activation of 32 channels
    assert peak(4, 16, 16) == pytest.approx(4 * one, rel=0.1)
    assert peak(1, 32, 24) == pytest.approx(3 * one, rel=0.25)  # activations grow with the area; text does not


def test_rows_that_fit_follow_the_budget_the_margin_and_the_area(caplog):
    budget = MemoryBudget(budget_bytes=10_000, margin=0.8)
    x = torch.zeros(2, 4, 8, 8)
    assert budget.rows(x, smallest=2) is None  # nothing measured yet: no limit
    assert budget.wants_measure(x.device)
    budget.measure(lambda: torch.zeros(250 * 2), x)  # 1000 bytes per row at 8x8
    assert not budget.wants_measure(x.device)
    assert budget.rows(x, smallest=2) == 8
    assert budget.row_bytes((16, 8)) == 2000 and budget.rows(torch.zeros(1, 4, 16, 8), smallest=2) == 4
    with caplog.at_level(logging.WARNING):
        assert budget.rows(torch.zeros(1, 4, 64, 64), smallest=2) == 2  # 64000 bytes a row: one unit at a time
        assert budget.rows(torch.zeros(1, 4, 64, 64), smallest=2) == 2
    assert caplog.text.count("OMG: 0 MB of memory for pass 2 but one row needs 0.1 MB: running 2 rows per call") == 1
    assert MemoryBudget().rows(x, smallest=2) is None  # CPU without a budget: no limit, nothing measured
    assert not MemoryBudget().wants_measure(torch.device("cpu"))


def test_bad_budgets_are_named():
    with pytest.raises(ValueError, match="memory budget must be a positive number of bytes, got 0"):
        MemoryBudget(budget_bytes=0)
    with pytest.raises(ValueError, match=r"memory margin must be a fraction in \(0, 1\], got 1.5"):
        MemoryBudget(budget_bytes=1, margin=1.5)


class _MeteredUnet:
    """The host's UNet call, each call's rows and peak bytes noted."""

    def __init__(self, unet):
        self.raw, self.calls = unet_fn(unet), []

    def __call__(self, x, t, cond):
        out, peak = measure_peak(lambda: self.raw(x, t, cond), x.device)
        self.calls.append((x.shape[0], peak))
        return out


@torch.no_grad()
@pytest.mark.parametrize("rows_budget", [3, 5, 9])
def test_pass2_calls_stay_within_a_budget_and_give_the_same_image(unet, concepts, rows_budget):
    shape = (2, 4, 12, 20)  # two images of 96x160 pixels, 3 concepts: 2 x (2 + 6) = 16 rows a step
    cond, uncond = {"context": _ctx(1, 2)}, {"context": _ctx(2, 2)}
    whole = run_omg(unet, concepts, cond, uncond, steps=4, latent_shape=shape, blend_start=0.5, seeds=[1, 2])
    probe = MemoryBudget(budget_bytes=1)
    probe.measure(lambda: unet_fn(unet)(torch.zeros(4, 4, 12, 20), torch.full((4,), 500.0), {"context": _ctx(1, 4)}),
                  torch.zeros(4, 4, 12, 20))
    budget = int(probe.measured[0] * rows_budget / 0.8)
    metered = _MeteredUnet(unet)
    chunked = run_omg(unet, concepts, cond, uncond, steps=4, latent_shape=shape, blend_start=0.5, seeds=[1, 2],
                      memory=MemoryBudget(budget_bytes=budget), raw=metered)
    torch.testing.assert_close(chunked.final, whole.final, rtol=1e-3, atol=1e-3)  # batch composition moves floats by ~2e-4
    p1 = chunked.session.counters["pass1"].calls
    pass2 = metered.calls[p1:]
    assert pass2 and max(rows for rows, _ in pass2) <= rows_budget
    total = chunked.session.counters["pass2"].rows
    assert sum(rows for rows, _ in pass2) == total and total % 16 == 0  # every row of every blended step, once
    assert max(peak for _, peak in pass2) <= 1.1 * budget * 0.8 + 1


@torch.no_grad()
def test_a_budget_below_one_unit_runs_a_unit_at_a_time_and_says_so(unet, concepts, caplog):
    metered = _MeteredUnet(unet)
    cond, uncond = {"context": _ctx(1)}, {"context": _ctx(2)}
    whole = run_omg(unet, concepts, cond, uncond, steps=3, blend_start=0.0)
    with caplog.at_level(logging.WARNING):
        r = run_omg(unet, concepts, cond, uncond, steps=3, blend_start=0.0, memory=MemoryBudget(budget_bytes=1000), raw=metered)
    torch.testing.assert_close(r.final, whole.final, rtol=1e-3, atol=1e-3)  # batch composition moves floats by ~2e-4
    pass2 = [rows for rows, _ in metered.calls[r.session.counters["pass1"].calls:]]
    assert max(pass2) == 2 and caplog.text.count("OMG: 0 MB of memory for pass 2") == 1


@torch.no_grad()
@pytest.mark.parametrize("stage", ["pass1", "pass2"])
def test_out_of_memory_leaves_the_model_as_it_was(unet, concepts, stage):
    """Pass 1 out of memory: the host's error, every patch gone; pass 2 at one unit (a host row and its
    reference row, which fit no 1-row call): the same."""
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fits = 0 if stage == "pass1" else 1
    raw = unet_fn(unet)

    def small_gpu(x, t, cond):
        if x.shape[0] > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return raw(x, t, cond)

    cond, uncond = {"context": _ctx(1)}, {"context": _ctx(2)}
    with pytest.raises(torch.OutOfMemoryError):
        run_omg(unet, concepts, cond, uncond, steps=3, blend_start=0.0, raw=small_gpu, batch_cond_uncond=False,
                keep_attention=False)
    for name, module in unet.named_modules():
        assert "forward" not in module.__dict__, name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not getattr(module, "processor", None), name
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # and the next job is the job made on a fresh start
    fresh = run_omg(TinyUNet(context_dim=CTX, seed=0), concepts, cond, uncond, steps=3, blend_start=0.0)
    again = run_omg(unet, concepts, cond, uncond, steps=3, blend_start=0.0)
    assert torch.equal(again.final, fresh.final)
