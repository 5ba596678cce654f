"""What an extraction leaves: textual-inversion embeddings and kohya LoRAs that the WebUIs load as they are.

Embeddings are safetensors in the layout A1111's and Forge's loaders (``create_embedding_from_data``) take:
SD1.5 one tensor ``emb_params`` [vectors, 768]; SDXL ``clip_l`` [vectors, 768] and ``clip_g`` [vectors, 1280].
The prompt word is the file's name. The metadata ``omg_extract`` says what the file was learnt from (the
source pictures' hashes) and with which settings. A file is never written over: a name in use is an error,
and the file appears whole (written beside, then renamed) or not at all.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..merge.lora_out import write_lora

SD15_KEY = "emb_params"


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name")


def embedding_vectors(vectors: torch.Tensor, parts: dict[str, int] | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """An embedding as the hosts keep it: ``vectors`` [n, dim] as they are (one text encoder), or split along
    ``dim`` into each encoder's share (SDXL: ``{"clip_l": 768, "clip_g": 1280}``, CLIP-L's first, as A1111's
    ``encode_embedding_init_text`` joins them)."""
    if parts is None:
        return vectors
    if sum(parts.values()) != vectors.shape[-1]:
        raise ValueError(f"vectors of width {vectors.shape[-1]} do not split into {parts}")
    return dict(zip(parts, torch.split(vectors, list(parts.values()), dim=-1)))


def write_embedding(path: Path, vectors: torch.Tensor | dict[str, torch.Tensor], info: dict) -> None:
    """``vectors`` [n, dim] (SD1.5) or ``{"clip_l": …, "clip_g": …}`` (SDXL), saved fp32 with ``info`` as metadata."""
    path = Path(path)
    _refuse_existing(path)
    tensors = vectors if isinstance(vectors, dict) else {SD15_KEY: vectors}
    if isinstance(vectors, dict) and set(vectors) != {"clip_l", "clip_g"}:
        raise ValueError(f"an SDXL embedding has 'clip_l' and 'clip_g', got {sorted(vectors)}")
    partial = path.with_name(path.name + ".partial")
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(partial),
                  metadata={"omg_extract": json.dumps(info)})
        _refuse_existing(path)
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)


def read_embedding(path: Path) -> torch.Tensor:
    """An SD1.5 embedding's vectors [n, dim], as the loaders read the one-tensor layout."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if len(keys) != 1:
            raise ValueError(f"{Path(path).name}: an SD1.5 embedding has one tensor, found {keys}")
        vectors = f.get_tensor(keys[0])
    return vectors[None] if vectors.dim() == 1 else vectors


def write_concept_lora(path: Path, tensors: dict[str, torch.Tensor], trigger: str, info: dict) -> None:
    """A concept's LoRA, its trigger word the embedding's name."""
    write_lora(Path(path), tensors, [trigger], info, made_by="extract")
