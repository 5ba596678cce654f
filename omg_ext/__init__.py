"""OMG engine: occlusion-friendly multi-concept generation in plain PyTorch.

The package never imports the WebUI; ``omg_ext.hosts`` holds the only host code.
"""
