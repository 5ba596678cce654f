"""A minimal stand-in for the ``modules.*`` surface of A1111 v1.10.1 the adapter touches.

Only what ``omg_ext.hosts.a1111`` calls, with the real signatures
(``modules/script_callbacks.py``, ``modules/rng.py``, ``modules/shared.py``,
``modules/prompt_parser.py``, ``modules/sd_samplers_common.py``). ``install()`` puts the
package on ``sys.modules`` as ``modules`` for one test.
"""
import contextlib
import sys
import types

from . import modules


@contextlib.contextmanager
def installed():
    saved = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith("modules.")}
    for name in list(saved):
        del sys.modules[name]
    sys.modules["modules"] = modules
    for sub in ("script_callbacks", "rng", "shared", "prompt_parser", "sd_samplers_common", "devices", "call_queue",
                "sd_hijack", "textual_inversion", "sd_models"):
        sys.modules[f"modules.{sub}"] = getattr(modules, sub)
    sys.modules["modules.textual_inversion.textual_inversion"] = modules.textual_inversion.textual_inversion
    try:
        yield modules
    finally:
        for name in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
            del sys.modules[name]
        sys.modules.update(saved)


_ = types
