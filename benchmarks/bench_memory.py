"""Benchmark: what pass 2 costs in memory, the budget that bounds it, and what that means on real cards.

    python benchmarks/bench_memory.py [--sizes 32 48 64] [--steps 3]

1. Peak memory of plain generation and of OMG with k = 2, 3, 5 concepts (2, 7, 9 and 13
   rows per pass-2 call) on the tiny ldm-shaped UNet at each latent size, each case in a
   fresh subprocess: on CUDA the allocator's peak, on a CPU the process's peak resident
   memory above what it held before the job. ``peak = base + rows·(a + c·area)`` is
   fitted to all cases; the benchmark prints bytes per row, the fit and its worst error,
   and the row cost the engine itself measures on pass 1's first call next to it.
2. The same jobs under a budget well below the unchunked peak. The budget bounds pass 2's
   calls, so what is compared with it is pass 2's peak above what the process held when pass
   2 began (model, pass-1 record, masks); the last line is ``budget-respecting peak/budget: X``
   for k = 5 at the largest size (X ≤ 1.1 is the target).
3. SD1.5- and SDXL-shaped UNets (ldm's channel widths, depths and heads; weights never
   computed on, built as zeros in bf16 = fp16's bytes) are metered at two small latent
   sizes with the engine's own meter; the row cost is extrapolated linearly in area to
   512² / 1024² and turned into the predicted pass-2 peak for k = 2, 3 and the rows per
   call the engine would choose on 6, 8, 12 and 24 GB cards.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omg_ext.engine.memory import MemoryBudget, measure_peak  # noqa: E402
from omg_ext.engine.session import Concept  # noqa: E402
from minisd.loras import random_concept_deltas  # noqa: E402
from minisd.runs import SCHEDULE, run_omg  # noqa: E402
from minisd.sampling import generate  # noqa: E402
from minisd.unet import TinyUNet, unet_fn  # noqa: E402

CTX, MARGIN = 128, MemoryBudget().margin
CONCEPT_COUNTS = (0, 2, 3, 5)  # 0: plain
GB = 1 << 30
CARDS_GB = (6, 8, 12, 24)
CUDA_CONTEXT = GB // 2
"""What a card holds besides the checkpoint before pass 2: the CUDA context, cuDNN/cuBLAS workspaces."""
FAMILIES = {
    # ldm configs; checkpoint: the fp16 UNet + text encoder(s) + VAE the host keeps on the card
    "SD1.5 512x512": dict(unet=dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                                    num_heads=8, context_dim=768), latent=64, checkpoint_params=1_066_000_000),
    "SDXL 1024x1024": dict(unet=dict(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                                     transformer_depth=(0, 2, 10), num_head_channels=64, context_dim=2048, adm_in_channels=2816),
                           latent=128, checkpoint_params=3_470_000_000),
}


def rows_per_call(k: int) -> int:
    """One image with CFG: 2 host rows, 1 reference row, 2 rows per concept (0: plain, the 2 host rows)."""
    return 2 + (1 + 2 * k if k else 0)


def _ctx(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, 77, CTX, generator=torch.Generator().manual_seed(seed))


def _held(device: str) -> int:
    """Bytes held now: CUDA's allocated memory, or the process's resident memory."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak(device: str) -> int:
    """The high-water mark of ``_held`` (CUDA: since the reset before the job; CPU: since the process started)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; hand them back to see a clean baseline
    except OSError:
        pass


def run_case(k: int, size: int, steps: int, budget: int | None, device: str) -> dict:
    """One job in this (fresh) process; its peak bytes above the baseline."""
    unet = TinyUNet(model_channels=64, channel_mult=(1, 2, 3, 4), context_dim=CTX, num_heads=8, seed=0).to(device)
    concepts = [Concept({"context": _ctx(10 + j).to(device)}, {"context": _ctx(20 + j).to(device)},
                        random_concept_deltas(unet, seed=j + 1, rank=4), tokens=[4 + j]) for j in range(k)]
    cond, uncond = {"context": _ctx(1).to(device)}, {"context": _ctx(2).to(device)}
    x = torch.zeros(1, 4, size, size, device=device)
    with torch.no_grad():
        unet_fn(unet)(x, torch.full((1,), 500.0, device=device), cond)  # libraries loaded, kernels chosen
        measure_peak(lambda: torch.zeros(1) + 1, torch.device("cpu"))  # the meter's imports (~70 MB, once) before the baseline
        _release_freed_memory()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _held(device)
        memory = MemoryBudget(budget_bytes=budget) if budget else None
        raw, held = unet_fn(unet), []

        def noting_raw(x_, t, c):
            held.append(_held(device))  # what the process holds before each UNet call
            return raw(x_, t, c)
        if k == 0:
            generate(lambda x_, t, c, rows: noting_raw(x_, t, c), SCHEDULE, "euler", cond, uncond, seed=0, steps=steps,
                     latent_shape=(1, 4, size, size))
            session = None
        else:
            session = run_omg(unet, concepts, cond, uncond, steps=steps, latent_shape=(1, 4, size, size), blend_start=0.0,
                              memory=memory, raw=noting_raw).session
        top = _peak(device)
        peak, pass2_peak = top - before, top - held[steps] if k else None  # call ``steps``: pass 2's first
        metered = MemoryBudget(budget_bytes=1)  # the engine's own row cost, as pass 1 measures it
        metered.measure(lambda: unet_fn(unet)(torch.cat([x, x]), torch.full((2,), 500.0, device=device),
                                              {"context": torch.cat([cond["context"], uncond["context"]])}), torch.cat([x, x]))
    return {"k": k, "size": size, "rows": rows_per_call(k), "peak": peak, "pass2_peak": pass2_peak, "budget": budget,
            "calls_rows": session.row_limit.rows if session else None, "engine_row_bytes": metered.measured[0]}


def family_row_cost(name: str) -> dict:
    """Bytes per row of a full-size UNet in half precision, fitted a + b·area from two small latents."""
    spec = FAMILIES[name]
    with torch.device("meta"):
        unet = TinyUNet(seed=None, **spec["unet"]).to(torch.bfloat16)
    unet = unet.to_empty(device="cpu")
    params = sum(p.numel() for p in unet.parameters())
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        costs = []
        for side in (16, 24):
            x = torch.zeros(2, 4, side, side, dtype=torch.bfloat16)
            cond = {"context": torch.zeros(2, 77, spec["unet"]["context_dim"], dtype=torch.bfloat16)}
            if spec["unet"].get("adm_in_channels"):
                cond["y"] = torch.zeros(2, spec["unet"]["adm_in_channels"], dtype=torch.bfloat16)
            _, peak = measure_peak(lambda: unet_fn(unet)(x, torch.full((2,), 500.0), cond), x.device)
            costs.append((side * side, peak / 2))
    (a1, c1), (a2, c2) = costs
    slope = (c2 - c1) / (a2 - a1)
    area = spec["latent"] ** 2
    return {"name": name, "unet_params": params, "row_bytes": c1 + slope * (area - a1)}


def _child(args) -> None:
    case = json.loads(args.case)
    result = family_row_cost(case["family"]) if "family" in case else run_case(**case)
    print(json.dumps(result))


def _spawn(case: dict) -> dict:
    """One case in a fresh process. glibc is told to give every freed block above 64 KB back to the
    system at once, so resident memory follows the live tensors instead of the allocator's history."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fit(results: list[dict]) -> tuple[list[float], float]:
    """Least squares ``peak = base + rows·(a + c·area)``; ([base, a, c], worst relative error)."""
    xs = torch.tensor([[1.0, r["rows"], r["rows"] * r["size"] ** 2] for r in results], dtype=torch.float64)
    ys = torch.tensor([float(r["peak"]) for r in results], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(xs, ys[:, None]).solution[:, 0]
    return coefficients.tolist(), float(((xs @ coefficients - ys).abs() / ys).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64], help="latent sides of the tiny UNet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return _child(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = "CUDA allocator peak" if device == "cuda" else "peak RSS of a fresh process above its baseline"
    print(f"device: {device}; memory: {meter}; tiny UNet 64 channels, {args.steps} Euler steps, blend start 0")
    print(f"{'case':>10} {'latent':>7} {'rows/call':>9} {'peak MB':>9} {'MB/row':>8} {'engine MB/row':>13}")
    results = []
    for size in args.sizes:
        for k in CONCEPT_COUNTS:
            r = _spawn({"k": k, "size": size, "steps": args.steps, "budget": None, "device": device})
            results.append(r)
            print(f"{'plain' if not k else f'OMG k={k}':>10} {size:>4}x{size:<2} {r['rows']:>9} {r['peak'] / 2**20:>9.1f} "
                  f"{r['peak'] / r['rows'] / 2**20:>8.2f} {r['engine_row_bytes'] / 2**20:>13.2f}")
    (base, a, c), error = _fit(results)
    print(f"fitted: peak = {base / 2**20:.1f} MB + rows x ({a / 2**20:.2f} MB + {c:.0f} B x latent area); "
          f"worst error {error:.1%}")
    for size in args.sizes:
        engine, fitted = next(r["engine_row_bytes"] for r in results if r["size"] == size), a + c * size * size
        print(f"bytes per row at {size}x{size}: fitted {fitted / 2**20:.2f} MB, "
              f"engine's pass-1 measure {engine / 2**20:.2f} MB (ratio {engine / fitted:.2f})")

    size = max(args.sizes)
    unchunked = next(r["peak"] for r in results if r["size"] == size and r["k"] == max(CONCEPT_COUNTS))
    budget = int(0.4 * unchunked)
    print(f"\nwith a budget of {budget / 2**20:.1f} MB (0.4 x the unchunked k={max(CONCEPT_COUNTS)} peak) at {size}x{size}:")
    last = None
    for k in CONCEPT_COUNTS[1:]:
        last = _spawn({"k": k, "size": size, "steps": args.steps, "budget": budget, "device": device})
        print(f"  OMG k={k}: calls of at most {last['calls_rows']} rows (unchunked: {rows_per_call(k)}); job peak "
              f"{last['peak'] / 2**20:.1f} MB, pass 2's peak above what it started with {last['pass2_peak'] / 2**20:.1f} MB, "
              f"which is {last['pass2_peak'] / budget:.2f} x the budget")

    print("\npredicted pass 2 in fp16 (row cost metered on the full-size UNet, linear in area; "
          f"cards keep the checkpoint + {CUDA_CONTEXT / GB:.1f} GB; the engine plans {MARGIN:.0%} of what is free):")
    print(f"{'model':>22} {'UNet params':>12} {'GB/row':>7} {'k':>2} {'rows':>5} {'pass-2 peak GB':>15} "
          + " ".join(f"{f'rows/call {g}GB':>14}" for g in CARDS_GB))
    for name, spec in FAMILIES.items():
        cost = _spawn({"family": name})
        # on the card: the whole checkpoint, or with --medvram only the UNet while it samples
        for resident, weights in (("", spec["checkpoint_params"] * 2), (" medvram", cost["unet_params"] * 2)):
            for k in (2, 3):
                rows = rows_per_call(k)
                peak = weights + rows * cost["row_bytes"]
                chunks = []
                for card in CARDS_GB:
                    fits = int((card * GB - weights - CUDA_CONTEXT) * MARGIN // cost["row_bytes"])
                    chunks.append("all" if fits >= rows else str(max(fits, 2)) + ("!" if fits < 2 else ""))
                print(f"{name + resident:>22} {cost['unet_params'] / 1e6:>11.0f}M {cost['row_bytes'] / GB:>7.3f} {k:>2} {rows:>5} "
                      f"{peak / GB:>15.2f} " + " ".join(f"{c_:>14}" for c_ in chunks))
    print("(rows/call: 'all' = one call; '!' = less than one unit fits: a unit at a time, with a warning; "
          "medvram: only the UNet on the card while it samples)")
    print(f"\nbudget-respecting peak/budget: {last['pass2_peak'] / budget:.2f}")


if __name__ == "__main__":
    main()
