"""Host adapters: the only code that imports a WebUI's ``modules.*`` or Forge's ``backend``.

One adapter per WebUI family (``a1111``, ``forge``) plus the host side of the mask models.
They may import everything in ``omg_ext``; every patch they make is undone when the job
ends, on success, exception or interrupt.
"""
from __future__ import annotations

import importlib.util


def running_forge() -> bool:
    """Forge ships ``modules_forge`` beside A1111's ``modules``; A1111 does not."""
    return importlib.util.find_spec("modules_forge") is not None
