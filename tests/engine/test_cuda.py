"""OMG on a CUDA GPU in fp16, as the WebUIs run it: skipped without one (``benchmarks/gpu_check.sh`` runs it).

The CPU suite proves the same invariants with CPU kernels; these add what only a GPU
has: its fp16 kernels, its allocator (the memory meter and budget) and a real
out-of-memory error from a capped allocator.
"""
import copy
import logging

import pytest
import torch

from omg_ext.engine.memory import MemoryBudget, free_device_bytes, measure_peak
from omg_ext.engine.session import Concept
from minisd.loras import random_concept_deltas
from minisd.runs import SCHEDULE, run_omg
from minisd.sampling import generate
from minisd.unet import TinyUNet, text_context as _ctx, unet_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")

CTX = 64
LATENT = (2, 4, 48, 40)  # two images of 384x320 pixels
RUN = dict(steps=6, latent_shape=LATENT, blend_start=0.3, seeds=[1, 2])
CUDA = torch.device("cuda")



@pytest.fixture(scope="module")
def unet():
    return TinyUNet(model_channels=64, context_dim=CTX, seed=0)


def _concepts(unet, device, dtype=torch.float32):
    """Concepts whose conditioning lives where the UNet does (the LoRA deltas follow the layer by themselves)."""
    return [Concept({"context": _ctx(10 + j).to(device, dtype)}, {"context": _ctx(20 + j).to(device, dtype)},
                    random_concept_deltas(unet, seed=j + 1), tokens=[5 + j]) for j in range(3)]


COND, UNCOND = {"context": _ctx(1, 2)}, {"context": _ctx(2, 2)}


def _masks():
    m = torch.zeros(2, 3, *LATENT[-2:])
    m[:, 0, :, :12], m[:, 1, :, 12:26], m[:, 2, :, 26:] = 1, 1, 1
    return m


def _plain(unet, device, dtype):
    raw = unet_fn(unet)

    def fn(x, t, c, rows):
        return raw(x.to(device, dtype), t.to(device), {k: v.to(device, dtype) for k, v in c.items()}).float().cpu()
    return generate(fn, SCHEDULE, "euler", COND, UNCOND, seed=0, steps=RUN["steps"], latent_shape=LATENT, seeds=RUN["seeds"])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_omg_in_fp16_on_cuda_is_as_close_to_fp32_as_the_plain_model_is(unet):
    half = copy.deepcopy(unet).to(CUDA, torch.float16)
    plain_error = _rel(_plain(half, CUDA, torch.float16), _plain(unet, "cpu", torch.float32))
    full = run_omg(unet, _concepts(unet, "cpu"), COND, UNCOND, masks=_masks(), **RUN)
    omg = run_omg(half, _concepts(half, CUDA, torch.float16), COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA, **RUN)
    assert torch.isfinite(omg.final).all()
    assert _rel(omg.final, full.final) <= 1.25 * plain_error + 1e-3
    assert omg.session.attention_maps().dtype == torch.float32


@torch.no_grad()
def test_pass1_in_fp16_on_cuda_is_the_plain_image_bitwise(unet):
    half = copy.deepcopy(unet).to(CUDA, torch.float16)
    r = run_omg(half, _concepts(half, CUDA, torch.float16), COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA,
                **{**RUN, "blend_start": 1.0})
    assert torch.equal(r.layout, _plain(half, CUDA, torch.float16)) and torch.equal(r.final, r.layout)


@torch.no_grad()
def test_pass2_calls_stay_within_a_budget_measured_by_the_cuda_allocator(unet):
    half = copy.deepcopy(unet).to(CUDA, torch.float16)
    concepts = _concepts(half, CUDA, torch.float16)
    raw, calls = unet_fn(half), []

    def metered(x, t, c):
        out, peak = measure_peak(lambda: raw(x, t, c), x.device)
        calls.append((x.shape[0], peak))
        return out

    free = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA, **RUN)
    assert free.session.memory.measured is not None  # CUDA: free memory read, pass 1 measured by default
    assert free_device_bytes(CUDA) > 0
    row_bytes = free.session.memory.measured[0]
    budget = int(row_bytes * 5 / 0.8)  # 5 rows a call instead of 2 x (2 + 1 + 6)
    r = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA,
                memory=MemoryBudget(budget_bytes=budget), raw=metered, **RUN)
    pass2 = calls[r.session.counters["pass1"].calls:]
    assert max(rows for rows, _ in pass2) <= 5
    assert max(peak for _, peak in pass2) <= 1.1 * budget
    torch.testing.assert_close(r.final, free.final, rtol=2e-2, atol=2e-2)  # fp16 batch composition


@torch.no_grad()
def test_a_real_cuda_out_of_memory_in_pass2_is_halved_and_the_job_finishes(unet, caplog):
    half = copy.deepcopy(unet).to(CUDA, torch.float16)
    concepts = _concepts(half, CUDA, torch.float16)
    whole = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA, **RUN)
    row_bytes = whole.session.memory.measured[0]
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    allowed = torch.cuda.memory_reserved(CUDA) + 6 * row_bytes  # room for a few rows, not for 18
    torch.cuda.set_per_process_memory_fraction(allowed / total, CUDA)
    try:
        with caplog.at_level(logging.WARNING):
            cut = run_omg(half, concepts, COND, UNCOND, masks=_masks(), dtype=torch.float16, device=CUDA,
                          memory=MemoryBudget(free_bytes=lambda device: None), **RUN)  # only the OOM path sizes calls
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()
    assert "OMG: out of memory in a UNet call of 18 rows" in caplog.text
    assert cut.session.row_limit.rows < 18
    torch.testing.assert_close(cut.final, whole.final, rtol=2e-2, atol=2e-2)
