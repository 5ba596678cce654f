"""Many concept LoRAs into one, layer by layer, host-neutral.

The host (or the toy world) provides the model's target layers by their kohya key, each concept's dense delta
per layer (parsed by the host's own LoRA loader), and a ``record(concept, keys)`` that runs the model a little with
that concept's LoRA active (its prompts through the text encoder, a few sampling steps) inside
``record.recording`` and returns the samples. ``merge`` fits every layer any concept touches (``fit``) and
returns the merged deltas; ``to_file`` writes them as one kohya LoRA. Nothing here changes a weight: the base
weights are read, the concepts' deltas act through forward hooks the host installs around ``record``.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .distil import UNET_PREFIX, DistilSettings, Teaching, distil
from .fit import FITS, METHODS, FitSettings, LayerInputs, fit_sum
from .lora_out import MAX_RANK, factorise, lora_tensors, write_lora
from .record import RowSample, weight_matrix


class MergeError(ValueError):
    """Bad merge input the user can fix; the message says what."""


@dataclass
class MergeConcept:
    name: str
    """The LoRA's name (its file name without the extension)."""
    trigger: str
    deltas: dict[str, torch.Tensor]
    """Kohya key -> dense weight delta, shaped like the layer's weight, the LoRA's own scale applied."""
    weight: float = 1.0
    source: str = ""
    """The file it came from (its SHA-256 goes into the merged file's metadata)."""


@dataclass
class MergeSettings:
    method: str = "loraclr"
    energy: float = 0.99
    """Share of each layer's merged delta energy (Σ σ²) the saved LoRA keeps: it sets the rank per layer."""
    max_rank: int = MAX_RANK
    rows: int = 1024
    """Input rows sampled per layer and concept (memory: rows × the layer's input width × 4 bytes each)."""
    fit: FitSettings = field(default_factory=FitSettings)
    distil: DistilSettings = field(default_factory=DistilSettings)

    def validate(self, concepts: list[MergeConcept]) -> "MergeSettings":
        if self.method not in METHODS:
            raise MergeError(f"merge method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if not 2 <= len(concepts) <= 12:
            raise MergeError(f"a merge takes 2 to 12 LoRAs (got {len(concepts)})")
        names = [c.name for c in concepts]
        if len(set(names)) < len(names):
            raise MergeError(f"a LoRA is named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        for c in concepts:
            if not c.trigger.strip():
                raise MergeError(f"LoRA {c.name!r} has no trigger word: give it the word its prompts use")
            if not c.deltas:
                raise MergeError(f"LoRA {c.name!r} has no layer of this model (made for another architecture?)")
        if not 0 < self.energy <= 1:
            raise MergeError(f"the energy kept must be above 0 and at most 1 (got {self.energy})")
        if self.max_rank < 1 or self.rows < 1:
            raise MergeError("the rank and the rows per layer must be at least 1")
        if self.method == "loraclr" and self.fit.steps < 1:
            raise MergeError(f"loraclr needs at least 1 step (got {self.fit.steps})")
        if self.method == "distil" and self.distil.steps < 1:
            raise MergeError(f"distil needs at least 1 step (got {self.distil.steps})")
        return self


def file_hash(path: str) -> str:
    if not path or not Path(path).is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge(layers: Mapping[str, nn.Module], concepts: list[MergeConcept], record: Callable[[int, list[str]], dict[str, RowSample]],
          settings: MergeSettings, progress: Callable[[str, float], None] = lambda text, done: None,
          teach: Callable[[dict[str, torch.Tensor]], Teaching] | None = None) -> dict[str, torch.Tensor]:
    """The merged delta of every layer a concept touches (kohya key -> [out, in·kh·kw]).

    ``record(j, keys)`` runs the model with concept j's LoRA and returns the input samples of the ``keys`` layers
    (distil records only the text encoder's: it trains the UNet's on pictures instead); ``progress``
    gets a text and the share done, and may raise to stop (the WebUI's Interrupt): nothing is kept then.
    ``teach(text_deltas)`` (the ``distil`` method): what distillation needs, once the text encoder's layers are
    merged (key -> delta shaped like the weight).
    """
    settings.validate(concepts)
    touched = sorted({key for c in concepts for key in c.deltas})
    unknown = [key for key in touched if key not in layers]
    if unknown:
        raise MergeError(f"{len(unknown)} layers of the LoRAs are not in this model (made for another architecture?): "
                         f"{', '.join(unknown[:3])}")
    distilling = settings.method == "distil"
    if distilling and teach is None:
        raise MergeError("the distil method needs the model to train on, which this caller does not give")
    trained = [key for key in touched if distilling and key.startswith(UNET_PREFIX)]
    per_layer = [key for key in touched if key not in trained]
    samples = []
    for j, concept in enumerate(concepts):
        progress(f"recording {concept.name}'s inputs ({j + 1} of {len(concepts)})", 0.3 * j / len(concepts))
        samples.append(record(j, per_layer))
    fit_name = "least squares" if distilling else settings.method
    fit = FITS[fit_name]
    fitted_share = 0.4 if distilling else 1.0
    merged = {}
    for n, key in enumerate(per_layer):
        progress(f"fitting layer {n + 1} of {len(per_layer)} ({fit_name})",
                 0.3 + (fitted_share - 0.3) * n / len(per_layer))
        merged[key] = fit(_layer_inputs(key, layers[key], concepts, samples), settings.fit)
    if trained:
        start = {key: fit_sum(_layer_inputs(key, layers[key], concepts, samples=None)) for key in trained}
        teaching = teach({key: merged[key].reshape(layers[key].weight.shape) for key in per_layer})
        merged.update(distil({key: layers[key] for key in trained}, start, teaching, settings.distil,
                             lambda text, done: progress(text, fitted_share + (1 - fitted_share) * done)))
    progress("fitted", 1.0)
    return merged


def _layer_inputs(key: str, layer: nn.Module, concepts: list[MergeConcept], samples: list[dict[str, RowSample]] | None) -> LayerInputs:
    """One layer's base weight, the concepts' deltas and weights, and their recorded inputs (none: ``samples`` None)."""
    base = weight_matrix(layer)
    inputs = []
    for j, sample in enumerate(samples or []):
        if sample[key].rows is None:
            raise MergeError(f"no input reached layer {key} while recording {concepts[j].name}")
        inputs.append(sample[key].rows)
    deltas = [c.deltas[key].float().reshape(base.shape) if key in c.deltas else torch.zeros_like(base) for c in concepts]
    return LayerInputs(base, deltas, inputs, [c.weight for c in concepts])


def kohya_tensors(merged: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], energy: float,
                    max_rank: int = MAX_RANK) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The kohya tensors of the merged deltas, and each layer's relative SVD error."""
    tensors, errors = {}, {}
    for key, delta in merged.items():
        parts = factorise(delta, energy, max_rank)
        tensors.update(lora_tensors(key, parts, layers[key].weight.shape))
        errors[key] = parts.relative_error
    return tensors, errors


def to_file(path: Path, merged: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], concepts: list[MergeConcept],
            settings: MergeSettings) -> dict[str, float]:
    """Write the merged LoRA (never over an existing file); returns each layer's relative SVD error."""
    if Path(path).exists():
        raise MergeError(f"{Path(path).name} already exists in {Path(path).parent}: choose another name")
    tensors, errors = kohya_tensors(merged, layers, settings.energy, settings.max_rank)
    info = {"method": settings.method, "energy": settings.energy, "max_rank": settings.max_rank, "rows": settings.rows,
            "fit": asdict(settings.fit), "distil": asdict(settings.distil),
            "concepts": [{"name": c.name, "trigger": c.trigger, "weight": c.weight, "sha256": file_hash(c.source)}
                         for c in concepts],
            "largest relative error": max(errors.values(), default=0.0)}
    try:
        write_lora(path, tensors, [c.trigger for c in concepts], info)
    except FileExistsError as e:
        raise MergeError(str(e)) from e
    return errors
