#!/usr/bin/env python3
"""The instrument task with the GM program as the unit: leave-one-program-out probes of a demo.

The demo corpus's instrument task holds out one GM program per family (6 test programs), so its
test score is a handful of per-program outcomes, and the probe report's paired bootstrap over test
*pieces* does not see that variance. Here every program of every family is the test program once
(fold k tests the k-th program of each family and trains on the others; valid-split programs take
part too), a logistic probe (z-scored, all layers concatenated, as the demo's learning curve) is
scored per program, and the pretrained - random init difference is bootstrapped over programs::

    python bench/instrument_by_program.py demo_output

Reads ``DEMO/corpus/instrument.csv`` (its ``program`` column) and the demo's features
(``DEMO/features/pretrained``, ``DEMO/features/random_init``); the ``level`` baseline (loudness and
envelope, no spectrum) is computed from the audio. docs/LEARNING.md 7.5 has the runs.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mert_plugin.probe.features import handcrafted_features, load_feature_set  # noqa: E402


def per_program_accuracy(x: np.ndarray, labels: np.ndarray, programs: np.ndarray, fold: np.ndarray) -> dict:
    """x [N, ...] features, labels/programs/fold [N] -> ``{program: test accuracy}`` over the folds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = x.reshape(len(x), -1)
    out = {}
    for k in np.unique(fold):
        test = fold == k
        mean, std = x[~test].mean(0), x[~test].std(0) + 1e-8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=0.1, max_iter=1000).fit((x[~test] - mean) / std, labels[~test])
        predicted = clf.predict((x[test] - mean) / std)
        for p in np.unique(programs[test]):
            sel = programs[test] == p
            out[int(p)] = float(np.mean(predicted[sel] == labels[test][sel]))
    return out


def bootstrap_mean(d: np.ndarray, draws: int = 5000, seed: int = 0):
    """Mean of ``d`` and its 95 % percentile interval over resampled entries."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (draws, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", help="a finished demo folder (python -m mert_plugin.demo --out DEMO)")
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    corpus = demo / "corpus"
    with open(corpus / "instrument.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "program" not in rows[0] or not rows[0]["program"]:
        sys.exit(f"error: {corpus / 'instrument.csv'} has no GM programs (a synthesiser corpus?)")
    paths = [r["path"] for r in rows]
    labels = np.array([r["label"] for r in rows])
    programs = np.array([int(r["program"]) for r in rows])
    order = {f: sorted(set(programs[labels == f])) for f in sorted(set(labels))}
    fold = np.array([order[f].index(p) for f, p in zip(labels, programs)])
    sets = {n: load_feature_set(demo / "features" / n, paths, n) for n in ("pretrained", "random_init")}
    sets["level"] = np.stack(handcrafted_features(corpus, paths, "level", progress=False))
    scores = {name: per_program_accuracy(x, labels, programs, fold) for name, x in sets.items()}
    units = sorted(scores["pretrained"])
    print(f"{len(units)} programs in {len(order)} families, {fold.max() + 1} folds; "
          f"chance (most frequent family) {max(np.mean(labels == f) for f in order):.3f}")
    for name, acc in scores.items():
        print(f"  {name:<12} mean accuracy over programs {np.mean([acc[p] for p in units]):.3f}")
    for other in ("random_init", "level"):
        d = np.array([scores["pretrained"][p] - scores[other][p] for p in units])
        mean, lo, hi = bootstrap_mean(d)
        print(f"  pretrained - {other}: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] (95 % bootstrap over programs)")
    print("per program (pretrained / random_init / level):")
    for family, progs in order.items():
        print(f"  {family:<8} " + "  ".join(
            f"gm{p} {scores['pretrained'][p]:.2f}/{scores['random_init'][p]:.2f}/{scores['level'][p]:.2f}"
            for p in progs))


if __name__ == "__main__":
    main()
