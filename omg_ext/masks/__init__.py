"""Mask sources beyond the engine's attention masks: SAM, zero-shot detectors, drawn regions.

``sources.concept_masks`` is the one entry; the rest are its parts (SAM prompts, box
assignment, regions, model files and their status). May import ``omg_ext.engine.masks``
(every source ends in the same exclusive masks) and ``omg_ext.config``; never the WebUI
nor ``omg_ext.hosts``: model folders and devices come in from the host adapter.
"""
