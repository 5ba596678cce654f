"""Test-session setup.

The registry's only torchvision wheel for torch 2.13 is CUDA-built: next to the CPU torch
its compiled ops cannot load and ``import torchvision`` fails while registering fake
kernels for ``torchvision::nms`` / ``qnms``. ``segment_anything`` imports torchvision (its
resize helpers are pure Python), so the two op schemas are defined, without kernels,
before anything imports it. WebUI environments have a working torchvision.
"""
from importlib import metadata

import torch


def _torchvision_is_cuda_built_beside_cpu_torch() -> bool:
    try:
        version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return False
    return "+cpu" in torch.__version__ and "+cpu" not in version


if _torchvision_is_cuda_built_beside_cpu_torch():
    _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
