"""Segment Anything: prompts (a box, positive and negative points) in, one binary mask per prompt out.

The ``segment-anything`` package builds the network; the checkpoint is read with
``torch.load(weights_only=True)`` (tensors only, no pickled code). At most one SAM model is
kept (``ModelSlot``), on the device the host gives, and dropped by ``free()``: the host
frees it on request and before the UNet needs the memory.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy
import torch

from ..config import SAM_MODELS
from .model_files import MissingModelFile

@dataclass
class SamPrompt:
    """One object to segment, in image pixels: a box and labelled points (1 positive, 0 negative)."""

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class ModelSlot:
    """Holds at most one loaded model; asking for another frees the first."""

    def __init__(self) -> None:
        self.key, self.model = None, None

    def get(self, key, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if self.key != key:
            self.free()
            self.model, self.key = load(), key
        return self.model

    def free(self) -> None:
        had = self.model is not None
        self.key, self.model = None, None
        gc.collect()
        if had and torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_sam(kind: str, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A SAM model of ``kind`` with the checkpoint's weights, read safely."""
    from segment_anything import sam_model_registry

    if kind not in SAM_MODELS:
        raise ValueError(f"SAM model must be one of {', '.join(SAM_MODELS)}, got {kind!r}")
    sam = sam_model_registry[kind](checkpoint=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):  # A1111's torch.load wrapper returns None for a file its own check refuses
            raise ValueError("not a state dict (see the log)")
        sam.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - truncated, pickled code, another model: the job falls back to attention
        raise MissingModelFile(f"OMG: {checkpoint} could not be read as a SAM {kind} checkpoint ({e.__class__.__name__}: "
                               f"{str(e)[:300]}); replace it with the official file") from e
    return sam.to(device).eval()


@torch.no_grad()
def segment(sam: torch.nn.Module, image: numpy.ndarray, prompts: Sequence[SamPrompt]) -> list[torch.Tensor]:
    """Per prompt, SAM's best-scored mask [H, W] (bool) on ``image`` (H×W×3 uint8 RGB)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    masks = []
    for prompt in prompts:
        points = numpy.array(prompt.points, dtype=numpy.float32) if prompt.points else None
        labels = numpy.array(prompt.labels, dtype=numpy.int64) if prompt.points else None
        box = numpy.array(prompt.box, dtype=numpy.float32) if prompt.box is not None else None
        candidates, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=True)
        masks.append(torch.from_numpy(candidates[int(scores.argmax())]))
    return masks
