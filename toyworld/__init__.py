"""The toy world: a small text-to-image model trained here, identity LoRAs and a scorer.

No real checkpoint or LoRA can be had where this project is tested, so OMG's quality is
measured in a world of our own (DESIGN.md §6): ``scenes`` draws figures with ground truth,
``text`` and ``model`` are an ldm-shaped UNet and a CLIP-shaped text encoder working on
24×24 RGB images, ``lora_files`` reads and writes kohya LoRA / LoHa files, ``scorer``
labels each pixel, ``measures`` turns labels into the numbers the quality benchmark
prints, and ``train`` rebuilds every committed weight file from a seed. Imports the
engine (to run it) but never the WebUI.
"""
