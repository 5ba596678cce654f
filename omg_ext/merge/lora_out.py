"""A merged weight delta as a kohya LoRA file any WebUI loads: per layer an SVD truncated at the rank that keeps
a stated share of the delta's energy (Σ σ² of the kept singular values over all of them), like kohya's
``svd_merge_lora.py`` but with the rank chosen per layer. Convolutions are merged over their unfolded patches,
so their delta is [out, in·kh·kw]; it is written in LoCon's layout (down [r, in, kh, kw], up [out, r, 1, 1]).
A file is never overwritten."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_RANK = 128


@dataclass
class Factorised:
    up: torch.Tensor
    down: torch.Tensor
    rank: int
    relative_error: float
    """‖ΔW − up·down‖ / ‖ΔW‖ (Frobenius), what the truncation loses."""


def factorise(delta: torch.Tensor, energy: float, max_rank: int = MAX_RANK) -> Factorised:
    """``delta`` [out, in] ≈ up [out, r] · down [r, in] with the smallest r keeping ``energy`` of Σ σ²; the singular
    values are split evenly between the factors (their sizes stay alike, which fp16 files like)."""
    if not 0 < energy <= 1:
        raise ValueError(f"the energy kept must be in (0, 1], got {energy}")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float(s.pow(2).sum())
    if total == 0:
        return Factorised(delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1]), 1, 0.0)
    kept = s.pow(2).cumsum(0) / total
    rank = min(int((kept < energy - 1e-12).sum()) + 1, max_rank, s.shape[0])
    root = s[:rank].sqrt()
    error = max(0.0, 1.0 - float(kept[rank - 1])) ** 0.5
    return Factorised((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), rank, error)


def lora_tensors(key: str, parts: Factorised, weight_shape: torch.Size) -> dict[str, torch.Tensor]:
    """One layer's kohya tensors (fp16), ``alpha`` = rank so that the scale is 1."""
    up, down = parts.up, parts.down
    if len(weight_shape) == 4:
        up, down = up[:, :, None, None], down.reshape(parts.rank, *weight_shape[1:])
    return {f"{key}.lora_up.weight": up.half().contiguous(), f"{key}.lora_down.weight": down.half().contiguous(),
            f"{key}.alpha": torch.tensor(float(parts.rank)).half()}


def write_lora(path: Path, tensors: dict[str, torch.Tensor], triggers: list[str], info: dict, made_by: str = "merge") -> None:
    """Write the file (refusing an existing one), with the metadata WebUIs read: trigger words from
    ``ss_tag_frequency``, and ``omg_<made_by>`` (what it was made from and with which settings) as JSON."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name")
    ranks = [int(v) for k, v in tensors.items() if k.endswith(".alpha")]
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks, default=0)),
        "ss_network_alpha": str(max(ranks, default=0)), "ss_output_name": path.stem,
        "ss_tag_frequency": json.dumps({f"omg {made_by}": {trigger: 1 for trigger in triggers}}),
        f"omg_{made_by}": json.dumps(info),
    }
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        if path.exists():  # another writer won the name meanwhile: never replace a user's file
            raise FileExistsError(f"{path.name} already exists in {path.parent}: choose another name")
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
