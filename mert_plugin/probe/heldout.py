"""Every held-out group in turn: leave-one-group-out probes, e.g. every GM program as the test instrument.

A ``mert-corpus`` instrument task holds out one or two GM programs per family for test, so its test
score is decided by a handful of instruments (9 in the demo), whatever the number of clips. Here each
family's programs take turns: fold k tests the k-th program of every family (valid-split programs
take part too) and trains on the others. A logistic probe (z-scored features, all layers
concatenated, as the demo's learning curve) is scored on every program, and the difference
between two feature sets is bootstrapped over programs, the unit whose sample decides whether
features tell an unseen instrument's family (docs/LEARNING.md 7.5).

The same comparison with the programs *heard* by the probe (:func:`instrument_seen_programs`: two
folds, every program's pieces alternating between them) separates "the features do not transfer
to a new program" from "the features do not hold the timbre at all" (LEARNING.md 7.6).

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


def piece_folds(groups: Sequence, pieces: Sequence, seed: int = 0) -> np.ndarray:
    """``[N]`` fold (0 or 1) of every clip: each group's pieces, in a seeded random order, alternate
    between the two folds, so that every group with >= 2 pieces is in both."""
    groups, pieces = np.asarray(groups), np.asarray(pieces)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(groups), dtype=np.int64)
    for g in np.unique(groups):
        for i, piece in enumerate(rng.permutation(sorted(set(pieces[groups == g].tolist())))):
            fold[(groups == g) & (pieces == piece)] = i % 2
    return fold


def compare_by_group(features: Mapping[str, np.ndarray], labels: Sequence[str], groups: Sequence,
                     folds: Optional[Sequence[np.ndarray]] = None) -> Dict:
    """Every group held out in turn (or, with ``folds``, each fold assignment given, a group's
    accuracy averaged over them), for every feature set (the first is the main one); accuracies
    are scored per group. Returns ``{"groups", "chance", "accuracy": {set: mean over groups},
    "per_group": {set: {group: acc}}, "differences": {other: {"difference", "ci_low", "ci_high",
    "confidence"}}}``."""
    labels = np.asarray(labels)
    folds = [group_folds(labels, groups)] if folds is None else list(folds)
    per_group = {}
    for name, x in features.items():
        runs = [per_group_accuracy(x, labels, groups, fold) for fold in folds]
        per_group[name] = {g: float(np.mean([r[g] for r in runs])) for g in set.intersection(*(set(r) for r in runs))}
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
    task = _instrument_task(corpus_dir, feature_dirs, level)
    if task is None:
        return None
    labels, programs, _, features = task
    return compare_by_group(features, labels, programs)


def instrument_seen_programs(corpus_dir, feature_dirs: Mapping[str, object], level: bool = True,
                             baselines: Sequence[str] = (), repeats: int = 5) -> Optional[Dict]:
    """As :func:`instrument_by_program`, but every program is heard by the probe: two folds by piece
    (:func:`piece_folds`), scored per program and averaged over ``repeats`` random fold assignments
    (with few pieces per program one assignment moves a score by several points). ``baselines``:
    more hand-crafted feature sets (e.g. ``"mfcc"``, ``"cqt"``). None where
    :func:`instrument_by_program` gives None."""
    task = _instrument_task(corpus_dir, feature_dirs, level, baselines)
    if task is None:
        return None
    labels, programs, pieces, features = task
    folds = [piece_folds(programs, pieces, seed) for seed in range(repeats)]
    result = compare_by_group(features, labels, programs, folds)
    result["protocol"] = "seen"
    return result


def _instrument_task(corpus_dir, feature_dirs, level, baselines=()):
    """``(labels, programs, pieces, {set: [N, L, D]})`` of a corpus's instrument task, or None."""
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
    for kind in (["level"] if level else []) + list(baselines):
        features[kind] = np.stack(handcrafted_features(corpus, paths, kind, progress=False))
    pieces = np.array([r.get("piece") or r["path"] for r in rows])
    return labels, programs, pieces, features


def describe(result: Dict, other: str) -> str:
    """One line for reports: the main set minus ``other``, e.g.
    ``-0.092 (95% CI -0.153..-0.031 over 24 programs, each the test instrument in turn)``."""
    d = result["differences"][other]
    how = ("heard by the probe: 2 folds by piece, repeated" if result.get("protocol") == "seen"
           else "each the test instrument in turn")
    return (f"{d['difference']:+.3f} ({d['confidence']:.0%} CI {d['ci_low']:+.3f}..{d['ci_high']:+.3f} over "
            f"{result['groups']} programs, {how})")
