"""Benchmark: plain generation vs this engine (default and fast mode) vs the official OMG schedule, side by side.

    python benchmarks/bench_engine.py [--unet tiny|sd15] [--sizes 32 48] [--steps 20] [--runs 3] [--device cuda --dtype float16]

On the tiny ldm-shaped test UNet, or with ``--unet sd15`` a UNet of SD1.5's real layer shapes (320/640/1280
channels, two ResBlocks a level, 8 heads, 768-wide context: 860 M random weights, whose layers weigh as a real
checkpoint's do, where the tiny UNet's ratios are dominated by per-layer Python overhead) — CPU by default,
random weights — 2 concepts with LoRAs on every
Linear and Conv2d layer, this project's default blend start (the official schedule its own 0.32), Euler,
CFG 7, one image; the engine with its default settings (concept guidance "shared", the background outside the masks from pass 1), with the
background redrawn ("redrawn": the host cond row runs with pass 1's kept attention), redrawn with
reference rows instead of kept attention ("ref rows": compute for memory) and with the paper's own
guidance ("own"). For each method it
prints row evaluations, the median wall time over ``--runs`` runs, the peak resident
memory of a fresh process running it, and the most bytes the pass-1 record held; then the
ratios against plain and the two targets:

- the official schedule takes at least 1.5x this engine's wall time;
- this engine's wall-time ratio to plain is within 15 % of its row-evaluation ratio;
- the one-pass mode (concept rows from the blend start) and fast mode (masked LoRAs in the host's rows) take
  at most 1.3x plain's wall time.

``--methods`` times some of them only (plain always).

The official schedule is emulated faithfully to its cost: pass 1 generates the image
twice (a batch of two), pass 2 runs the global rows for every step (no replay) and, from
the blend start, one separate UNet call per concept with that concept's LoRA switched
in (unmerged, as PEFT adapters are), blended by the same masks.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omg_ext.config import OmgConfig  # noqa: E402
from omg_ext.engine.lora import RowRoutedLoRA  # noqa: E402
from omg_ext.engine.session import Concept  # noqa: E402
from minisd.loras import random_concept_deltas  # noqa: E402

from minisd.runs import SCHEDULE, run_omg  # noqa: E402
from minisd.runs import run_fast as fast_mode  # noqa: E402
from minisd.sampling import generate  # noqa: E402
from minisd.unet import TinyUNet, unet_fn  # noqa: E402

METHODS = ("plain", "engine", "redrawn", "ref rows", "own", "one pass", "fast", "official")
"""``engine``, ``one pass`` and ``fast``: the modes at their defaults (concept guidance "shared", the background from
pass 1 in two passes); ``redrawn``: the
background redrawn by the host cond row with pass 1's kept attention; ``ref rows``: redrawn with a reference row per
image instead of kept attention; ``own``: two passes with the paper's own guidance."""
CONCEPTS = 2
UNETS = {"tiny": dict(model_channels=64, channel_mult=(1, 2, 3, 4), context_dim=128, num_heads=8),
         "sd15": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                      context_dim=768, num_heads=8)}
"""``--unet``: the tiny test UNet (quick), or SD1.5's layer shapes (ldm's v1 config)."""
UNET = UNETS["tiny"]
CTX = UNET["context_dim"]
BLEND_START, OFFICIAL_BLEND_START = OmgConfig.blend_start, 0.32
"""This project's default blend start; the official code's (blending from step 16 of 50)."""
DEVICE, DTYPE = torch.device("cpu"), torch.float32
"""Where the UNet runs (``--device``, ``--dtype``); the sampler stays on the CPU in float32."""

def _ctx(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, 77, CTX, generator=torch.Generator().manual_seed(seed))

def setup():
    unet = TinyUNet(**UNET, seed=0)
    concepts = [
        Concept({"context": _ctx(10 + j).to(DEVICE, DTYPE)}, {"context": _ctx(20 + j).to(DEVICE, DTYPE)},
                random_concept_deltas(unet, seed=j + 1, rank=4), tokens=[4 + j])
        for j in range(CONCEPTS)
    ]
    return unet.to(DEVICE, DTYPE), concepts

def on_device(raw):
    """A UNet call taking the sampler's CPU float32 tensors: moved to the UNet's device and dtype, and back."""
    if DEVICE.type == "cpu" and DTYPE == torch.float32:
        return raw
    return lambda x, t, c: raw(x.to(DEVICE, DTYPE), t.to(DEVICE), {k: v.to(DEVICE, DTYPE) for k, v in c.items()}).float().cpu()

def half_masks(hw: tuple[int, int]) -> torch.Tensor:
    masks = torch.zeros(1, CONCEPTS, *hw)
    masks[0, 0, :, : hw[1] // 2] = 1
    masks[0, 1, :, hw[1] // 2:] = 1
    return masks

def run_plain(unet, concepts, size: int, steps: int) -> dict:
    raw = on_device(unet_fn(unet))
    calls = []

    def model_fn(x, t, c, rows):
        calls.append(x.shape[0])
        return raw(x, t, c)

    generate(model_fn, SCHEDULE, "euler", {"context": _ctx(1)}, {"context": _ctx(2)}, seed=0, steps=steps, latent_shape=(1, 4, size, size))
    return {"rows": sum(calls), "record_bytes": 0}

def run_engine(unet, concepts, size: int, steps: int, share_uncond: bool = True, keep_attention: bool = True,
               background_from_pass1: bool = True) -> dict:
    r = run_omg(unet, concepts, {"context": _ctx(1)}, {"context": _ctx(2)}, steps=steps, latent_shape=(1, 4, size, size),
                blend_start=BLEND_START, dilation=8, feather=8, device=DEVICE, dtype=None if DTYPE == torch.float32 else DTYPE,
                share_uncond=share_uncond, keep_attention=keep_attention, background_from_pass1=background_from_pass1)
    c = r.session.counters
    return {"rows": c["pass1"].rows + c["pass2"].rows, "record_bytes": r.session.record.peak_nbytes}

def run_fast(unet, concepts, size: int, steps: int, concept_rows: bool = False) -> dict:
    r = fast_mode(unet, concepts, {"context": _ctx(1)}, {"context": _ctx(2)}, steps=steps,
                  latent_shape=(1, 4, size, size), blend_start=BLEND_START, masks=half_masks((size, size)),
                  device=DEVICE, dtype=None if DTYPE == torch.float32 else DTYPE, share_uncond=True,
                  concept_rows=concept_rows)
    return {"rows": r.session.counters["pass1"].rows + r.session.counters["fast"].rows, "record_bytes": 0}

def run_official(unet, concepts, size: int, steps: int) -> dict:
    """The reference code's schedule: duplicate image in pass 1, full pass 2, a call per concept."""
    raw = on_device(unet_fn(unet))
    router = RowRoutedLoRA(dict(unet.named_modules()), [c.deltas for c in concepts])
    masks = half_masks((size, size))[0]
    rows, timesteps = [0], []
    cond, uncond = {"context": _ctx(1, 2)}, {"context": _ctx(2, 2)}

    def unet_call(x, t, c):
        rows[0] += x.shape[0]
        return raw(x, t, c)

    def pass1_fn(x, t, c, roles):
        timesteps.append(float(t.max()))
        return unet_call(x, t, c)

    def pass2_fn(x, t, c, roles):
        out = unet_call(x, t, c)
        if float(t.max()) > timesteps[round(OFFICIAL_BLEND_START * len(timesteps))]:
            return out
        pair = [i for i, r in enumerate(roles) if r.image == 0]  # image 0's cond and uncond rows
        blended = out[pair] * (1 - masks.sum(0))
        for j, concept in enumerate(concepts):
            context = torch.cat([(concept.cond if roles[i].is_cond else concept.uncond)["context"] for i in pair]).float().cpu()
            with router.route_all(j):
                blended = blended + masks[j] * unet_call(x[pair], t[pair], {"context": context})
        out[pair] = blended
        return out

    with router.installed():
        for fn in (pass1_fn, pass2_fn):
            generate(fn, SCHEDULE, "euler", cond, uncond, seed=0, steps=steps, latent_shape=(2, 4, size, size))
    return {"rows": rows[0], "record_bytes": 0}

def measure(method: str, size: int, steps: int, runs: int) -> dict:
    """Run one method in this process: warm-up, then ``runs`` timed runs."""
    torch.set_num_threads(torch.get_num_threads())
    unet, concepts = setup()
    fn = {"plain": run_plain, "engine": run_engine, "redrawn": lambda *a: run_engine(*a, background_from_pass1=False),
          "ref rows": lambda *a: run_engine(*a, keep_attention=False, background_from_pass1=False),
          "own": lambda *a: run_engine(*a, share_uncond=False), "one pass": lambda *a: run_fast(*a, concept_rows=True),
          "fast": run_fast, "official": run_official}[method]
    with torch.no_grad():
        fn(unet, concepts, size, 2)  # warm-up: allocator, kernels
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            result = fn(unet, concepts, size, steps)
            times.append(time.perf_counter() - start)
    result.update(seconds=statistics.median(times), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="tiny", choices=sorted(UNETS), help="the tiny test UNet or SD1.5's layer shapes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48], help="latent sizes (pixels / 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the UNet runs, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="the methods to time (plain is always timed: the ratios are to it)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE, DTYPE, UNET, CTX
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    UNET = UNETS[args.unet]
    CTX = UNET["context_dim"]
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.steps, args.runs)))
        return
    where = f"CPU ({torch.get_num_threads()} threads)" if DEVICE.type == "cpu" else str(DEVICE)
    print(f"{args.unet} ldm UNet on {where} in {args.dtype}, {args.steps} steps Euler, {CONCEPTS} concepts, "
          f"blend start {BLEND_START}, median of {args.runs} runs, each method in a fresh process")
    for size in args.sizes:
        results = {}
        for method in ["plain", *[m for m in args.methods if m != "plain"]]:
            out = subprocess.run([sys.executable, __file__, "--child", method, str(size), "--unet", args.unet, "--steps", str(args.steps),
                                  "--runs", str(args.runs), "--device", args.device, "--dtype", args.dtype],
                                 check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
        plain = results["plain"]
        print(f"\nlatent {size}x{size} ({size * 8} px)")
        print(f"  {'method':9} {'row evals':>9} {'wall s':>8} {'peak RSS MB':>11} {'record KB':>9} {'rows/plain':>10} {'wall/plain':>10}")
        for method, r in results.items():
            print(f"  {method:9} {r['rows']:9d} {r['seconds']:8.2f} {r['peak_rss_mb']:11.0f} {r['record_bytes'] / 1024:9.0f} "
                  f"{r['rows'] / plain['rows']:10.2f} {r['seconds'] / plain['seconds']:10.2f}")
        summary(results)

def summary(results: dict) -> None:
    """The ratios and targets of the methods timed (a line only where all its methods were)."""
    plain = results["plain"]
    wall = {m: r["seconds"] / plain["seconds"] for m, r in results.items()}
    if {"engine", "official"} <= results.keys():
        print(f"  official / engine wall: {results['official']['seconds'] / results['engine']['seconds']:.2f}x (target >= 1.5)")
    if {"engine", "redrawn", "ref rows", "own"} <= results.keys():
        redrawn, ref_rows = results["redrawn"], results["ref rows"]
        print(f"  omg/plain wall ratio: {wall['engine']:.2f} (redrawn: {wall['redrawn']:.2f}, reference rows: "
              f"{wall['ref rows']:.2f}, own guidance: {wall['own']:.2f})")
        print(f"  redrawn, kept attention vs reference rows: {redrawn['rows']} vs {ref_rows['rows']} row evaluations, "
              f"wall {redrawn['seconds'] / ref_rows['seconds']:.2f}x, record "
              f"+{(redrawn['record_bytes'] - ref_rows['record_bytes']) / 1024:.0f} KB")
    for method in ("one pass", "fast"):
        if method in results:
            print(f"  {method}/plain wall ratio: {wall[method]:.2f} (target <= 1.3)")
    if "engine" in results:
        row_ratio = results["engine"]["rows"] / plain["rows"]
        print(f"  engine wall ratio {wall['engine']:.2f} vs row ratio {row_ratio:.2f}: "
              f"{100 * (wall['engine'] / row_ratio - 1):+.1f}% (target within +-15%)")

if __name__ == "__main__":
    main()
