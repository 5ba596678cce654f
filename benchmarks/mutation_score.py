"""Mutation score of the engine: how many small breakages of ``omg_ext/engine/`` the fast
engine tests catch.

    pip install -r requirements-mutation.txt
    python benchmarks/mutation_score.py            # mutmut run (background-length), then the figures
    python benchmarks/mutation_score.py --report   # the figures of the last run only

mutmut (configured in ``setup.cfg``) copies the code to ``mutants/``, makes one mutant per
small change (an operator, a constant, an argument dropped) and runs the tests that cover
the changed function; results are kept there, so a stopped run continues where it was.
Survivors judged equivalent (no test can tell them apart on this CPU-only machine, or the
change does not alter behaviour) are listed with the reason in
``tests/mutation_equivalent.txt`` and leave the denominator. The still-unexplained
survivors are written to ``tests/mutation_survivors.txt``. Last line: ``mutation score: X%``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
SURVIVORS = ROOT / "tests" / "mutation_survivors.txt"
DETECTED = ("killed", "timeout", "segfault", "caught by type check")


def equivalent_mutants() -> dict[str, str]:
    """Mutant name -> why it cannot (or need not) be killed, from ``tests/mutation_equivalent.txt``."""
    result = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition(" ")
            result[name] = why.strip()
    return result


def statuses() -> dict[str, str]:
    """Every mutant's status from mutmut's result files under ``mutants/``."""
    from mutmut.stats import status_by_exit_code

    result = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            result[name] = status_by_exit_code[code]
    return result


def report() -> float:
    found, equivalent = statuses(), equivalent_mutants()
    if not found:
        sys.exit("no mutation results under mutants/: run without --report first")
    counts = Counter(found.values())
    survivors = [n for n, s in found.items() if s in ("survived", "no tests") and n not in equivalent]
    SURVIVORS.write_text("# Engine mutants no test kills yet, not judged equivalent (written by benchmarks/mutation_score.py).\n"
                         + "".join(f"{n} {found[n]}\n" for n in survivors))
    checked = {n: s for n, s in found.items() if s != "not checked"}
    detected = sum(1 for s in checked.values() if s in DETECTED)
    counted = [n for n in checked if not (n in equivalent and checked[n] not in DETECTED)]
    for status, n in sorted(counts.items()):
        print(f"{status}: {n}")
    print(f"mutants: {len(found)}")
    print(f"checked: {len(checked)}")
    print(f"killed: {detected}")
    print(f"survived: {len(checked) - detected}")
    print(f"equivalent (tests/mutation_equivalent.txt): {sum(1 for n in checked if n in equivalent and checked[n] not in DETECTED)}")
    print(f"unexplained survivors: {len(survivors)} (tests/mutation_survivors.txt)")
    score = 100.0 * detected / max(len(counted), 1)
    print(f"mutation score: {score:.1f}%")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only print the figures of the last run")
    args = parser.parse_args()
    if not args.report:
        # tiny tensors: one thread per worker, or two workers on two cores fight over four threads
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=ROOT, env=env, check=False)
    report()


if __name__ == "__main__":
    main()
