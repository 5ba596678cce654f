"""What an extraction needs in memory at SD1.5 512×512: one training row metered, the rest counted.

    python benchmarks/bench_extract_memory.py

An SD1.5-shaped UNet (ldm's widths, depths and heads; weights zeros in bf16 = fp16's bytes) runs one training
row as an M-step does: forward, then the backward pass to the context (the embedding's vectors) and to a rank-4
LoRA on every layer (the LoRA option). The activations are metered with the engine's ``LiveBytes`` at two small
latent sides and extrapolated linearly in area to 64×64 (512²). With the checkpoint's fp16 weights (UNet, text
encoder, VAE: ``bench_memory.FAMILIES``) that predicts the peak for a step of one picture and two concepts (three
rows) run at once and one row at a time (``rows_per_pass`` 1). Last line: ``rows_per_pass=1 peak at 512²: X GB``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_memory import FAMILIES  # noqa: E402
from minisd.unet import TinyUNet  # noqa: E402
from omg_ext.concepts.lora import ConceptLoRA  # noqa: E402
from omg_ext.engine.memory import LiveBytes  # noqa: E402
from omg_ext.hosts.extract_host import lora_layers  # noqa: E402

GB = 1 << 30


def training_row_bytes(unet: torch.nn.Module, side: int, context_dim: int) -> int:
    """Peak bytes of one row's forward and backward (to the context and the LoRA) above what was there before."""
    lora = ConceptLoRA(lora_layers(unet), 1, rank=4)  # float32, as an extraction keeps it
    x = torch.zeros(1, 4, side, side, dtype=torch.bfloat16)
    context = torch.zeros(1, 77, context_dim, dtype=torch.bfloat16, requires_grad=True)
    with LiveBytes() as meter, lora.installed([0]):
        out = unet(x, torch.full((1,), 500.0), context=context)
        torch.autograd.grad(out.float().pow(2).mean(), [context, *lora.parameters()])
    return meter.peak


def main() -> None:
    spec = FAMILIES["SD1.5 512x512"]
    with torch.device("meta"):
        unet = TinyUNet(seed=None, **spec["unet"]).to(torch.bfloat16)
    unet = unet.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    costs = []
    for side in (16, 24):
        start = time.perf_counter()
        costs.append((side * side, training_row_bytes(unet, side, spec["unet"]["context_dim"])))
        print(f"latent {side}x{side}: one training row {costs[-1][1] / GB:.3f} GB ({time.perf_counter() - start:.0f} s)", flush=True)
    (a1, c1), (a2, c2) = costs
    area = spec["latent"] ** 2
    row = c1 + (c2 - c1) / (a2 - a1) * (area - a1)
    weights = spec["checkpoint_params"] * 2
    print(f"one training row at 512² (latent 64x64), extrapolated: {row / GB:.2f} GB")
    print(f"checkpoint weights in fp16: {weights / GB:.2f} GB")
    for rows in (3, 1):
        print(f"rows_per_pass={rows if rows == 1 else 0} ({rows} row{'s' if rows > 1 else ''} at once, one picture, two concepts): "
              f"peak at 512² about {(weights + rows * row) / GB:.2f} GB")
    print(f"rows_per_pass=1 peak at 512²: {(weights + row) / GB:.2f} GB")


if __name__ == "__main__":
    main()
