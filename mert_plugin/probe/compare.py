"""Is one feature set better than another on a task? A paired comparison over test pieces.

Two sources of noise move a probe score, and a claim that feature set A beats (or loses to)
feature set B must stand above both:

* **the probe's own randomness** (initialisation, dropout, batch order): the *seed spread*,
  the std over probe seeds of A's score plus that of B's;
* **which music happens to be in the test split**: the clips of one piece share its notes,
  its tempo and its rendering, so a test split of a few pieces is a small sample however many
  clips it holds. A *paired bootstrap over test pieces* measures this: the test pieces are
  drawn with replacement (all clips of a drawn piece come along) and the score difference
  A - B is recomputed on each draw from the two probes' own predictions on the same clips
  (paired: a piece that is hard for both moves both scores alike). Each clip's outcome is
  averaged over the probe seeds first. The 95 % percentile interval of the draws is reported.

The rule (:func:`compare`): A is **better** than B when the score difference exceeds the seed
spread *and* the whole interval lies above 0; **worse** when the difference is below minus the
seed spread *and* the whole interval lies below 0; otherwise the test split cannot tell them
apart. With fewer than 2 test pieces there is no interval, and nothing is better or worse.

The "same within the spread" rule used for fast extraction modes (:func:`within_spread`) is
an equivalence check on the seed spread alone and lives here too, so that both rules share
one definition of the spread.

Shapes: S = probe seeds, N = test clips, C = classes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from .features import ProbeError

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2000
EPS = 1e-9  # scores are means of accuracies: float noise must not decide a tie

BETTER, WORSE, UNRESOLVED = "better", "worse", "not distinguishable"


def seed_spread(std_a: float, std_b: float) -> float:
    """How far two scores may differ by the probes' randomness alone: the sum of their seed stds."""
    return float(std_a) + float(std_b)


def within_spread(score_a: float, std_a: float, score_b: float, std_b: float) -> bool:
    """True when two scores differ by no more than the seed spread (the fast modes' probe criterion)."""
    return abs(float(score_a) - float(score_b)) <= seed_spread(std_a, std_b) + EPS


def _scores(outputs: np.ndarray, y: np.ndarray, idx: np.ndarray, multilabel: bool) -> float:
    """Mean over seeds of the task metric on the clips ``idx`` (repeats allowed).
    ``outputs``: predicted classes ``[S, N]`` or tag probabilities ``[S, N, C]``."""
    if multilabel:
        from .mlp import macro_roc_auc

        return float(np.mean(macro_roc_auc(outputs[:, idx], y[idx])))
    return float(np.mean(outputs[:, idx] == y[idx][None]))


def paired_bootstrap(outputs_a, outputs_b, y, groups: Sequence[str], *, multilabel: bool,
                     draws: int = BOOTSTRAP_DRAWS, confidence: float = CONFIDENCE, seed: int = 0) -> Dict:
    """Bootstrap the score difference A - B over the test clips' groups (pieces).

    ``outputs_a``/``outputs_b``: each probe seed's test outputs, ``[S, N]`` class indices or
    ``[S', N, C]`` tag probabilities (the two sets may have different seed counts); ``y``: ``[N]``
    class indices or ``[N, C]`` 0/1 tags; ``groups``: ``[N]`` piece of every test clip.
    Returns ``{"difference", "ci_low", "ci_high", "confidence", "test_pieces", "draws"}``; the
    interval is ``None`` with fewer than 2 pieces. Deterministic for a given ``seed``.
    """
    a, b, y = np.asarray(outputs_a), np.asarray(outputs_b), np.asarray(y)
    n = len(y)
    if a.shape[1] != n or b.shape[1] != n or len(groups) != n:
        raise ProbeError(f"paired bootstrap: outputs {a.shape} / {b.shape}, labels {y.shape} and "
                         f"{len(groups)} groups disagree on the number of test clips")
    _, g = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    num_groups = int(g.max()) + 1 if n else 0
    every = np.arange(n)
    out = {"difference": _scores(a, y, every, multilabel) - _scores(b, y, every, multilabel),
           "ci_low": None, "ci_high": None, "confidence": confidence, "test_pieces": num_groups, "draws": 0}
    if num_groups < 2:
        return out
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=draws)  # [draws, G]
    if multilabel:  # ROC-AUC does not split into per-clip terms: recompute it on every draw
        members = [np.flatnonzero(g == k) for k in range(num_groups)]
        stats = np.empty(draws)
        for i, row in enumerate(counts):
            idx = np.concatenate([np.repeat(members[k], row[k]) for k in np.flatnonzero(row)])
            stats[i] = _scores(a, y, idx, True) - _scores(b, y, idx, True)
    else:  # accuracy is a mean over clips: per-piece sums of the per-clip difference suffice
        diff = (a == y[None]).mean(0) - (b == y[None]).mean(0)  # [N], each clip averaged over seeds
        stats = (counts @ np.bincount(g, weights=diff, minlength=num_groups)) / (
            counts @ np.bincount(g, minlength=num_groups))
    tail = (1.0 - confidence) / 2
    out.update(ci_low=float(np.quantile(stats, tail)), ci_high=float(np.quantile(stats, 1.0 - tail)), draws=draws)
    return out


def compare(score_a: float, std_a: float, score_b: float, std_b: float, bootstrap: Optional[Dict]) -> Dict:
    """The decision for "A vs B" from both scores' seed stds and :func:`paired_bootstrap`'s result
    (``None``: no predictions kept, so no interval). Returns the figures and ``"decision"``:
    :data:`BETTER`, :data:`WORSE` or :data:`UNRESOLVED` (see the module docstring)."""
    margin, spread = float(score_a) - float(score_b), seed_spread(std_a, std_b)
    boot = bootstrap or {}
    low, high = boot.get("ci_low"), boot.get("ci_high")
    decision = UNRESOLVED
    if low is not None and margin > spread + EPS and low > 0:
        decision = BETTER
    elif high is not None and -margin > spread + EPS and high < 0:
        decision = WORSE
    return {"margin": margin, "seed_spread": spread, "ci_low": low, "ci_high": high,
            "confidence": boot.get("confidence", CONFIDENCE), "test_pieces": boot.get("test_pieces"),
            "draws": boot.get("draws", 0), "decision": decision}


def describe(c: Dict) -> str:
    """One line for reports: ``+0.320 (95% CI +0.210..+0.430 over 12 test pieces; seed spread 0.030)``."""
    if c.get("ci_low") is None:
        interval = f"no interval: {c.get('test_pieces') or 0} test piece(s)"
    else:
        interval = (f"{c['confidence']:.0%} CI {c['ci_low']:+.3f}..{c['ci_high']:+.3f} over "
                    f"{c['test_pieces']} test pieces")
    return f"{c['margin']:+.3f} ({interval}; seed spread {c['seed_spread']:.3f})"
