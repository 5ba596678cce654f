"""A miniature Stable Diffusion to run the engine without a WebUI or model weights.

An ldm-shaped UNet (SD1.5's module names, random or toy-world weights), k-diffusion-style
samplers with A1111's CFG batching, OMG's two passes and fast mode driven as a host adapter
drives them, random LoRA deltas, and Segment Anything / detector models built from their
real code with random weights. The toy world, the benchmarks and the tests stand on it.
Imports the engine and the mask sources; never the WebUI and never ``tests``.
"""
