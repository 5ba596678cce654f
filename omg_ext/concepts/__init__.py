"""Concepts from pictures (seed 002): a token per concept and its mask, learnt together by EM.

Plain PyTorch, host-neutral: a host hands over its model through ``host.ConceptModel``; the loop
(``extract``) alternates masks from the tokens' cross-attention (``estep``) with optimiser steps on
the tokens — and optionally a small LoRA per concept — under a diffusion loss inside each mask
(``mstep``). ``files`` writes what the WebUIs load: textual-inversion embeddings and kohya LoRAs.
"""
