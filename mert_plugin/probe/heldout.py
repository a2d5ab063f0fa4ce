"""Every held-out group in turn: leave-one-group-out probes, e.g. every GM program as the test instrument.

A ``mert-corpus`` instrument task holds out one GM program per family for test, so its test score
is decided by a handful of instruments (6 in the demo), whatever the number of clips. Here each
family's programs take turns: fold k tests the k-th program of every family (valid-split programs
take part too) and trains on the others. A logistic probe (z-scored features, all layers
concatenated, as the demo's learning curve) is scored on every program, and the difference
between two feature sets is bootstrapped over programs, the unit whose sample decides whether
features tell an unseen instrument's family (docs/LEARNING.md 7.5).

Shapes: N = clips, L = layers, D = feature size.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .curve import logistic_predict
from .features import ProbeError, handcrafted_features, load_feature_set

CONFIDENCE = 0.95
DRAWS = 5000


def group_folds(labels: Sequence[str], groups: Sequence) -> np.ndarray:
    """``[N]`` fold of every clip: the index of its group among its label's groups (sorted)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    order = {lab: sorted(set(groups[labels == lab].tolist())) for lab in set(labels.tolist())}
    return np.array([order[lab].index(g) for lab, g in zip(labels.tolist(), groups.tolist())], dtype=np.int64)


def per_group_accuracy(x: np.ndarray, labels: Sequence[str], groups: Sequence, fold: np.ndarray,
                       c: float = 0.1) -> Dict:
    """Logistic probe, one fit per fold: x ``[N, ...]`` -> ``{group: accuracy on its clips}``.
    A fold whose training clips hold fewer than 2 labels is skipped (its groups get no score)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    labels, groups = np.asarray(labels), np.asarray(groups)
    out = {}
    for k in np.unique(fold):
        test = fold == k
        if len(set(labels[~test].tolist())) < 2:
            continue
        predicted = logistic_predict(x[~test], labels[~test], x[test], c, max_iter=1000)
        for g in np.unique(groups[test]).tolist():
            sel = groups[test] == g
            out[g] = float(np.mean(predicted[sel] == labels[test][sel]))
    return out


def bootstrap_mean(d: np.ndarray, draws: int = DRAWS, confidence: float = CONFIDENCE, seed: int = 0):
    """``(mean, low, high)``: the mean of ``d`` and its percentile interval over resampled entries."""
    d = np.asarray(d, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (draws, len(d)))].mean(1)
    tail = (1.0 - confidence) / 2
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def compare_by_group(features: Mapping[str, np.ndarray], labels: Sequence[str], groups: Sequence) -> Dict:
    """Every group held out in turn, for every feature set (the first is the main one). Returns
    ``{"groups", "chance", "accuracy": {set: mean over groups}, "per_group": {set: {group: acc}},
    "differences": {other: {"difference", "ci_low", "ci_high", "confidence"}}}``."""
    labels = np.asarray(labels)
    fold = group_folds(labels, groups)
    per_group = {name: per_group_accuracy(x, labels, groups, fold) for name, x in features.items()}
    names = list(per_group)
    units = sorted(per_group[names[0]])
    if len(units) < 2:
        raise ProbeError(f"leave-one-group-out needs >= 2 scored groups, got {len(units)}")
    out = {"groups": len(units), "chance": float(max(np.mean(labels == lab) for lab in set(labels.tolist()))),
           "accuracy": {n: float(np.mean([per_group[n][g] for g in units])) for n in names},
           "per_group": {n: {str(g): per_group[n][g] for g in units} for n in names}, "differences": {}}
    for other in names[1:]:
        mean, low, high = bootstrap_mean(np.array([per_group[names[0]][g] - per_group[other][g] for g in units]))
        out["differences"][other] = {"difference": mean, "ci_low": low, "ci_high": high, "confidence": CONFIDENCE}
    return out


def instrument_by_program(corpus_dir, feature_dirs: Mapping[str, object], level: bool = True) -> Optional[Dict]:
    """:func:`compare_by_group` on a corpus's ``instrument.csv`` with its GM ``program`` column as the
    group, for the feature folders given (first = main) and, with ``level``, the level baseline.
    None when the task has no programs (a synthesiser corpus), one family, or a family with a single
    program (nothing to hold out in turn)."""
    corpus = Path(corpus_dir)
    path = corpus / "instrument.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(not (r.get("program") or "").strip() for r in rows):
        return None
    labels = np.array([r["label"] for r in rows])
    programs = np.array([int(r["program"]) for r in rows])
    families = set(labels.tolist())
    if len(families) < 2 or min(len(set(programs[labels == lab].tolist())) for lab in families) < 2:
        return None
    paths = [r["path"] for r in rows]
    features = {name: load_feature_set(folder, paths, name) for name, folder in feature_dirs.items()}
    if level:
        features["level"] = np.stack(handcrafted_features(corpus, paths, "level", progress=False))
    return compare_by_group(features, labels, programs)


def describe(result: Dict, other: str) -> str:
    """One line for reports: the main set minus ``other``, e.g.
    ``-0.092 (95% CI -0.153..-0.031 over 24 programs, each the test instrument in turn)``."""
    d = result["differences"][other]
    return (f"{d['difference']:+.3f} ({d['confidence']:.0%} CI {d['ci_low']:+.3f}..{d['ci_high']:+.3f} over "
            f"{result['groups']} programs, each the test instrument in turn)")
