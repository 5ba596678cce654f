"""``benchmarks/bench_engine.py`` runs every method it reports (its fast mode once called itself by a name clash),
and its ``--unet sd15`` is SD1.5's UNet to the weight."""
import importlib.util
from pathlib import Path

import pytest
import torch

from minisd.unet import TinyUNet

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_runs_and_counts_its_rows(bench):
    rows = {method: bench.measure(method, 8, 2, 1)["rows"] for method in bench.METHODS}
    assert rows["plain"] == 2 * 2  # 2 steps, a cond and an uncond row each
    assert rows["fast"] == rows["plain"]  # one pass, the concepts in the host's rows
    assert rows["one pass"] == 2 + 1 + 2  # step 1 the host's two rows, step 2 (blended) its uncond and 2 concept rows
    assert rows["plain"] < rows["engine"] < rows["official"]


def test_the_sd15_unet_has_sd15s_weights(bench):
    with torch.device("meta"):
        unet = TinyUNet(**bench.UNETS["sd15"], seed=None)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet (ldm v1 config)
