"""Every program held out in turn (mert_plugin.probe.heldout, bench/instrument_by_program.py) and the
MFCC codes, the family teacher and the pretraining splits of bench/pretrain_learning.py."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

_BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):  # a bench script, by path (bench/ is not a package)
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


def test_every_group_is_held_out_once_and_signal_is_told_from_noise():
    from mert_plugin.probe.heldout import bootstrap_mean, compare_by_group, group_folds, per_group_accuracy

    labels, programs, fold, noise = _families()
    assert np.array_equal(group_folds(labels, programs), fold)
    family = np.array([int(s[-1]) for s in labels])
    informative = noise.copy()
    informative[np.arange(len(family)), family] += 6.0  # each family has its own direction, in every program
    good = per_group_accuracy(informative[:, None, :], labels, programs, fold)
    bad = per_group_accuracy(noise[:, None, :], labels, programs, fold)
    assert sorted(good) == sorted(bad) == sorted(set(programs.tolist()))  # each program tested once
    assert min(good.values()) > 0.9
    assert np.mean(list(bad.values())) < 0.6  # 3 families: chance 1/3
    mean, lo, hi = bootstrap_mean(np.array([good[p] - bad[p] for p in sorted(good)]))
    assert lo > 0 and lo <= mean <= hi
    result = compare_by_group({"pretrained": informative, "random_init": noise}, labels, programs)
    assert result["groups"] == 12 and result["accuracy"]["pretrained"] > 0.9
    d = result["differences"]["random_init"]
    assert d["ci_low"] > 0 and d["difference"] == pytest.approx(np.mean([good[p] - bad[p] for p in sorted(good)]))


def test_instrument_by_program_reads_a_corpus_and_skips_one_without_programs(tmp_path):
    from mert_plugin.probe import save_clip_features
    from mert_plugin.probe.heldout import describe, instrument_by_program, instrument_seen_programs

    labels, programs, _, noise = _families(clips=4)
    rows = ["path,label,split,piece,program"]
    sr = 24000
    for i, (label, program) in enumerate(zip(labels, programs)):
        rel = f"audio/c{i:03d}.wav"
        (tmp_path / "audio").mkdir(exist_ok=True)
        t = np.arange(sr // 4) / sr
        sf.write(tmp_path / rel, (0.1 + 0.2 * (program % 10) / 3) * np.sin(2 * np.pi * 220 * t), sr)
        rows.append(f"{rel},{label},{('train', 'valid', 'test')[i % 3]},p{i},{program}")
        feature = noise[i].copy()
        feature[int(label[-1])] += 6.0
        save_clip_features(tmp_path / "feats" / "pretrained", rel, feature[None].astype(np.float32))
        save_clip_features(tmp_path / "feats" / "random_init", rel, noise[i][None].astype(np.float32))
    (tmp_path / "instrument.csv").write_text("\n".join(rows) + "\n")
    dirs = {n: tmp_path / "feats" / n for n in ("pretrained", "random_init")}
    result = instrument_by_program(tmp_path, dirs)
    assert set(result["accuracy"]) == {"pretrained", "random_init", "level"} and result["groups"] == 12
    assert result["accuracy"]["pretrained"] > 0.9 and "over 12 programs" in describe(result, "random_init")
    seen = instrument_seen_programs(tmp_path, dirs, baselines=("mfcc",), repeats=2)
    assert set(seen["accuracy"]) == {"pretrained", "random_init", "level", "mfcc"} and seen["groups"] == 12
    assert seen["accuracy"]["pretrained"] > 0.9 and "heard by the probe" in describe(seen, "random_init")
    (tmp_path / "instrument.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")  # no program column
    assert instrument_by_program(tmp_path, dirs) is None
    assert instrument_seen_programs(tmp_path, dirs) is None


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


def test_seen_programs_tell_program_timbre_that_does_not_transfer():
    """Features where every program has a direction of its own (timbre that names the program, not
    the family) read the family when the probe has heard the program (two folds by piece) and not
    when the program is new (leave-one-program-out): the two protocols tell these cases apart."""
    from mert_plugin.probe.heldout import compare_by_group, piece_folds

    labels, programs, _, noise = _families(clips=12)
    pieces = np.array([f"p{i // 3}" for i in range(len(labels))])  # 4 pieces of 3 clips per program
    folds = [piece_folds(programs, pieces, seed) for seed in range(3)]
    for fold in folds:
        for p in set(programs.tolist()):  # every program is in both folds, whole pieces at a time
            assert set(fold[programs == p].tolist()) == {0, 1}
        for piece in set(pieces.tolist()):
            assert len(set(fold[pieces == piece].tolist())) == 1
    assert not all(np.array_equal(folds[0], f) for f in folds[1:])  # the seeds give other assignments
    own = noise.copy()
    idx = {p: i for i, p in enumerate(sorted(set(programs.tolist())))}
    big = np.concatenate([own, np.zeros((len(own), 12))], axis=1)
    big[np.arange(len(big)), 8 + np.array([idx[p] for p in programs])] += 6.0
    seen = compare_by_group({"own": big, "noise": noise}, labels, programs, folds)
    unseen = compare_by_group({"own": big, "noise": noise}, labels, programs)
    assert seen["accuracy"]["own"] > 0.9 and seen["differences"]["noise"]["ci_low"] > 0
    assert unseen["accuracy"]["own"] < 0.6  # 3 families: chance 1/3


def test_joint_codes_name_pitch_and_timbre_and_ignore_gain():
    """bench/pretrain_learning.py's joint codebook (linear semitone spectrum + MFCCs in one k-means):
    the same pitch with another timbre, and the same timbre at another pitch, get other codes; a
    gain changes nothing (both feature blocks are level-free)."""
    from mert_plugin.teachers import CQTKMeansTeacher, CQTTeacher

    bench = _load("pretrain_learning")
    sr = 24000
    t = torch.arange(sr) / sr

    def tone(f0, harmonics):
        x = sum(torch.sin(2 * torch.pi * f0 * h * t) / h for h in range(1, harmonics + 1))
        return 0.3 * x / x.abs().max()

    clips = [tone(220, 12), tone(220, 1), tone(330, 12), tone(330, 1)]
    cqt = CQTTeacher()

    def codes(audio):
        cqts = [cqt(a[None])[0] for a in audio]
        teacher = CQTKMeansTeacher(8, 1, seed=0, cqt=cqt, spectrum="linear")
        return bench.joint_codes(audio, cqts, clusters=8, seed=0, teacher=teacher)

    plain, louder = codes(clips), codes([10.0 * c for c in clips])
    for a, b in zip(plain, louder):
        assert torch.equal(a, b)
    mid = [int(c[0, 30:-30].mode().values) for c in plain]  # away from the clip edges
    assert len(set(mid)) == 4, mid  # bright/dull x 220/330 Hz: four codes


def _two_family_corpus(root):
    """24 clips of 1.5 s: even ones 'bright' (8 harmonics), odd ones 'dull' (a sine), 4 pitches;
    clips 0-15 train, 16-23 test; pitch.csv names the family in its timbre column."""
    rng = np.random.default_rng(0)
    sr, rows = 24000, {"pitch": [], "instrument": []}
    (root / "audio").mkdir()
    for i in range(24):
        fam, midi = ("bright", "dull")[i % 2], 57 + (i // 2) % 4
        t = np.arange(sr * 3 // 2) / sr
        harmonics = range(1, 9) if fam == "bright" else (1,)
        wav = sum(np.sin(2 * np.pi * 440 * 2 ** ((midi - 69) / 12) * h * t) / h for h in harmonics)
        rel = f"audio/c{i:02d}.wav"
        sf.write(root / rel, 0.3 * wav / np.abs(wav).max() + 0.003 * rng.standard_normal(len(t)), sr)
        split = "test" if i >= 16 else "train"
        rows["pitch"].append(f"{rel},{midi},{split},{fam}")
        rows["instrument"].append(f"{rel},{fam},{split},")
    (root / "pitch.csv").write_text("path,label,split,timbre\n" + "\n".join(rows["pitch"]) + "\n")
    (root / "instrument.csv").write_text("path,label,split,piece\n" + "\n".join(rows["instrument"]) + "\n")
    return root


def test_pretrain_learning_runs_the_recipe_objective_with_an_mfcc_target(tmp_path):
    """bench/pretrain_learning.py end to end on a tiny corpus: --preset picks the student,
    --mfcc-target and --envelope-weight turn on ObjectiveConfig.mfcc_weight and envelope_weight
    (their losses are logged), and the probes of the
    random and trained students are written, with the single-note family probes when the pitch
    rows name their instrument family."""
    import json

    bench = _load("pretrain_learning")
    _two_family_corpus(tmp_path)
    out = tmp_path / "run.json"
    assert bench.main(["--corpus", str(tmp_path), "--preset", "mert-small", "--updates", "4", "--warmup", "1",
                       "--clusters", "4", "--code-spectrum", "linear", "--mfcc-target", "3", "--crop", "1.0",
                       "--envelope-weight", "2", "--envelope-dims", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["student"]["hidden_size"] == 256  # mert-small, not the default mert-tiny (128)
    assert len(result["log"]) == 4 and all(r["mfcc_mse"] > 0 and r["envelope_mse"] > 0 for r in result["log"])
    assert result["settings"]["envelope_weight"] == 2.0 and result["settings"]["envelope_dims"] == 8
    for probes in (result["random_init"], result["probes"]["4"]):
        assert {"pitch", "instrument", "pitch-seen", "family-notes", "family-notes-seen"} <= set(probes)
        assert len(probes["pitch"]["layers"]) == 5  # 4 layers + the input of the first


def test_pretrain_learning_family_teacher_and_pretraining_splits(tmp_path):
    """The two diagnostics of LEARNING.md 7.10: --pretrain-splits picks the clips pretraining hears
    (train only by default; adding test leaks the held-out clips on purpose), and the supervised
    family teacher codes every frame with its clip's family."""
    import json

    bench = _load("pretrain_learning")
    corpus = _two_family_corpus(tmp_path)
    tasks = ("pitch", "instrument", "key")  # key.csv is missing: skipped
    train = bench.pretraining_paths(corpus, tasks, ["train"])
    assert train == [f"audio/c{i:02d}.wav" for i in range(16)]
    assert bench.pretraining_paths(corpus, tasks, ["train", "test"]) == [f"audio/c{i:02d}.wav" for i in range(24)]
    codes = bench.family_label_codes(corpus, train, [3 + i for i in range(16)])
    for i, c in enumerate(codes):  # 'bright' < 'dull': codes 0 and 1
        assert c.shape == (1, 3 + i) and c.dtype == torch.long
        assert c.eq(i % 2).all(), (i, c)
    out = tmp_path / "run.json"
    assert bench.main(["--corpus", str(corpus), "--teacher", "family-labels", "--cqt-target", "none",
                       "--clusters", "4", "--updates", "2", "--warmup", "1", "--crop", "1.0",
                       "--pretrain-splits", "train", "test", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["pretrain_splits"] == ["train", "test"]
    assert len(result["log"]) == 2 and all(r["acoustic_ce"] > 0 and "cqt_mse" not in r for r in result["log"])


def test_pretrain_learning_by_program_holds_out_every_program():
    """The bench's leave-one-program-out probe scores every program once, and tells features that
    carry the family from noise."""
    bench = _load("pretrain_learning")
    labels, programs, _, noise = _families()
    family = np.array([int(s[-1]) for s in labels])
    rows = [{"label": lab, "program": str(p)} for lab, p in zip(labels, programs)]
    signal = bench.by_program(noise + 3.0 * np.eye(8)[family], rows)
    chance = bench.by_program(noise, rows)
    assert sorted(signal["per_program"]) == sorted(str(p) for p in set(programs.tolist()))
    assert signal["accuracy"] > 0.95 and chance["accuracy"] < 0.6, (signal["accuracy"], chance["accuracy"])


def test_pretrain_learning_refuses_too_few_clusters_for_a_label_teacher(tmp_path):
    """A label teacher with more classes than --clusters stops with a one-line error, not an index
    error inside the loss."""
    bench = _load("pretrain_learning")
    corpus = _two_family_corpus(tmp_path)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--corpus", str(corpus), "--teacher", "family-labels", "--cqt-target", "none",
                    "--clusters", "1", "--updates", "1"])
    assert "--clusters 1 must be larger" in str(stop.value.code)
