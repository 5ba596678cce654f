"""Test-session setup: ``segment_anything`` must import beside this registry's CUDA-built torchvision
(``minisd.torchvision_shim``, which defines its two op schemas only where nothing has)."""
from minisd.torchvision_shim import ensure_torchvision_ops

ensure_torchvision_ops()
