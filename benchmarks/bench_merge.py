"""Merging the toy world's identity LoRAs into one file: how much of each identity the merged file keeps.

    python benchmarks/bench_merge.py [--seeds 10] [--methods distil loraclr "least squares" sum] [--sets 2 3 4] [--grids docs/merge]
                                     [--weights DIR] [--keep DIR]

The identity LoRAs merged are the ones trained with class regularisation images (``toyworld/weights/regularised``:
each identity answers to its trigger word, and "a man" stays plain); ``--weights toyworld/weights`` merges the
committed civitai-style ones instead (trained on the identity alone: they paint every man or woman).
For 2, 3 and 4 identities (zorb, quix, plok and the LoHa vann) merged by each method: the time and peak memory
of the merge, the largest relative SVD error of the saved file, and, per identity, the fidelity of its
single-figure prompts (its trigger on every background, seeds not used while merging) with the merged file
against its own LoRA. Then the quality benchmark's two-concept prompts (two with occlusion): identities kept
and leakage for the merged file alone, both LoRAs loaded globally, OMG with the two LoRAs and OMG with the
merged file as both concepts' LoRA. Grids with labelled rows go to ``--grids``. Last line: the lowest
identity's ``merged/own fidelity ratio`` of the 4-identity merge with the first method.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from omg_ext.merge.fit import METHODS  # noqa: E402
from omg_ext.merge.merge import MergeSettings  # noqa: E402
from toyworld.grids import labelled_grid  # noqa: E402
from toyworld.lora_files import read_kohya  # noqa: E402
from toyworld.measures import image_measures, summarise  # noqa: E402
from toyworld.merging import REGULARISED, MergedWorld, merged_file, merged_name, single_fidelity, with_lora  # noqa: E402
from toyworld.methods import Case, ToyWorld, global_loras, omg  # noqa: E402

SETS = ((1, 2), (1, 2, 3), (1, 2, 3, 4))
CASES = (Case((1, 2), "on grass"), Case((1, 2), "at the beach", in_front=True),
         Case((3, 4), "in snow"), Case((3, 4), "at night", in_front=True))
FIRST_SEED = 3000


def two_concept(world: ToyWorld, method, case: Case, seeds: list[int]) -> tuple[dict[str, list[float]], torch.Tensor]:
    images = method(world, case, seeds).images
    kinds, looks = world.scorer.labels(images)
    measures: dict[str, list[float]] = {}
    for b in range(len(seeds)):
        for name, value in image_measures(kinds[b], looks[b], case.looks).items():
            measures.setdefault(name, []).append(value)
    return measures, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["distil", *(m for m in METHODS if m != "distil")], choices=list(METHODS))
    parser.add_argument("--grids", type=Path, default=ROOT / "docs" / "merge")
    parser.add_argument("--rows", type=int, default=4096, help="input rows sampled per layer and identity")
    parser.add_argument("--sets", type=int, nargs="+", default=[len(s) for s in SETS], choices=[len(s) for s in SETS],
                        help="how many identities each merge takes (the first 2, 3 or all 4)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="a folder the merged files are kept in (toyworld/weights/regularised takes the tests' 4-identity distil merge); "
                             "a merge already there is measured again, not remade")
    parser.add_argument("--weights", type=Path, default=REGULARISED,
                        help="the folder of the identity LoRAs (e.g. toyworld/weights for the civitai-style ones); "
                             "the base model and scorer stay the committed ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    world = ToyWorld()
    world.files = {k: args.weights / path.name for k, path in world.files.items()}
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    columns = min(len(seeds), 8)
    args.grids.mkdir(parents=True, exist_ok=True)
    own, own_pictures = {}, {}
    for k in SETS[-1]:
        own[k], own_pictures[k] = single_fidelity(world, world.lora(k), k, seeds)
    print("own LoRA fidelity on its single-figure prompts: " + ", ".join(f"{k} {v:.3f}" for k, v in own.items()))
    painted = {k: single_fidelity(world, world.lora(k), k, seeds, trigger=False)[0] for k in SETS[-1]}
    print("...and on the same prompts without its trigger (figures it was not asked for): "
          + ", ".join(f"{k} {v:.3f}" for k, v in painted.items()))
    folder = args.keep or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    ratios, files = {}, {}
    print(f"\n{'identities':<12}{'method':<15}{'seconds':>9}{'peak MB':>9}{'svd err':>9}   merged/own fidelity per identity")
    chosen = [s for s in SETS if len(s) in args.sets]
    last = chosen[-1]
    for identities in chosen:
        for method in args.methods:
            path = folder / merged_name(identities, method)
            if path.exists():  # a kept merge is measured again, not remade: no time, memory or error of its own
                made = f"{'kept':>9}{'-':>9}{'-':>9}"
            else:
                start = time.perf_counter()
                errors = merged_file(world, identities, path, MergeSettings(method=method, rows=args.rows))
                seconds = time.perf_counter() - start
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                made = f"{seconds:>9.1f}{peak:>9.0f}{max(errors.values()):>9.3f}"
            merged = read_kohya(path, world.model)
            files[identities, method] = path
            pictures = {}
            for k in identities:
                fidelity, pictures[k] = single_fidelity(world, merged, k, seeds)
                ratios[identities, method, k] = fidelity / own[k] if own[k] else 0.0
            print(f"{len(identities):<12}{method:<15}{made}   "
                  + ", ".join(f"{k} {ratios[identities, method, k]:.3f}" for k in identities), flush=True)
            if identities == last:
                rows = {}
                for k in identities:
                    rows[f"{world.files[k].stem}: own LoRA"] = own_pictures[k]
                    rows[f"{world.files[k].stem}: merged ({method})"] = pictures[k]
                labelled_grid(rows, columns, f"each identity alone with its own LoRA and with the 4-identity merge ({method})"
                              ).save(args.grids / f"single_{method.replace(' ', '_')}.png")

    print(f"\ntwo-concept prompts ({len(CASES)} prompts x {len(seeds)} seeds), the {len(last)}-identity merge")
    best = args.methods[0]
    merged_world = MergedWorld(world, files[last, best])

    methods = {f"merged file ({best})": lambda w, case, s: merged_only(merged_world, case, s),
               "both LoRAs global": global_loras, "OMG": omg,
               f"OMG + merged ({best})": lambda w, case, s: omg(merged_world, case, s)}
    table: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for case in CASES:
        shown = {}
        for name, method in methods.items():
            measures, shown[name] = two_concept(world, method, case, seeds)
            for measure, values in measures.items():
                table[name].setdefault(measure, []).extend(values)
        labelled_grid(shown, columns, f'"{case.prompt(triggers=True)}"').save(
            args.grids / f"{case.prompt(triggers=True).replace(' ', '_')}.png")
    print(f"{'method':<28}" + "".join(f"{m:>18}" for m in ("fidelity", "leakage", "both_present", "identities_kept")))
    for name, measures in table.items():
        print(f"{name:<28}" + "".join("{:>11.3f} ±{:.3f}".format(*summarise(measures[m]))
                                      for m in ("fidelity", "leakage", "both_present", "identities_kept")))
    lowest = min(ratios[last, best, k] for k in last)
    print(f"merged/own fidelity ratio: {lowest:.3f}")


def merged_only(world: MergedWorld, case: Case, seeds: list[int]):
    """The merged file alone on the whole model, both triggers in the prompt: one LoRA as a WebUI loads it."""
    return with_lora(world, world.merged, case.prompt(triggers=True), seeds)


if __name__ == "__main__":
    main()
