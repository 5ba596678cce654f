"""The last job's concepts, kept for the next one.

Users run the same characters job after job (new seeds, a changed global prompt). Each
concept costs a LoRA parse and its prompts encoded with the LoRA's text-encoder part merged
into the text encoder: about 2 s of an 85 s two-pass job in A1111 on a 2-core CPU (128², 20
steps; py-spy), a larger share of a GPU job's few seconds. The host caches its own prompts'
conditioning the same way, keyed by its ``p.cached_params`` (checkpoint, CLIP skip, emphasis,
size, the prompt's own LoRAs…); a concept's key adds its LoRA file (path, size, modification
time), its weights and prompts.

Only the last job's concepts stay, and only those whose UNet part is plain low-rank LoRA
(the size of the file; other formats become dense weight differences, as large as the
layers they touch, and are not kept between jobs).
"""
from __future__ import annotations

from typing import Any

from ..engine.lora import LowRankDelta


class ConceptCache:
    """(key, loaded concept) pairs of the last job. Keys are compared with ``==``, as the host
    compares its own cache's: they hold the job's extra-network data, dicts of lists."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, Any]] = []

    def get(self, key) -> Any | None:
        return next((value for k, value in self.entries if k == key), None)

    def keep(self, loaded: list[tuple[Any, Any]]) -> None:
        """Keep ``loaded`` (key, (deltas, cond, uncond)) pairs, the ones worth keeping, instead of the last job's."""
        self.entries = [(key, value) for key, value in loaded if key is not None and _small(value[0])]

    def clear(self) -> None:
        self.entries = []


def _small(deltas: dict) -> bool:
    return all(isinstance(d, LowRankDelta) for d in deltas.values())


CONCEPTS = ConceptCache()
"""The process's one cache (a WebUI runs one job at a time)."""
