"""sd-webui-omg: OMG (occlusion-friendly multi-concept generation) for the A1111 and Forge WebUIs.

- ``engine/``: the method in plain PyTorch (two passes, rows, attention, LoRA routing, masks).
- ``masks/``: mask sources beyond the engine's attention masks (SAM, detectors, regions).
- ``hosts/``: one adapter per WebUI family, the only code that imports a WebUI.
- ``config`` (the one settings table: validation, infotext, API, X/Y/Z) and ``ui`` (gradio).
Nothing here but ``hosts`` imports the WebUI.
"""
