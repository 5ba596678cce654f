"""Quality in the toy world: does each character keep its own look, and only its own?

    python benchmarks/bench_quality.py [--seeds 50] [--methods "global LoRAs" OMG ...] [--grids docs/quality]

On the committed toy model (``toyworld/weights``: an ldm-shaped UNet and text encoder
trained on drawn scenes, four identity LoRAs, one of them a LoHa), for each two-concept
case (a man and a woman, each with an identity; half of the cases say who stands in front)
and each method of ``toyworld.methods`` on the same seeds, the scorer labels every pixel
and ``toyworld.measures`` gives fidelity, leakage, identity looks on the background, both
figures present and the layout kept (IoU against the no-LoRA image, OMG's pass 1). The one-pass mode's
identities kept (the mode within 1.3x a plain picture's time) is printed as ``one-pass identities kept: X``.

Printed: the measures on ground-truth scenes (the scorer's own check, near-perfect), the
table method × measure (mean ± 95 % interval over images) for all cases and for the
occlusion cases alone, the precision of each masked method's masks (the share on the
concept's own figure in the layout image), how much of each present figure of the final
image lies inside its own mask and its look inside and outside it, the fidelity of present
figures only, and last ``omg/global leakage ratio: X``. Sample grids (one row per method and
one of OMG's masks over the layout image, the same seeds in each column) go to ``--grids`` as PNG.

OMG with SAM or detector masks cannot be measured here: their weights cannot be
downloaded, and random-weight SAM or detectors give meaningless masks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from omg_ext.engine.masks import overlay  # noqa: E402
from toyworld.measures import (MEASURES, figure_in_mask, image_measures, mask_precision, present_fidelity,  # noqa: E402
                               summarise)
from toyworld.grids import labelled_grid  # noqa: E402
from toyworld.methods import ABLATIONS, METHODS, Case, ToyWorld, no_lora  # noqa: E402
from toyworld.model import WEIGHTS  # noqa: E402
from toyworld.scenes import random_scene, render  # noqa: E402

CASES = (
    Case((1, 2), "on grass"),
    Case((1, 2), "at the beach", in_front=True),
    Case((3, 4), "in snow"),
    Case((3, 4), "at night", in_front=True),
)
"""zorb man + quix woman (two LoRAs), plok man + vann woman (a LoRA and a LoHa); two of them with occlusion."""

FIRST_SEED = 1000


def ground_truth(world: ToyWorld, per_case: int = 50) -> dict[str, list[float]]:
    """The measures on rendered scenes of each case's identities: what a perfect generator scores."""
    values: dict[str, list[float]] = {m: [] for m in MEASURES if m != "layout_iou"}
    rng = np.random.default_rng(7)
    for case in CASES:
        images = [render(random_scene(rng, looks=case.identities), rng=rng)[0] for _ in range(per_case)]
        kinds, looks = world.scorer.labels(torch.from_numpy(np.stack(images)))
        for b in range(per_case):
            for name, value in image_measures(kinds[b], looks[b], case.looks).items():
                values[name].append(value)
    return values


def pixel_accuracy(world: ToyWorld, count: int = 200) -> tuple[float, float]:
    """The scorer's per-pixel accuracy on held-out rendered scenes: figure class, and look on figure pixels."""
    from toyworld.scorer import scorer_batch
    images, kinds, looks = scorer_batch(np.random.default_rng(8), count)
    k, lk = world.scorer.labels(images)
    figure = kinds > 0
    return float((k == kinds).float().mean()), float((lk[figure] == looks[figure]).float().mean())


def table(title: str, rows: dict[str, dict[str, list[float]]]) -> None:
    names = [m for m in MEASURES if any(m in r for r in rows.values())]
    print(f"\n{title}")
    print(f"{'method':<15}" + "".join(f"{m:>18}" for m in names))
    for method, values in rows.items():
        cells = []
        for m in names:
            mean, ci = summarise(values[m]) if values.get(m) else (float("nan"), float("nan"))
            cells.append(f"{mean:>10.3f} ±{ci:5.3f}")
        print(f"{method:<15}" + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + list(ABLATIONS))
    parser.add_argument("--ablations", action="store_true", help="also OMG with one setting changed at a time")
    parser.add_argument("--grids", type=Path, default=ROOT / "docs" / "quality")
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="a folder of toy-world weights (default: the committed ones)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    world = ToyWorld(args.weights)
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    runners = {**METHODS, **ABLATIONS}
    if args.ablations:
        args.methods += [m for m in ABLATIONS if m not in args.methods]

    truth = ground_truth(world)
    kinds_acc, looks_acc = pixel_accuracy(world)
    print(f"scorer on held-out rendered scenes: figure class {kinds_acc:.3f}, look on figures {looks_acc:.3f} (pixel accuracy)")
    table("ground-truth scenes (what a perfect generator scores)", {"rendered": truth})

    every = {m: {name: [] for name in MEASURES} for m in args.methods}
    occluded = {m: {name: [] for name in MEASURES} for m in args.methods}
    seconds: dict[str, float] = {}
    precision: dict[str, list[float]] = {}
    in_mask: dict[str, list[tuple]] = {}
    present: dict[str, list[float]] = {}
    args.grids.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        start = time.perf_counter()
        layout = no_lora(world, case, seeds).images
        seconds["no LoRA"] = seconds.get("no LoRA", 0.0) + time.perf_counter() - start
        layout_kinds, _ = world.scorer.labels(layout)
        shown = {}
        for method in args.methods:
            if method == "no LoRA":
                images = layout
            else:
                start = time.perf_counter()
                generated = runners[method](world, case, seeds)
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
                images = generated.images
                if generated.masks is not None and generated.masks.shape[-2:] == layout_kinds.shape[-2:]:
                    precision.setdefault(method, []).extend(
                        value for b in range(len(seeds))
                        for value in mask_precision(generated.masks[b], layout_kinds[b], case.looks))
                    final_kinds, final_looks = world.scorer.labels(images)
                    in_mask.setdefault(method, []).extend(
                        found for b in range(len(seeds))
                        for found in figure_in_mask(generated.masks[b], final_kinds[b], final_looks[b], case.looks))
                if method == "OMG":  # its masks over the layout image, for a person to judge them
                    shown["OMG's masks over no LoRA"] = torch.stack([overlay(generated.masks[b], layout[b].permute(2, 0, 1)).permute(1, 2, 0)
                                                      for b in range(min(args.columns, len(seeds)))])
            shown[method] = images
            kinds, looks = world.scorer.labels(images)
            reference = layout_kinds if kinds.shape == layout_kinds.shape else \
                torch.nn.functional.interpolate(layout_kinds[:, None].float(), size=kinds.shape[-2:])[:, 0].long()
            for b in range(len(seeds)):
                present.setdefault(method, []).extend(present_fidelity(kinds[b], looks[b], case.looks))
                for name, value in image_measures(kinds[b], looks[b], case.looks, reference[b]).items():
                    every[method][name].append(value)
                    if case.in_front:
                        occluded[method][name].append(value)
        name = case.prompt(triggers=True).replace(" ", "_")
        labelled_grid(shown, min(args.columns, len(seeds)), f'"{case.prompt(triggers=True)}", seeds {seeds[0]}-'
                      f"{seeds[min(args.columns, len(seeds)) - 1]}").save(args.grids / f"{name}.png")
        print(f"  {case.prompt(triggers=True)}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    table(f"all cases ({len(CASES)} prompts x {len(seeds)} seeds)", every)
    table("occlusion cases only ('in front of')", occluded)
    print("\nmask precision (share of each concept's mask on its own figure in the layout image): " + ", ".join(
        "{} {:.3f} ±{:.3f}".format(m, *summarise(v)) for m, v in precision.items()))
    print("share of each present final figure inside its own mask, its look inside / outside the mask: " + ", ".join(
        "{} {:.3f}, {:.3f} / {:.3f}".format(m, *(summarise([f[i] for f in found if f[i] is not None])[0] for i in range(3)))
        for m, found in in_mask.items()))
    print("fidelity of the figures that are present (>= 12 px): " + ", ".join(
        "{} {:.3f} ±{:.3f}".format(m, *summarise(v)) for m, v in present.items() if v))
    print("wall seconds per method (all cases): "
          + ", ".join(f"{m} {t:.1f}" for m, t in seconds.items()))
    print(f"grids: {args.grids}  ({time.perf_counter() - started:.0f} s in all)")
    if "OMG one pass" in every:  # the mode within 1.3x a plain picture's time (speed.md)
        print(f"one-pass identities kept: {summarise(every['OMG one pass']['identities_kept'])[0]:.3f}")
    if "OMG" in every and "global LoRAs" in every:
        omg_leak, global_leak = (summarise(every[m]["leakage"])[0] for m in ("OMG", "global LoRAs"))
        print(f"omg/global leakage ratio: {omg_leak / global_leak:.3f}" if global_leak else "omg/global leakage ratio: n/a (no leakage with global LoRAs)")


if __name__ == "__main__":
    main()
