"""A minimal stand-in for the parts of Forge (``lllyasviel/stable-diffusion-webui-forge``) the adapter touches.

Forge keeps A1111's ``modules.*`` for processing, so ``installed()`` puts the A1111
stand-in's ``modules`` on ``sys.modules`` too, plus the ``backend`` names the adapter
imports, served by this folder's small modules: ``backend.attention`` (``attention.py``),
``backend.memory_management`` (``memory.py``) and ``backend.patcher.lora``
(``lora_files.py``). The patchers (``patchers.py``), Forge's CFG batching
(``cfg_batches.py``) and a UNet that honours replace patches (``forge_unet.py``) are used
by the tests directly. ``installed("ldm_patched")`` serves Forge Classic's and reForge's
``ldm_patched`` names instead (``ldm_patched.py``); ``installed("neo")`` Forge Neo's: Forge's
names, with a ``load_lora`` that gives plain LoRA as ``LoRAAdapter`` objects (and the keys left
over, as Neo's does).
"""
import contextlib
import sys
import types

from .. import fake_a1111
from . import attention, ldm_patched, lora_files, memory


def _modules(neo: bool = False) -> dict[str, types.ModuleType]:
    backend, patcher = types.ModuleType("backend"), types.ModuleType("backend.patcher")
    lora = lora_files
    if neo:
        lora = types.ModuleType("backend.patcher.lora")
        lora.__dict__.update({k: getattr(lora_files, k) for k in ("merge_lora_to_weight", "model_lora_keys_unet", "model_lora_keys_clip")})
        lora.load_lora = ldm_patched.neo_load_lora
    backend.attention, backend.memory_management, backend.patcher, patcher.lora = attention, memory, patcher, lora
    return {"backend": backend, "backend.attention": attention, "backend.memory_management": memory,
            "backend.patcher": patcher, "backend.patcher.lora": lora}


@contextlib.contextmanager
def installed(backend: str = "backend"):
    """The stand-in on ``sys.modules``: ``backend`` "backend" (Forge), "neo" (Forge Neo) or "ldm_patched"
    (Forge Classic, reForge)."""
    modules = ldm_patched.modules() if backend == "ldm_patched" else _modules(neo=backend == "neo")
    saved = {k: sys.modules[k] for k in modules if k in sys.modules}
    sys.modules.update(modules)
    try:
        with fake_a1111.installed() as a1111_modules:
            yield a1111_modules
    finally:
        for name in modules:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
