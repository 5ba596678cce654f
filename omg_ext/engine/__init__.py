"""The OMG method in plain PyTorch: what happens to one generation's UNet calls.

``session.OmgSession`` runs pass 1 (record, capture attention), makes masks and runs
pass 2 (replay, expanded rows, blend), or fast mode's one pass (masked LoRAs and prompts in
the host's rows); ``expand``, ``record``, ``rows``, ``attention``, ``lora``, ``fast``,
``memory`` and ``masks`` are the small objects it uses. Imports torch only: never the
WebUI, never ``omg_ext.masks`` or ``omg_ext.hosts``, never ``omg_ext.config``.
"""
