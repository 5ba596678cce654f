"""img2img in the toy world: do the characters keep their identities in a picture the user already has?

    python benchmarks/bench_img2img.py [--seeds 20] [--strengths 0.5 0.65 0.8] [--grids docs/img2img]

For each case of the quality benchmark (a man and a woman with two identities; half of the cases with one in
front of the other) and each seed, the scene generator draws an init picture: the case's background with a
plain man and a plain woman, their true figure masks known (``toyworld.img2img``). Each method turns it into a
picture with the identities by img2img at each strength (Euler, 20 steps: strength × 20 of them run):
the prompt alone, both LoRAs global, OMG (attention masks), OMG with masks from the init picture through the
toy detector and segmenter. The scorer labels every pixel; printed per strength and over all: fidelity,
leakage, both figures present, identities kept, and the layout kept (IoU of the figures with the init
picture's true figures). Grids (one labelled row per method, the init pictures first) go to ``--grids``.
Last line: ``img2img omg/global identities kept ratio: X`` (OMG with attention masks, all strengths).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_quality import CASES, FIRST_SEED, table  # noqa: E402
from toyworld.grids import labelled_grid  # noqa: E402
from toyworld.img2img import METHODS, init_pictures  # noqa: E402
from toyworld.measures import MEASURES, image_measures, summarise  # noqa: E402
from toyworld.methods import Img2Img, ToyWorld  # noqa: E402
from toyworld.model import WEIGHTS, to_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.65, 0.8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--grids", type=Path, default=ROOT / "docs" / "img2img")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    world = ToyWorld(args.weights)
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    columns = min(args.columns, len(seeds))
    every = {m: {name: [] for name in MEASURES} for m in args.methods}
    by_strength = {s: {m: {name: [] for name in MEASURES} for m in args.methods} for s in args.strengths}
    seconds = dict.fromkeys(args.methods, 0.0)
    args.grids.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        pictures, true_kinds = init_pictures(case, seeds)
        for strength in args.strengths:
            shown = {"init picture": to_images(pictures[:columns])}
            for method in args.methods:
                start = time.perf_counter()
                images = METHODS[method](world, case, seeds, Img2Img(pictures, strength)).images
                seconds[method] += time.perf_counter() - start
                shown[method] = images[:columns]
                kinds, looks = world.scorer.labels(images)
                for b in range(len(seeds)):
                    for name, value in image_measures(kinds[b], looks[b], case.looks, true_kinds[b]).items():
                        every[method][name].append(value)
                        by_strength[strength][method][name].append(value)
            name = f"{case.prompt(triggers=True)}_strength_{strength}".replace(" ", "_")
            labelled_grid(shown, columns, f'"{case.prompt(triggers=True)}", img2img strength {strength}, seeds '
                          f"{seeds[0]}-{seeds[columns - 1]}").save(args.grids / f"{name}.png")
        print(f"  {case.prompt(triggers=True)}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    for strength in args.strengths:
        table(f"strength {strength} ({len(CASES)} prompts x {len(seeds)} seeds; layout_iou: figures against the init picture's)",
              by_strength[strength])
    table(f"all strengths ({len(CASES)} prompts x {len(seeds)} seeds x {len(args.strengths)} strengths)", every)
    print("wall seconds per method (all cases and strengths): " + ", ".join(f"{m} {t:.1f}" for m, t in seconds.items()))
    print(f"grids: {args.grids}  ({time.perf_counter() - started:.0f} s in all)")
    if "OMG" in every and "global LoRAs" in every:
        omg_kept, global_kept = (summarise(every[m]["identities_kept"])[0] for m in ("OMG", "global LoRAs"))
        print(f"img2img omg/global identities kept ratio: {omg_kept / global_kept:.3f}" if global_kept
              else f"img2img omg/global identities kept ratio: n/a (global LoRAs kept none; OMG {omg_kept:.3f})")


if __name__ == "__main__":
    main()
