"""A concept's LoRA file, checked by OMG before any host loader opens it.

Why: a civitai download cut short is the commonest bad file. A1111 answers it with a bare
``SafetensorError`` (HTTP 500 in the API) and Forge renames the user's file to
``.corrupted``. OMG opens the file read-only with safetensors' own parser first and, when
it is bad, says which file and what is wrong ("char1.safetensors is truncated: 2.1 MB of
4.3 MB — download it again") before the host can touch it. Files of other formats (.pt,
.ckpt: pickles) are left to the host's loader.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

LORA_KEY_MARKS = ("lora_up", "lora_down", "lora_A", "lora_B", "lora.up", "lora.down", "hada_w", "lokr_w", "oft_",
                  "dora_scale")
"""Substrings of the keys of the network types the hosts load (LoRA, LoCon, LoHa, LoKr, OFT, DoRA)."""
DIFF_SUFFIXES = (".diff", ".diff_b")
"""Key endings of full-difference networks."""


class BadLoraFile(ValueError):
    """A LoRA file that cannot be used; the message names it and says what to do."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _declared_size(path: Path, size: int) -> int | None:
    """The size the file's own header promises (8 + header + data); with the header itself
    cut short, what the header alone needs; None when the start is not a safetensors header."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return 8 + length if length < 100_000_000 else None  # a cut header, or not safetensors at all
            header = json.loads(f.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + length + max(ends, default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def check_lora_file(path: str | Path) -> None:
    """Raise ``BadLoraFile`` naming ``path`` if it is missing, truncated, not a safetensors
    file, or holds no LoRA weights. Reads only; never writes, moves or renames anything."""
    path = Path(path)
    if not path.is_file():
        raise BadLoraFile(f"{path.name} is missing from {path.parent} (moved or deleted?): refresh the LoRA list")
    if path.suffix.lower() != ".safetensors":
        return
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except SafetensorError as e:
        declared = _declared_size(path, size)
        if declared is not None and declared > size:
            raise BadLoraFile(f"{path.name} is truncated: {_mb(size)} of {_mb(declared)} — download it again") from e
        raise BadLoraFile(f"{path.name} is not a readable safetensors file ({e}) — download it again") from e
    if not any(key.endswith(DIFF_SUFFIXES) or any(mark in key for mark in LORA_KEY_MARKS) for key in keys):
        raise BadLoraFile(f"{path.name} holds no LoRA weights ({len(keys)} tensors, none a LoRA's): "
                          "is it a checkpoint, a VAE or an embedding?")


def lora_layer_count(path: str | Path) -> int | None:
    """How many layers a LoRA file names (kohya ``name.lora_up.weight``, ``name.alpha``, ``name.hada_w1_a``,
    PEFT ``name.lora_A.weight`` … all count once for ``name``), from its header; None for a file that is
    not safetensors (a pickle: the host reads it). Bundled embeddings (``bundle_emb.*``) are not layers."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if not k.startswith("bundle_emb.")]
    return len({(k[:-len(".weight")] if k.endswith(".weight") else k).rsplit(".", 1)[0] for k in keys})
