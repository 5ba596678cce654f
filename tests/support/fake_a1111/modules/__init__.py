from . import prompt_parser, rng, script_callbacks, sd_samplers_common, shared  # noqa: F401
