"""A minimal stand-in for the parts of Forge (``lllyasviel/stable-diffusion-webui-forge``) the adapter touches.

Forge keeps A1111's ``modules.*`` for processing, so ``installed()`` puts the A1111
stand-in's ``modules`` on ``sys.modules`` too, plus this folder's ``backend`` package
(patchers, LoRA loader, attention function, memory management) with the real
signatures and semantics: a patcher clone deep-copies its ``model_options``; replace
patches get projected q, k, v; the CFG batch is built uncond-first and may be split;
CLIP LoRA patches are merged when the patcher is loaded and the original weights put
back when another patcher of the same model is.
"""
import contextlib
import sys

from .. import fake_a1111
from . import backend
from .backend import attention, memory_management, sampling_function
from .backend.patcher import base, clip, lora, unet

_MODULES = {
    "backend": backend, "backend.attention": attention, "backend.memory_management": memory_management,
    "backend.sampling_function": sampling_function, "backend.patcher": backend.patcher,
    "backend.patcher.base": base, "backend.patcher.clip": clip, "backend.patcher.lora": lora,
    "backend.patcher.unet": unet,
}


@contextlib.contextmanager
def installed():
    saved = {k: sys.modules[k] for k in _MODULES if k in sys.modules}
    sys.modules.update(_MODULES)
    try:
        with fake_a1111.installed() as modules:
            yield modules
    finally:
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
