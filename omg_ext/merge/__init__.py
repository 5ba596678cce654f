"""Many concept LoRAs merged into one (LoRACLR, with Mix-of-Show's least-squares fusion and the plain sum beside
it), host-neutral: ``record`` samples each layer's inputs while a concept's LoRA acts, ``fit`` solves each layer,
``lora_out`` writes a kohya file, ``merge`` runs the whole. Imports the engine at most; never the WebUI, the mask
sources or the host adapters.
"""
