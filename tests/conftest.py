"""Test-session setup: ``segment_anything`` must import beside this registry's CUDA-built torchvision
(``minisd.torchvision_shim``, which defines its two op schemas only where nothing has); under pytest-xdist
each worker computes on one thread (two workers of two threads each on a 2-core machine ran slower than one)."""
import os

import torch

from minisd.torchvision_shim import ensure_torchvision_ops

ensure_torchvision_ops()
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
