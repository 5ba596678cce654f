from . import call_queue, devices, prompt_parser, rng, script_callbacks, sd_samplers_common, shared  # noqa: F401
