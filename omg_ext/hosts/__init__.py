"""Host adapters: the only code that imports a WebUI's ``modules.*`` or Forge's ``backend``."""
from __future__ import annotations

import importlib.util


def running_forge() -> bool:
    """Forge ships ``modules_forge`` beside A1111's ``modules``; A1111 does not."""
    return importlib.util.find_spec("modules_forge") is not None
