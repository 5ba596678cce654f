"""Concepts extracted from one toy-world picture: how good their masks are, and how close they come to trained LoRAs.

    python benchmarks/bench_extract.py [--pictures 2] [--seeds 8] [--rounds 3] [--steps 60] [--grids docs/extract]

Source pictures are rendered two-figure scenes of known identities (zorb man + quix woman, plok man + vann
woman; side by side or overlapping); the renderer gives the true figure masks. Both figures are extracted with
the base model, which never saw those looks, by each variant:

- ``EM``: the defaults (round-0 masks from attention, then EM rounds; an embedding and a LoRA per concept);
- ``EM, tokens only``: the same without the LoRAs (an embedding per concept, as textual inversion);
- ``round-0 masks``: the tokens and LoRAs trained with the round-0 masks held fixed (no E-step after it);
- ``whole picture``: every token and LoRA trained on the whole picture, no masks (A1111's textual inversion);
- ``user boxes``: the figures' true bounding boxes drawn as the first masks, then EM;
- ``user boxes fixed``: the boxes held through every round.

Printed: (a) each variant's mask IoU against the true masks at round 0 and after each round; (b) each concept
alone in new prompts (another background): identity fidelity from the scorer; (c) both concepts composed by OMG in
new prompts (another background; side by side, and one in front of the other): identities kept and leakage,
against OMG with the committed identity LoRAs trained on hundreds of pictures. Also the seconds and peak memory
of an extraction. Last lines: ``EM mask IoU gain`` (the defaults' last round over round 0) and
``extracted/lora identities kept ratio``, the defaults' identities kept over the LoRAs'.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omg_ext.concepts.settings import ExtractSettings  # noqa: E402
from toyworld.extraction import ExtractedConcepts, extract_from, iou, omg_extracted, source_picture, source_scene  # noqa: E402
from toyworld.grids import labelled_grid  # noqa: E402
from toyworld.measures import ConceptLook, image_measures, summarise  # noqa: E402
from toyworld.merging import with_lora  # noqa: E402
from toyworld.methods import Case, ToyWorld, omg  # noqa: E402
from toyworld.scenes import BACKGROUNDS, IDENTITIES, Figure, Scene, scene_prompt  # noqa: E402

PAIRS = ((1, 2), (3, 4))
FIRST_SEED = 5000
VARIANTS = ("EM", "EM, tokens only", "round-0 masks", "whole picture", "user boxes", "user boxes fixed")


def boxes(truth: torch.Tensor) -> torch.Tensor:
    """Each true mask's bounding box, filled: what a user draws."""
    out = torch.zeros_like(truth)
    for j, m in enumerate(truth > 0.5):
        ys, xs = m.nonzero(as_tuple=True)
        out[j, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    return out


def run_variant(world: ToyWorld, scene: Scene, variant: str, settings: ExtractSettings):
    _, truth = source_picture(scene)
    s = ExtractSettings(**{**settings.__dict__, "lora": variant != "EM, tokens only"})
    if variant in ("EM", "EM, tokens only"):
        return extract_from(world, scene, s)
    if variant == "user boxes":
        return extract_from(world, scene, s, drawn=boxes(truth))
    if variant == "user boxes fixed":
        return extract_from(world, scene, ExtractSettings(**{**s.__dict__, "user_masks": "fixed"}), drawn=boxes(truth))
    if variant == "whole picture":
        drawn = torch.ones_like(truth)
    else:  # round-0 masks held through every round
        drawn = extract_from(world, scene, ExtractSettings(**{**s.__dict__, "rounds": 0})).rounds[0].masks[0]
    return extract_from(world, scene, ExtractSettings(**{**s.__dict__, "user_masks": "fixed"}), drawn=drawn)


def fidelity(world: ToyWorld, images: torch.Tensor, identity: int) -> list[float]:
    kinds, looks = world.scorer.labels(images)
    return [image_measures(kinds[b], looks[b], [ConceptLook(identity)])["fidelity"] for b in range(len(images))]


def composed(world: ToyWorld, method, case: Case, seeds: list[int]):
    images = method(case, seeds).images
    kinds, looks = world.scorer.labels(images)
    return [image_measures(kinds[b], looks[b], case.looks) for b in range(len(seeds))], images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=2, help="source pictures per identity pair")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=ExtractSettings.rounds)
    parser.add_argument("--steps", type=int, default=ExtractSettings.steps)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--grids", type=Path, default=ROOT / "docs" / "extract")
    args = parser.parse_args()
    torch.manual_seed(0)
    world = ToyWorld()
    settings = ExtractSettings(rounds=args.rounds, steps=args.steps)
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    args.grids.mkdir(parents=True, exist_ok=True)
    ious: dict[str, list[list[float]]] = {v: [[] for _ in range(args.rounds + 1)] for v in args.variants}
    alone: dict[str, list[float]] = {v: [] for v in ["trained LoRAs", *args.variants]}
    together: dict[str, dict[str, list[float]]] = {v: {} for v in ["trained LoRAs", *args.variants]}
    seconds, peaks = [], []
    for pair in PAIRS:
        for p in range(args.pictures):
            scene = source_scene(pair, p)
            _, truth = source_picture(scene)
            others = [b for b in BACKGROUNDS if b != scene.background]
            cases = [Case(pair, others[0]), Case(pair, others[1], in_front=True)]
            shown = {}
            for variant in args.variants:
                start = time.perf_counter()
                extraction = run_variant(world, scene, variant, settings)
                seconds.append(time.perf_counter() - start)
                peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                for r, result in enumerate(extraction.rounds):
                    ious[variant][r].extend(iou(result.masks[0], truth))
                extracted = ExtractedConcepts(world, extraction, [f.kind for f in scene.figures])
                for j, k in enumerate(pair):
                    alone[variant] += fidelity(world, extracted.alone(j, others[2], seeds).images, k)
                for case in cases:
                    measures, images = composed(world, lambda c, s: omg_extracted(world, extracted, c, s), case, seeds)
                    shown.setdefault(case, {})[variant] = images
                    for m in measures:
                        for name, value in m.items():
                            together[variant].setdefault(name, []).append(value)
                print(f"pair {pair} picture {p} {variant}: {seconds[-1]:.1f} s, IoU by round "
                      + " ".join(f"{sum(iou(r.masks[0], truth)) / 2:.2f}" for r in extraction.rounds), flush=True)
            for j, k in enumerate(pair):
                prompt = scene_prompt(Scene(others[2], [Figure(IDENTITIES[k - 1].figure, 0, 0, 0, k)]))
                alone["trained LoRAs"] += fidelity(world, with_lora(world, world.lora(k), prompt, seeds).images, k)
            for case in cases:
                measures, images = composed(world, lambda c, s: omg(world, c, s), case, seeds)
                shown[case] = {"trained LoRAs (OMG)": images, **{f"{v} (OMG)": im for v, im in shown[case].items()}}
                for m in measures:
                    for name, value in m.items():
                        together["trained LoRAs"].setdefault(name, []).append(value)
                names = "_".join(IDENTITIES[k - 1].trigger for k in pair)
                labelled_grid(shown[case], min(len(seeds), 8), f'"{case.prompt()}", concepts from picture {p} of {pair}'
                              ).save(args.grids / f"{names}_picture_{p}_{'_'.join(case.prompt().split())}.png")

    print(f"\n(a) mask IoU against the true figure masks, by round ({len(PAIRS) * args.pictures} pictures, 2 concepts each)")
    print(f"{'variant':<20}" + "".join(f"{'round ' + str(r):>14}" for r in range(args.rounds + 1)))
    for variant, rounds in ious.items():
        print(f"{variant:<20}" + "".join("{:>7.3f} ±{:.3f}".format(*summarise(v)) if v else f"{'':>14}" for v in rounds))
    print("\n(b) each concept alone in a new prompt: identity fidelity")
    for variant, values in alone.items():
        print(f"{variant:<20}" + "{:>8.3f} ±{:.3f}".format(*summarise(values)))
    print("\n(c) both concepts with OMG in new prompts (side by side; one in front): identities kept, leakage")
    for variant, measures in together.items():
        print(f"{variant:<20}" + "".join("{:>10.3f} ±{:.3f}".format(*summarise(measures[m])) for m in ("identities_kept", "leakage")))
    print(f"\nan extraction: {sum(seconds) / len(seconds):.1f} s on average (CPU, {torch.get_num_threads()} threads), "
          f"peak memory of the process {max(peaks):.0f} MB")
    lora_kept = summarise(together["trained LoRAs"]["identities_kept"])[0]
    best = max(args.variants, key=lambda v: summarise(together[v]["identities_kept"])[0])
    print(f"variant keeping most identities: {best}")
    default = args.variants[0]
    gain = summarise(ious[default][-1])[0] - summarise(ious[default][0])[0]
    print(f"{default} mask IoU gain (round {args.rounds} over round 0): {gain:+.3f}")
    kept = summarise(together[default]["identities_kept"])[0]
    print(f"extracted/lora identities kept ratio: {kept / lora_kept if lora_kept else 0.0:.3f}")


if __name__ == "__main__":
    main()
