"""Host adapters: the only code that imports a WebUI's ``modules.*`` or Forge's ``backend``.

One module per job: a generation's lifecycle per WebUI family (``a1111``; ``forge``, which
extends it, with ``forge_attention``, ``forge_controlnet``, ``forge_lora`` and
``forge_backend``), and what both share: LoRA files (``loras``), row roles (``row_tracker``),
settings and X/Y/Z (``webui_settings``), script-API shims (``host_api``), ControlNet units,
mask models, pictures, the concept cache. They may import everything in ``omg_ext``; every
patch they make is undone when the job ends, on success, exception or interrupt.
"""
from __future__ import annotations

import importlib.util


def running_forge() -> bool:
    """Forge ships ``modules_forge`` beside A1111's ``modules``; A1111 does not."""
    return importlib.util.find_spec("modules_forge") is not None
