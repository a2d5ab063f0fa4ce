#!/usr/bin/env python3
"""The instrument task with the GM program as the unit: leave-one-program-out probes of a demo.

The demo corpus's instrument task holds out one or two GM programs per family (9 test programs), so its
test score is a handful of per-program outcomes, and the probe report's paired bootstrap over test
*pieces* does not see that variance. Here every program of every family is the test program once
(``mert_plugin.probe.heldout``: logistic probes, bootstrap over programs); the demo prints the same
comparison under its verdict. This script re-runs it on a finished demo folder and prints every
program's score, then the same task with every program heard by the probe (two folds by piece;
``mert_plugin.probe.heldout.instrument_seen_programs``, with MFCC and CQT baselines): features that
lose there hold little timbre at all, not only timbre that fails to transfer::

    python bench/instrument_by_program.py demo_output

docs/LEARNING.md 7.5 has the runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mert_plugin.probe.heldout import describe, instrument_by_program, instrument_seen_programs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", help="a finished demo folder (python -m mert_plugin.demo --out DEMO)")
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    dirs = {n: demo / "features" / n for n in ("pretrained", "random_init")}
    result = instrument_by_program(demo / "corpus", dirs)
    if result is None:
        sys.exit(f"error: {demo / 'corpus' / 'instrument.csv'} has no GM programs with >= 2 per family "
                 f"(a synthesiser corpus?)")
    print(f"{result['groups']} programs; chance (most frequent family) {result['chance']:.3f}")
    for name, acc in result["accuracy"].items():
        print(f"  {name:<12} mean accuracy over programs {acc:.3f}")
    for other in result["differences"]:
        print(f"  pretrained - {other}: {describe(result, other)}")
    print("per program (" + " / ".join(result["per_group"]) + "):")
    for program in result["per_group"]["pretrained"]:
        print(f"  gm{program:<4} " + " / ".join(f"{s[program]:.2f}" for s in result["per_group"].values()))
    seen = instrument_seen_programs(demo / "corpus", dirs, baselines=("mfcc", "cqt"))
    print(f"every program heard by the probe (2 folds by piece, 5 assignments), {seen['groups']} programs:")
    for name, acc in seen["accuracy"].items():
        print(f"  {name:<12} mean accuracy over programs {acc:.3f}")
    for other in seen["differences"]:
        print(f"  pretrained - {other}: {describe(seen, other)}")


if __name__ == "__main__":
    main()
