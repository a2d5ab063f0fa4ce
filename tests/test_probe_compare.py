"""Paired comparisons of feature sets over test pieces (mert_plugin.probe.compare) and the level baseline."""
import numpy as np
import pytest

from mert_plugin.probe.compare import (BETTER, UNRESOLVED, WORSE, compare, describe, paired_bootstrap,
                                       within_spread)
from mert_plugin.probe.features import HandcraftedExtractor, level_features


def grouped(a_right_per_group, clips_per_group=5, seeds=1):
    """Multiclass outputs where A is right on every clip of the groups flagged 1 (and wrong elsewhere)
    and B is always wrong: the per-clip difference is the group's flag."""
    flags = np.repeat(np.asarray(a_right_per_group), clips_per_group)
    y = np.zeros(len(flags), dtype=np.int64)
    a = np.tile(np.where(flags == 1, 0, 1), (seeds, 1))
    b = np.ones((seeds, len(flags)), dtype=np.int64)
    groups = [f"piece{g}" for g in np.repeat(np.arange(len(a_right_per_group)), clips_per_group)]
    return a, b, y, groups


def test_bootstrap_interval_matches_the_standard_error_of_a_mean_over_pieces():
    rng = np.random.default_rng(0)
    flags = (rng.random(60) < 0.4).astype(int)
    boot = paired_bootstrap(*grouped(flags), multilabel=False)
    assert boot["difference"] == pytest.approx(flags.mean()) and boot["test_pieces"] == 60
    # Equal-sized pieces: the statistic is the mean of 60 piece values, whose standard error is sd/sqrt(60)
    se = flags.std() / np.sqrt(len(flags))
    assert boot["ci_high"] - boot["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert boot["ci_low"] < flags.mean() < boot["ci_high"]
    assert paired_bootstrap(*grouped(flags), multilabel=False) == boot          # deterministic


def test_resampling_is_by_piece_not_by_clip():
    # A wins on every clip of one piece out of 10, ties elsewhere: 50 clips, but one piece of evidence.
    flags = np.zeros(10, dtype=int)
    flags[3] = 1
    a, b, y, groups = grouped(flags, clips_per_group=5)
    a[:, np.asarray(groups) != "piece3"] = 0              # the other pieces: both right ...
    b[:, np.asarray(groups) != "piece3"] = 0
    boot = paired_bootstrap(a, b, y, groups, multilabel=False)
    assert boot["difference"] == pytest.approx(0.1) and boot["ci_low"] == 0.0  # ... so a draw without piece 3 is a tie
    by_clip = paired_bootstrap(a, b, y, [f"clip{i}" for i in range(len(y))], multilabel=False)
    assert by_clip["ci_low"] > 0                          # resampling clips would wrongly exclude 0


def test_identical_outputs_and_a_single_piece_are_not_distinguishable():
    a, _, y, groups = grouped(np.ones(20, dtype=int), seeds=3)
    same = paired_bootstrap(a, a, y, groups, multilabel=False)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0
    assert compare(0.8, 0.01, 0.8, 0.01, same)["decision"] == UNRESOLVED
    one = paired_bootstrap(*grouped([1]), multilabel=False)
    assert one["ci_low"] is None and one["test_pieces"] == 1
    c = compare(1.0, 0.0, 0.0, 0.0, one)                  # a huge margin on one piece proves nothing
    assert c["decision"] == UNRESOLVED and "1 test piece" in describe(c)


def test_decision_needs_both_the_seed_spread_and_the_interval():
    boot = paired_bootstrap(*grouped(np.ones(20, dtype=int)), multilabel=False)  # interval [1, 1]
    assert compare(0.9, 0.01, 0.5, 0.01, boot)["decision"] == BETTER
    assert compare(0.52, 0.02, 0.5, 0.02, boot)["decision"] == UNRESOLVED       # inside the seed spread
    wide = {"ci_low": -0.05, "ci_high": 0.6, "test_pieces": 5, "confidence": 0.95, "draws": 2000}
    assert compare(0.9, 0.01, 0.5, 0.01, wide)["decision"] == UNRESOLVED        # interval includes 0
    low = {**wide, "ci_low": -0.6, "ci_high": -0.1}
    assert compare(0.5, 0.01, 0.9, 0.01, low)["decision"] == WORSE
    assert compare(0.5, 0.01, 0.9, 0.01, None)["decision"] == UNRESOLVED         # nothing measured
    c = compare(0.9, 0.01, 0.5, 0.01, boot)
    assert describe(c) == "+0.400 (95% CI +1.000..+1.000 over 20 test pieces; seed spread 0.020)"


def test_multilabel_difference_is_the_mean_of_each_seeds_roc_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    n, tags = 60, 4
    y = (rng.random((n, tags)) < 0.4).astype(np.float32)
    a = np.clip(y[None] * 0.6 + rng.random((3, n, tags)) * 0.5, 0, 1)          # informative
    b = rng.random((2, n, tags))                                                   # noise, other seed count
    groups = [f"p{i // 3}" for i in range(n)]
    boot = paired_bootstrap(a, b, y, groups, multilabel=True, draws=200)
    ref = (np.mean([roc_auc_score(y, s, average="macro") for s in a])
           - np.mean([roc_auc_score(y, s, average="macro") for s in b]))
    assert boot["difference"] == pytest.approx(ref) and boot["test_pieces"] == 20
    assert 0 < boot["ci_low"] < ref < boot["ci_high"]


def test_mismatched_shapes_are_a_probe_error():
    from mert_plugin.probe import ProbeError

    a, b, y, groups = grouped([1, 0, 1])
    with pytest.raises(ProbeError, match="test clips"):
        paired_bootstrap(a, b[:, :-1], y, groups, multilabel=False)


def test_within_spread():
    assert within_spread(0.5, 0.02, 0.53, 0.01) and not within_spread(0.5, 0.01, 0.53, 0.01)


def test_level_baseline_reads_level_and_envelope_only():
    sr = 24000
    t = np.arange(2 * sr) / sr
    tone = np.sin(2 * np.pi * 440 * t)
    loud, quiet = level_features(0.5 * tone), level_features(0.05 * tone)
    assert loud.shape == (18,) and loud.dtype == np.float32
    assert loud[0] - quiet[0] == pytest.approx(20.0, abs=0.01)            # mean frame dB: -20 dB gain
    assert np.allclose(loud[10:], quiet[10:], atol=1e-3)                   # the envelope ignores gain
    assert np.allclose(level_features(0.5 * np.sin(2 * np.pi * 1000 * t)), loud, atol=0.05)  # no pitch in it
    decay = level_features(0.5 * tone * np.exp(-3 * t))
    assert np.all(np.diff(decay[10:]) < 0)                                 # a decaying note: falling envelope
    assert level_features(np.full(100, 0.1)).shape == (18,)               # shorter than one frame
    assert HandcraftedExtractor("level")(0.5 * tone).shape == (1, 18)
