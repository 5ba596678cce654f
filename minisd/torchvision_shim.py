"""Lets ``segment_anything`` import where torchvision's compiled ops cannot load.

The package registry's only torchvision wheel for torch 2.13 is CUDA-built: beside the CPU
torch its compiled ops do not load, and ``import torchvision`` fails while registering fake
kernels for ``torchvision::nms`` / ``qnms``. ``segment_anything`` imports torchvision (its
resize helpers are pure Python), so the two op schemas are defined, without kernels, before
anything imports it — but only where they are missing: a WebUI's venv may already define
them (its own torchvision, or a ``sitecustomize``), and torch allows one definition per
namespace ("Only a single TORCH_LIBRARY can be used to register the namespace torchvision").
"""
from __future__ import annotations

from importlib import metadata

import torch

OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None


def _defined(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
    except RuntimeError:
        return False
    return True


def torchvision_cannot_load_its_ops() -> bool:
    """A CUDA-built torchvision beside a CPU torch (a working torchvision registers the ops itself on import)."""
    try:
        version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return False
    return "+cpu" in torch.__version__ and "+cpu" not in version


def missing_ops() -> list[str]:
    """The schemas of ``OPS`` that nothing has defined yet."""
    return [schema for schema in OPS if not _defined(schema.split("(", 1)[0])]


def ensure_torchvision_ops() -> None:
    """Define the missing ``torchvision::`` op schemas where torchvision cannot load its own (none
    where another module defined them already). Idempotent."""
    global _library
    missing = missing_ops() if torchvision_cannot_load_its_ops() else []
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF" if len(missing) == len(OPS) else "FRAGMENT")
    for schema in missing:
        _library.define(schema)
