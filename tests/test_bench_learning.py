"""bench/instrument_by_program.py and the MFCC codes of bench/pretrain_learning.py."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

_BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _families(seed=0, clips=12):
    """3 families x 4 programs; each program gets its own offset around its family's centre."""
    rng = np.random.default_rng(seed)
    labels, programs, fold, rows = [], [], [], []
    for f in range(3):
        for k in range(4):
            for _ in range(clips):
                labels.append(f"fam{f}")
                programs.append(10 * f + k)
                fold.append(k)
                rows.append(rng.standard_normal(8))
    return np.array(labels), np.array(programs), np.array(fold), np.array(rows)


def test_instrument_by_program_scores_every_program_once_and_tells_signal_from_noise():
    bench = _load("instrument_by_program")
    labels, programs, fold, noise = _families()
    family = np.array([int(s[-1]) for s in labels])
    informative = noise.copy()
    informative[np.arange(len(family)), family] += 6.0  # each family has its own direction, in every program
    good = bench.per_program_accuracy(informative[:, None, :], labels, programs, fold)
    bad = bench.per_program_accuracy(noise[:, None, :], labels, programs, fold)
    assert sorted(good) == sorted(bad) == sorted(set(programs.tolist()))  # each program tested once
    assert min(good.values()) > 0.9
    assert np.mean(list(bad.values())) < 0.6  # 3 families: chance 1/3
    mean, lo, hi = bench.bootstrap_mean(np.array([good[p] - bad[p] for p in sorted(good)]))
    assert lo > 0 and lo <= mean <= hi


def test_mfcc_codes_follow_the_timbre_not_the_gain():
    bench = _load("pretrain_learning")
    sr = 24000
    t = torch.arange(sr) / sr
    rng = torch.Generator().manual_seed(0)
    bright = sum(torch.sin(2 * torch.pi * 220 * h * t) / h for h in range(1, 12))  # many harmonics
    dull = torch.sin(2 * torch.pi * 220 * t)
    clips = [0.3 * (bright / bright.abs().max()), 0.3 * dull, 0.01 * torch.randn(sr, generator=rng)]
    frames = [sr // 320 + 1] * len(clips)
    codes = bench.mfcc_codes(clips, frames, clusters=4, seed=0)
    assert [c.shape for c in codes] == [torch.Size([1, frames[0]])] * 3
    louder = bench.mfcc_codes([10.0 * c for c in clips], frames, clusters=4, seed=0)
    for a, b in zip(codes, louder):  # c0 (the level) is left out: the same codes at any gain
        assert torch.equal(a, b)
    mid = slice(10, -10)  # away from the clip edges
    assert codes[0][0, mid].unique().numel() == 1 and codes[1][0, mid].unique().numel() == 1
    assert codes[0][0, 40] != codes[1][0, 40]  # bright and dull tones get different codes
