"""Tests of the MLP probe, feature loading, baselines and reports.

Features are synthetic with a known answer: one layer carries the label, the others
are pure noise, so the probe must find the label in that layer only.
"""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from mert_plugin.probe import (ProbeConfig, ProbeError, load_feature_set, parse_train_log, pool_draws,
                               probe_feature_set, run_probe, save_clip_features)
from mert_plugin.probe.cli import main as probe_main
from mert_plugin.probe.mlp import macro_roc_auc

torch.set_num_threads(1)
SR = 24000
PNG = b"\x89PNG\r\n\x1a\n"


def separable(num_classes=4, per_class=50, num_layers=5, dim=16, informative=2, seed=0):
    """x [N, L, D]: layer ``informative`` = class centre + noise, every other layer noise.
    Splits 60/20/20, interleaved so every class is in every split."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class)
    x = rng.standard_normal((len(y), num_layers, dim)).astype(np.float32)
    x[:, informative] += 2.0 * rng.standard_normal((num_classes, dim)).astype(np.float32)[y]
    splits = np.array([("train", "train", "train", "valid", "test")[i % 5] for i in range(len(y))])
    return x, y, splits


def test_probe_finds_the_informative_layer_and_chance_elsewhere():
    x, y, splits = separable(informative=1)
    res = probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(0, 1))
    per_layer = np.array(res["per_layer"])
    assert per_layer[1] > 0.95
    noise = np.delete(per_layer, 1)
    assert noise.max() < 0.5 and abs(noise.mean() - 0.25) < 0.12  # 4 classes: chance 0.25
    assert res["best_layer"] == 1  # chosen on validation, not test
    # With MARBLE's learning rate and ~2 steps per epoch the layer weights barely leave
    # the uniform average, whose 4 noise layers dilute the signal: well above chance only.
    assert res["mode"] == "weighted_sum" and res["score"] > 0.45
    assert abs(sum(res["layer_weights"]) - 1) < 1e-5
    assert len(res["runs"]) == 2 and res["std"] == pytest.approx(np.std(res["runs"]))


def test_weighted_sum_picks_the_informative_layer():
    x, y, splits = separable(informative=4)
    res = probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(0, 1),
                            config=ProbeConfig(layer_lr_scale=20.0))
    w = np.array(res["layer_weights"])
    assert w.argmax() == 4 and w[4] > 2 * np.delete(w, 4).max()
    assert res["score"] > 0.8


def test_feature_geometry_tells_collapsed_from_spread_features():
    from mert_plugin.probe.mlp import feature_geometry

    rng = np.random.default_rng(0)
    spread = rng.standard_normal((400, 1, 16))
    level = rng.standard_normal((400, 1, 1))                 # one factor (say loudness) in every dim
    collapsed = level * rng.uniform(0.5, 2.0, (1, 1, 16)) + 0.05 * rng.standard_normal((400, 1, 16))
    g_spread, g_collapsed = feature_geometry(spread), feature_geometry(collapsed)
    assert g_spread["effective_rank"][0] > 14 and g_spread["pc1_share"][0] < 0.15
    assert g_collapsed["effective_rank"][0] < 1.5 and g_collapsed["pc1_share"][0] > 0.95
    # z-scoring first: rescaling one dimension does not change the geometry
    scaled = spread.copy()
    scaled[..., 0] *= 1000.0
    assert feature_geometry(scaled)["effective_rank"][0] == pytest.approx(g_spread["effective_rank"][0], rel=1e-6)
    assert feature_geometry(np.ones((10, 1, 4)))["effective_rank"] == [0.0]


def test_probe_is_reproducible_for_a_seed():
    x, y, splits = separable(per_class=20)
    a = probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(3,))
    b = probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(3,))
    assert a == b


def test_single_vector_features_skip_the_weighted_sum():
    x, y, splits = separable(num_layers=1, informative=0, per_class=20)
    res = probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(0,))
    assert res["mode"] == "single_layer" and "layer_weights" not in res
    assert res["score"] == res["per_layer"][0] > 0.9


def test_multilabel_probe_and_auc_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    scores = np.round(rng.random((3, 40, 5)), 1)  # rounded: many ties
    labels = (rng.random((40, 5)) < 0.4).astype(np.float32)
    labels[:, 4] = 0  # a class without positives is left out, as sklearn would refuse it
    ours = macro_roc_auc(scores, labels)
    ref = [roc_auc_score(labels[:, :4], s[:, :4], average="macro") for s in scores]
    assert np.allclose(ours, ref)

    n, tags = 200, 3
    y = (rng.random((n, tags)) < 0.5).astype(np.float32)
    x = rng.standard_normal((n, 3, 8)).astype(np.float32)
    x[:, 1, :tags] += 3 * y
    splits = np.array([("train", "train", "train", "valid", "test")[i % 5] for i in range(n)])
    res = probe_feature_set(x, y, splits, num_classes=tags, multilabel=True, seeds=(0,))
    assert res["metric"] == "roc_auc" and res["per_layer"][1] > 0.95
    assert max(res["per_layer"][0], res["per_layer"][2]) < 0.7
    assert 0 < res["ap"] <= 1


def _draw(per_seed_layers, per_seed_valid, ranks):
    """A probe_feature_set-style summary of one draw from its per-seed test scores ``[S, L]``
    (the last column is the weighted sum), per-seed valid scores and per-layer ranks."""
    t, v = np.asarray(per_seed_layers), np.asarray(per_seed_valid)
    return {"metric": "accuracy", "mode": "weighted_sum", "score": t[:, -1].mean(), "std": t[:, -1].std(),
            "runs": list(t[:, -1]), "per_layer": list(t[:, :-1].mean(0)), "per_layer_std": list(t[:, :-1].std(0)),
            "per_layer_valid": list(v.mean(0)), "best_layer": 0, "best_layer_score": 0.0, "best_layer_std": 0.0,
            "best_epochs": [[1]] * len(t), "seeds": list(range(len(t))),
            "geometry": {"effective_rank": list(ranks), "pc1_share": [0.1] * len(ranks)},
            "test_outputs": [[i] * 4 for i in range(len(t))], "layer_weights": [0.5, 0.5]}


def test_pooled_draws_count_every_draw_and_seed_as_one_run():
    rng = np.random.default_rng(0)
    tests = [rng.uniform(0.40, 0.45, (3, 3)) + shift for shift in (0.0, 0.3)]  # two draws far apart, 3 seeds each
    valids = [np.array([[0.1, 0.5]] * 3), np.array([[0.2, 0.3]] * 3)]
    pooled = pool_draws([_draw(t, v, r) for t, v, r in zip(tests, valids, ([10.0, 20.0], [14.0, 16.0]))])
    every = np.concatenate(tests)                                     # [D * S, L + 1]
    assert pooled["score"] == pytest.approx(every[:, -1].mean()) and pooled["std"] == pytest.approx(every[:, -1].std())
    # the draws' spread is in the std: far more than either draw's own seed spread
    assert pooled["std"] > 2 * max(t[:, -1].std() for t in tests)
    assert pooled["per_layer"] == pytest.approx(list(every[:, :-1].mean(0)))
    assert pooled["per_layer_std"] == pytest.approx(list(every[:, :-1].std(0)))
    assert pooled["best_layer"] == 1                                  # on the mean validation score: 0.4 vs 0.15
    assert pooled["geometry"]["effective_rank"] == pytest.approx([12.0, 18.0])
    assert pooled["draws"] == 2 and pooled["draw_scores"] == pytest.approx([t[:, -1].mean() for t in tests])
    assert len(pooled["test_outputs"]) == 6 and len(pooled["runs"]) == 6
    one = _draw(tests[0], valids[0], [1.0, 2.0])
    assert pool_draws([one]) == one                                   # one draw is itself
    with pytest.raises(ProbeError, match="no draws"):
        pool_draws([])
    other = _draw(rng.uniform(size=(3, 4)), [[0.1, 0.2, 0.3]] * 3, [1.0, 2.0, 3.0])
    with pytest.raises(ProbeError, match="layer counts"):
        pool_draws([one, other])


def test_empty_split_is_a_probe_error():
    x, y, splits = separable(per_class=10)
    splits[splits == "valid"] = "train"
    with pytest.raises(ProbeError, match="valid"):
        probe_feature_set(x, y, splits, num_classes=4, multilabel=False, seeds=(0,))


# --------------------------------------------------------------------------- feature files

def test_feature_files_pool_over_time_and_report_missing(tmp_path):
    rng = np.random.default_rng(0)
    seq = rng.standard_normal((3, 7, 4)).astype(np.float32)
    save_clip_features(tmp_path, "audio/a/x.1.wav", seq)            # [L, T, D]
    save_clip_features(tmp_path, "audio/b.wav", seq.mean(1))         # [L, D]
    assert (tmp_path / "audio/a/x.1.npy").is_file()                  # extension replaced, dots kept
    x = load_feature_set(tmp_path, ["audio/a/x.1.wav", "audio/b.wav"])
    assert x.shape == (2, 3, 4) and np.allclose(x[0], seq.mean(1)) and np.allclose(x[1], x[0])
    np.save(tmp_path / "audio/c.flac.npy", seq)                      # mert-extract's clash name
    assert load_feature_set(tmp_path, ["audio/c.flac"]).shape == (1, 3, 4)
    with pytest.raises(ProbeError, match="2 of 3 feature files are missing"):
        load_feature_set(tmp_path, ["audio/b.wav", "audio/n1.wav", "audio/n2.wav"])
    save_clip_features(tmp_path, "audio/d.wav", rng.standard_normal((2, 4)))
    with pytest.raises(ProbeError, match="shape"):
        load_feature_set(tmp_path, ["audio/b.wav", "audio/d.wav"])


def test_train_log_parsing(tmp_path):
    log = tmp_path / "train_log.txt"
    log.write_text(
        "epoch: 1, lr: 1.00e-04 - train loss: 2.31, train ce_acoustic: 1.2 - valid loss: 2.1\n"
        "epoch: 2, lr: 5.00e-05 - train loss: 1.9e+00, train ce_acoustic: 0.9 - valid loss: nan, valid acc: 0.4\n"
        "Epoch loaded: 2 - test loss: 1.75\n"
        "garbage line\n")
    recs = parse_train_log(log)
    assert len(recs) == 2
    assert recs[0] == {"epoch": 1.0, "lr": 1e-4, "train loss": 2.31, "train ce_acoustic": 1.2, "valid loss": 2.1}
    assert recs[1]["train loss"] == 1.9 and math.isnan(recs[1]["valid loss"]) and recs[1]["valid acc"] == 0.4
    (tmp_path / "empty.txt").write_text("nothing here\n")
    with pytest.raises(ProbeError, match="no 'epoch"):
        parse_train_log(tmp_path / "empty.txt")


# --------------------------------------------------------------------------- end to end

TONES = (57, 62, 67, 72)  # MIDI pitches, one class each


@pytest.fixture(scope="module")
def tone_corpus(tmp_path_factory):
    """A small corpus of sine-tone clips (label = pitch), with an informative feature set
    (layer 1 encodes the label, [L, T, D] files) and a noise one ([L, D] files)."""
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    rows = ["path,label,split,piece"]
    centres = rng.standard_normal((len(TONES), 8)) * 2
    (root / "audio").mkdir()
    for i in range(48):
        c = i % len(TONES)
        f0 = 440 * 2 ** ((TONES[c] - 69) / 12) * (1 + rng.uniform(-0.005, 0.005))
        t = np.arange(SR // 2) / SR
        audio = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6)) + 0.01 * rng.standard_normal(len(t))
        rel = f"audio/tone{i:02d}.wav"
        sf.write(root / rel, audio, SR)
        split = ("train", "train", "valid", "test")[(i // len(TONES)) % 4]
        rows.append(f"{rel},{TONES[c]},{split},clip{i}")
        seq = rng.standard_normal((3, 5, 8))
        seq[1] += centres[c]
        save_clip_features(root / "feats/pretrained", rel, seq.astype(np.float32))
        save_clip_features(root / "feats/random_init", rel, rng.standard_normal((3, 8)).astype(np.float32))
    (root / "tone.csv").write_text("\n".join(rows) + "\n")
    (root / "corpus.json").write_text(json.dumps({"format": "mert-corpus/1", "sample_rate": SR, "tasks": {
        "tone": {"csv": "tone.csv", "type": "multiclass", "classes": [str(p) for p in TONES]}}}))
    (root / "train_log.txt").write_text("epoch: 1, lr: 1e-4 - train loss: 3.0 - valid loss: 3.2\n"
                                        "epoch: 2, lr: 1e-4 - train loss: 2.5 - valid loss: 2.9\n")
    return root


def test_run_probe_report_plots_and_baseline(tone_corpus, tmp_path):
    root = tone_corpus
    report = run_probe(tmp_path / "out", corpus_dir=root, baselines=("cqt",), seeds=(0, 1),
                       feature_sets={"pretrained": root / "feats/pretrained", "random_init": root / "feats/random_init"},
                       train_log=root / "train_log.txt", progress=False)
    strict = json.loads((tmp_path / "out/report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict == report
    e = report["probe"]["tone"]
    for name in ("pretrained", "random_init", "cqt"):
        assert 0 <= e[name] <= 1 and e[f"{name}_std"] >= 0
    assert len(e["per_layer"]) == 3 and len(e["per_layer_std"]) == 3
    assert e["per_layer"][1] > 0.9 and e["best_layer"] == 1 and e["pretrained"] > 0.5
    assert e["random_init"] < 0.6             # noise features: near chance (0.25)
    assert e["cqt"] > 0.9                     # a CQT separates sine tones a fifth apart
    assert e["num_clips"] == {"train": 24, "valid": 12, "test": 12} and e["num_classes"] == 4
    assert e["feature_sets"]["cqt"]["mode"] == "single_layer"
    for rel in (e["plot"], report["pretraining"]["plot"]):
        assert (tmp_path / "out" / rel).read_bytes()[:8] == PNG
    md = (tmp_path / "out/report.md").read_text()
    assert "| tone | accuracy |" in md and "plots/layers_tone.png" in md
    g = e["feature_sets"]["pretrained"]["geometry"]
    assert len(g["effective_rank"]) == len(g["pc1_share"]) == 3
    assert "| tone | pretrained |" in md and "| tone | cqt |" not in md  # baselines have no layers to show
    # Paired comparisons of the first set with the others, over the 12 test pieces (one clip each here)
    assert set(e["comparisons"]) == {"random_init", "cqt"}
    c = e["comparisons"]["random_init"]
    assert c["margin"] == pytest.approx(e["pretrained"] - e["random_init"]) and c["test_pieces"] == 12
    assert c["ci_low"] <= c["margin"] <= c["ci_high"] and c["decision"] == "better"
    assert "test_outputs" not in e["feature_sets"]["pretrained"]          # per-clip outputs stay out of the report
    assert f"| tone | pretrained − random_init | {c['margin']:+.3f} |" in md


def test_run_probe_pools_the_draws_of_one_feature_set(tone_corpus, tmp_path):
    """Two folders under one name are probed one by one and pooled: the report's score is the mean
    of what each folder scores alone, and the comparison pairs the first set with every draw's runs."""
    root = tone_corpus
    rng = np.random.default_rng(5)
    second = tmp_path / "random_init_2"
    rows = (root / "tone.csv").read_text().splitlines()[1:]
    for row in rows:
        save_clip_features(second, row.split(",")[0], rng.standard_normal((3, 8)).astype(np.float32))
    draws = [root / "feats/random_init", second]
    kw = dict(corpus_dir=root, baselines=(), seeds=(0, 1), progress=False)
    alone = [run_probe(tmp_path / f"alone{i}", feature_sets={"random_init": d}, **kw)["probe"]["tone"]
             for i, d in enumerate(draws)]
    report = run_probe(tmp_path / "pooled", feature_sets={"pretrained": root / "feats/pretrained",
                                                          "random_init": draws}, **kw)
    e = report["probe"]["tone"]
    pooled = e["feature_sets"]["random_init"]
    assert pooled["draws"] == 2 and pooled["draw_scores"] == pytest.approx([a["random_init"] for a in alone])
    assert e["random_init"] == pytest.approx(np.mean([a["random_init"] for a in alone]))
    runs = [r for a in alone for r in a["feature_sets"]["random_init"]["runs"]]
    assert e["random_init_std"] == pytest.approx(np.std(runs))
    c = e["comparisons"]["random_init"]
    assert c["margin"] == pytest.approx(e["pretrained"] - e["random_init"]) and c["decision"] == "better"
    assert c["seed_spread"] == pytest.approx(e["pretrained_std"] + np.std(runs))
    assert "tone, random_init: 2 draws: " in (tmp_path / "pooled/report.md").read_text()
    with pytest.raises(ProbeError, match="empty list"):
        run_probe(tmp_path / "none", feature_sets={"random_init": []}, **kw)
    # the CLI: one name given twice is two draws
    rc = probe_main(["--corpus", str(root), "--features", f"pretrained={root / 'feats/pretrained'}",
                     "--features", f"random_init={draws[0]}", "--features", f"random_init={draws[1]}",
                     "--seeds", "0", "1", "--out", str(tmp_path / "cli"), "--quiet"])
    got = json.loads((tmp_path / "cli/report.json").read_text())["probe"]["tone"]
    assert rc == 0 and got["feature_sets"]["random_init"]["draws"] == 2
    assert got["random_init"] == pytest.approx(e["random_init"])


def test_run_probe_on_a_user_csv_without_splits(tone_corpus, tmp_path):
    root = tone_corpus
    lines = (root / "tone.csv").read_text().splitlines()
    # drop split and piece: splits then come from hashing each clip's path
    (tmp_path / "mine.csv").write_text("\n".join(",".join(l.split(",")[:2]) for l in lines) + "\n")
    report = run_probe(tmp_path / "out", task_csvs={"mine": tmp_path / "mine.csv"}, audio_root=root,
                       feature_sets={"pretrained": root / "feats/pretrained"}, baselines=(), seeds=(0,),
                       progress=False)
    n = report["probe"]["mine"]["num_clips"]
    assert sum(n.values()) == 48 and min(n.values()) > 0


def test_cli_probe_and_its_errors(tone_corpus, tmp_path, capsys):
    root = tone_corpus
    rc = probe_main(["--corpus", str(root), "--features", f"pretrained={root / 'feats/pretrained'}",
                     "--baseline", "mfcc", "--seeds", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0 and "tone (accuracy): pretrained" in capsys.readouterr().out
    assert json.loads((tmp_path / "o/report.json").read_text())["baselines"] == ["mfcc"]

    rc = probe_main(["--corpus", str(root), "--features", f"pretrained={tmp_path / 'nope'}",
                     "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "folder not found" in err and "\n" not in err

    rc = probe_main(["--corpus", str(root), "--task", "genre", "--baseline", "cqt", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "not in" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:  # argparse usage error
        probe_main(["--corpus", str(root), "--features", "no-equals-sign", "--out", str(tmp_path / "o4")])
    assert exc.value.code == 2


def test_curve_pools_each_clip_as_alone_and_lists_snapshots_in_order(tmp_path):
    from mert_plugin import MERTModel, load_audio
    from mert_plugin.probe.curve import pooled_layers, snapshots

    rng = np.random.default_rng(0)
    names = []
    for i, seconds in enumerate([1.0, 0.6, 1.0, 1.0, 0.6]):  # two lengths: two batches
        names.append(f"c{i}.wav")
        sf.write(str(tmp_path / names[-1]), (0.1 * rng.standard_normal(int(seconds * 24000))).astype(np.float32),
                 24000)
    model = MERTModel.from_preset("mert-tiny", seed=0)
    together = pooled_layers(model, tmp_path, names, batch_size=2)
    alone = np.stack([pooled_layers(model, tmp_path, [n])[0] for n in names])
    assert together.shape == (5, 5, 128)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    with torch.no_grad():  # and it is the time average of each hidden state
        direct = model(load_audio(str(tmp_path / names[1]), 24000)[None]).hidden_states[3][0].mean(0).numpy()
    np.testing.assert_allclose(together[1, 3], direct, atol=1e-5)
    for epoch, updates in ((2, 40), (1, 20), (10, 200)):
        (tmp_path / "snaps" / f"epoch_{epoch:03d}").mkdir(parents=True)
        (tmp_path / "snaps" / f"epoch_{epoch:03d}" / "snapshot.json").write_text(json.dumps({"updates": updates}))
    assert [u for u, _ in snapshots(tmp_path / "snaps")] == [20, 40, 200]
    for epoch in range(3, 10):
        (tmp_path / "snaps" / f"epoch_{epoch:03d}").mkdir()
        (tmp_path / "snaps" / f"epoch_{epoch:03d}" / "snapshot.json").write_text(json.dumps({"updates": 20 * epoch}))
    assert [u for u, _ in snapshots(tmp_path / "snaps", at_most=4)] == [40, 100, 140, 200]  # 10 -> 4, the last kept
    assert [u for u, _ in snapshots(tmp_path / "snaps", at_most=20)] == [20 * e for e in range(1, 11)]
