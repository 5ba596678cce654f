from . import call_queue, devices, prompt_parser, rng, script_callbacks, sd_hijack, sd_models, sd_samplers_common, shared  # noqa: F401
from . import textual_inversion  # noqa: F401
from .textual_inversion import textual_inversion as _ti  # noqa: F401
