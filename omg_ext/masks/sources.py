"""Concept masks from any source, one entry point for the hosts: ``concept_masks``.

Sources (``MASK_SOURCES``):
- ``attention``: the class-word attention of pass 1 (no extra model);
- ``attention+sam``: SAM prompted with a box and points from each concept's attention
  core; where SAM's mask and the attention disagree badly the attention mask is kept;
- ``detector+sam``: the class words detected in the layout image (GroundingDINO / OWLv2 /
  OWL-ViT), the boxes given to concepts (``box_assign``), SAM on each box;
- ``regions``: the boxes the user drew (or the mask image the user uploaded) as they are;
- ``regions+sam``: the drawn boxes as SAM prompts on the layout image.

Whatever the source, each concept ends with a core at latent resolution, and
``masks.exclusive_masks`` gives the same overlap resolution, dilation and feather. A
concept a source cannot place (no detection, no region, a model file missing) keeps its
attention core, and ``MaskResult.sources`` / ``notes`` say so for the infotext.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy
import torch

from ..config import MASK_SOURCES
from ..engine.masks import MaskResult, attention_cores, concept_name, exclusive_masks
from . import box_assign
from .model_files import MissingModelFile
from .regions import Regions, box_mask, resize_masks, scale_box
from .sam_prompts import bounding_box, prompts_from_attention
from .segment import SamPrompt


DISAGREEMENT_IOU = 0.25
"""attention+sam: below this IoU between SAM's mask and the attention core, the attention is kept."""


@dataclass
class MaskInputs:
    """Everything one image's masks are made from."""

    attention: torch.Tensor
    """[k, h, w] class-word attention of pass 1."""
    latent_hw: tuple[int, int]
    labels: list[str]
    """Class words, one per concept."""
    image: numpy.ndarray | None = None
    """The layout image, H×W×3 uint8 RGB (for SAM and the detector)."""
    groups: list[list[int]] = field(default_factory=list)
    order: str = "attention"
    dilation: int = 0
    feather: int = 0
    regions: Regions | None = None
    """What the user drew or uploaded."""


@dataclass
class MaskModels:
    """How the optional models are obtained (the host decides folders and device; tests inject)."""

    sam: Callable[[], Callable[[numpy.ndarray, list[SamPrompt]], list[torch.Tensor]]] | None = None
    """Returns ``segment(image, prompts) -> masks``; may raise ``MissingModelFile``."""
    detector: Callable[[], object] | None = None
    """Returns an object with ``detect(image, words) -> {word: [(score, box)]}``; may raise ``MissingModelFile``."""


def concept_masks(source: str, inputs: MaskInputs, models: MaskModels | None = None) -> MaskResult:
    """Exclusive soft masks [k, H, W] at latent resolution for one image, with the source used per concept."""
    if source not in MASK_SOURCES:
        raise ValueError(f"mask source must be one of {', '.join(MASK_SOURCES)}, got {source!r}")
    models = models or MaskModels()
    k, hw = inputs.attention.shape[0], tuple(inputs.latent_hw)
    binary, evidence, notes = attention_cores(inputs.attention, hw, groups=inputs.groups, order=inputs.order,
                                              labels=inputs.labels)
    cores, sources = list(binary), ["attention"] * k
    if source != "attention":
        try:
            found = _found(source, inputs, models, binary, evidence, notes)
        except MissingModelFile as e:
            found = None
            notes.append(f"{e} — attention masks used instead")
        except Exception as e:  # noqa: BLE001 - a model failing at run time (out of memory, a bad file) must not lose the image
            logging.getLogger("sd-webui-omg").exception("OMG: mask source %s failed", source)
            found = None
            notes.append(f"OMG: {source} failed ({type(e).__name__}: {e}) — attention masks used instead")
        for j in range(k):
            name = concept_name(j, inputs.labels)
            core = found.get(j) if found is not None else None
            if core is None:
                if found is not None:
                    notes.append(f"{name}: {source} gave no mask, attention mask used")
                sources[j] = "attention (fallback)"
                continue
            if source == "attention+sam" and bool(cores[j].any()):
                overlap = _iou(core, cores[j])
                if overlap < DISAGREEMENT_IOU:
                    notes.append(f"{name}: SAM disagrees with the attention (IoU {overlap:.2f}), attention mask kept")
                    sources[j] = "attention (SAM disagreed)"
                    continue
            cores[j], sources[j] = core, source
    result = exclusive_masks(torch.stack(cores), evidence, dilation=inputs.dilation, feather=inputs.feather,
                             labels=inputs.labels, notes=notes)
    result.sources = sources
    return result


def _found(source: str, inputs: MaskInputs, models: MaskModels, attention_masks, evidence, notes) -> dict[int, torch.Tensor]:
    """Cores at latent resolution for the concepts the source could place."""
    hw = tuple(inputs.latent_hw)
    regions = inputs.regions
    if source.startswith("regions") and (regions is None or not (regions.boxes or regions.masks)):
        raise MissingModelFile("OMG: no regions were drawn or uploaded")
    if source == "regions":
        found = {j: resize_masks(m[None], hw)[0] for j, m in regions.masks.items()}
        found.update({j: box_mask(box, hw, regions.canvas_hw) for j, box in regions.boxes.items()})
        return {j: m for j, m in found.items() if bool(m.any())}
    if inputs.image is None:
        raise ValueError(f"mask source {source} needs the layout image")
    image_hw = inputs.image.shape[:2]
    if source == "regions+sam":
        prompts = {j: SamPrompt(_mask_box(m, image_hw)) for j, m in regions.masks.items() if bool(m.any())}
        prompts.update({j: SamPrompt(scale_box(box, regions.canvas_hw, image_hw)) for j, box in regions.boxes.items()})
    elif source == "attention+sam":
        prompts = {j: p for j, p in enumerate(prompts_from_attention(attention_masks, evidence, image_hw)) if p is not None}
    else:
        prompts = _detected_prompts(inputs, models, image_hw, notes)
    if not prompts:
        return {}
    if models.sam is None:
        raise MissingModelFile("OMG: Segment Anything is not available")
    masks = models.sam()(inputs.image, list(prompts.values()))
    return {j: resize_masks(m[None], hw)[0] for j, m in zip(prompts, masks) if bool(m.any())}


def _detected_prompts(inputs: MaskInputs, models: MaskModels, image_hw, notes) -> dict[int, SamPrompt]:
    """Detect each class word, give the boxes to concepts, one box prompt per placed concept."""
    if models.detector is None:
        raise MissingModelFile("OMG: no zero-shot detector is available")
    words: dict[str, list[int]] = {}
    for j, label in enumerate(inputs.labels):
        words.setdefault(label.strip().lower(), []).append(j)
    detections = models.detector().detect(inputs.image, list(words))
    prompts = {}
    for word, concepts in words.items():
        boxes = box_assign.distinct(detections.get(word, []), len(concepts))
        chosen, more = box_assign.assign(concepts, boxes, inputs.attention, image_hw, inputs.order, inputs.labels)
        notes += more
        prompts.update({j: SamPrompt(box) for j, box in chosen.items()})
    return dict(sorted(prompts.items()))


def _mask_box(mask: torch.Tensor, image_hw) -> tuple:
    """The bounding box in image pixels of an uploaded region mask (its SAM prompt)."""
    return bounding_box(mask, (image_hw[0] / mask.shape[0], image_hw[1] / mask.shape[1]))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0
