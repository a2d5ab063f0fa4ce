"""A shortened run of the end-to-end demo (``make demo``): every stage runs for real."""
import json
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mert_plugin.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "probe" / "report.json").read_text())
    assert set(report["probe"]) == {"instrument", "pitch"}
    for task, entry in report["probe"].items():
        for name in ("pretrained", "random_init", "cqt"):
            assert 0.0 <= entry[name] <= 1.0 and f"{name}_std" in entry
        assert len(entry["per_layer"]) == 5  # mert-small: 4 layers + the encoder input
    # The pretrained model is the recipe's export, not its random init: it made updates, and the two
    # feature sets differ (compared themselves: on the tiny test split two probe scores can tie by chance).
    with open(out / "pretrain" / "train_log.txt", encoding="utf-8") as f:
        assert int(f.read().split("updates: ")[1].split(",")[0].split()[0]) >= 1
    pretrained, random_init = out / "features" / "pretrained", out / "features" / "random_init"
    clips = sorted(p.relative_to(pretrained) for p in pretrained.rglob("*.npy"))
    assert clips and clips == sorted(p.relative_to(random_init) for p in random_init.rglob("*.npy"))
    a = np.stack([np.load(pretrained / c) for c in clips])
    b = np.stack([np.load(random_init / c) for c in clips])
    assert a.shape == b.shape and a.shape[1] == 5 and np.isfinite(a).all() and np.isfinite(b).all()
    assert not np.array_equal(a, b)  # identical weights would give identical features (same graph, same input)
    # the second random-init draw (--quick: 2) is another initialisation, pooled into "random_init"
    second = out / "features" / "random_init_seed1235"
    assert not np.array_equal(b, np.stack([np.load(second / c) for c in clips]))
    for task, entry in report["probe"].items():
        pooled = entry["feature_sets"]["random_init"]
        assert pooled["draws"] == 2 and len(pooled["runs"]) == 4 and len(pooled["draw_scores"]) == 2
        assert entry["random_init"] == pytest.approx(np.mean(pooled["draw_scores"]))
    for name in ("pretrained", "random_init", "random_init_seed1235"):
        meta = json.loads((out / "onnx" / f"student_{name}.json").read_text())
        assert max(meta["export"]["parity_max_abs_diff"].values()) <= 1e-4
    assert (out / "pretrain" / "export" / "model.safetensors").exists()
    exported = json.loads((out / "pretrain" / "export" / "config.json").read_text())
    assert exported["hidden_size"] == 256 and exported["conv_dim"] == [128] * 7  # mert-small, the demo's student
    assert (out / "probe" / "plots" / "pretrain_loss.png").exists()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["quick"] is True and len(summary["checks"]) == 5
    assert summary["verdict"] == all(c["passed"] for c in summary["checks"])
    curve = json.loads((out / "probe" / "learning_curve.json").read_text())
    assert curve["updates"][0] == 0 and len(curve["updates"]) == 2  # random init + the one epoch's snapshot
    assert set(curve["tasks"]) == {"pitch", "instrument"}
    assert all(0.0 <= a <= 1.0 for accs in curve["tasks"].values() for a in accs)
    assert (out / "probe" / "plots" / "learning_curve.png").exists()
    # Pretraining saw only training-split clips.
    with open(out / "corpus" / "pitch.csv") as f:
        test_clips = [l.split(",")[0] for l in f if ",test," in l]
    assert test_clips and not any((out / "pretrain_audio" / p).exists() for p in test_clips)


def test_recipe_args_replace_the_demos_own_values(tmp_path):
    from mert_plugin.demo import parse_recipe_args, recipe_command

    cmd = recipe_command(tmp_path, tmp_path, 5, 1234, "fitted",
                         ["--lr=0.0001", "--number_of_epochs=9", "--debug", "--noprogressbar"])
    keys = [a.split("=", 1)[0] for a in cmd[3:]]
    assert len(keys) == len(set(keys)), cmd          # hyperpyyaml refuses duplicate keys
    assert "--number_of_epochs=9" in cmd and "--number_of_epochs=5" not in cmd
    assert "--lr=0.0001" in cmd and "--debug" in cmd
    assert cmd.count("--noprogressbar") == 1
    assert parse_recipe_args(["--lr=1", "--lr=2"]) == ({"lr": "2"}, [])   # the last value wins, as recorded
    assert "--preset=mert-small" in cmd                                      # the demo's student
    tiny = recipe_command(tmp_path, tmp_path, 5, 1234, "cqt-kmeans", ["--preset=mert-tiny"])
    assert [a for a in tiny if a.startswith("--preset=")] == ["--preset=mert-tiny"]
    assert "--mfcc_weight=3.0" in cmd                                        # the demo's timbre target
    off = recipe_command(tmp_path, tmp_path, 5, 1234, "cqt-kmeans", ["--mfcc_weight=0"])
    assert [a for a in off if a.startswith("--mfcc_weight=")] == ["--mfcc_weight=0"]


def test_bad_recipe_arg_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mert_plugin.demo", "--out", str(tmp_path / "d"),
                           "--recipe-arg=lr=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--KEY=VALUE" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "corpus").exists()
    proc = subprocess.run([sys.executable, "-m", "mert_plugin.demo", "--out", str(tmp_path / "d"),
                           "--random-inits", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--random-inits must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d" / "corpus").exists()


def test_random_init_draws_start_with_the_recipes_own_seed():
    from mert_plugin.demo import random_init_names

    assert random_init_names(1234, count=3) == {"random_init": 1234, "random_init_seed1235": 1235,
                                                "random_init_seed1236": 1236}
    assert random_init_names(1234, ["--seed=7"], count=2) == {"random_init": 7, "random_init_seed8": 8}
    assert random_init_names(1234, count=1) == {"random_init": 1234}


def test_rerun_with_other_settings_is_refused(tmp_path):
    """A demo folder resumes only with the settings it was made with (else the recipe would
    resume from its finished checkpoint and the report would describe the old model)."""
    from mert_plugin.demo import claim_output_folder

    out = tmp_path / "d"
    settings = {"pieces": 40, "epochs": 5, "seed": 0, "recipe_args": []}
    assert claim_output_folder(out, settings) is None
    assert claim_output_folder(out, dict(settings)) is None           # same settings: resume
    problem = claim_output_folder(out, {**settings, "recipe_args": ["--lr=0.0005"]})
    assert "recipe_args" in problem and "--fresh" in problem
    proc = subprocess.run([sys.executable, "-m", "mert_plugin.demo", "--out", str(out), "--epochs", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "corpus").exists()
    older = tmp_path / "older"
    (older / "pretrain").mkdir(parents=True)                  # a run from before settings were recorded
    assert "--fresh" in claim_output_folder(older, settings)
    assert claim_output_folder(tmp_path / "new" / "deeper", settings) is None  # a new folder is created


def _report(pitch=(0.8, 0.5), instrument=(0.7, 0.5), key=(0.1, 0.1), ranks=((8.0, 8.0), (10.0, 10.0)), std=0.02,
            wide=(), pieces=10):
    """A probe report: (pretrained, random init) scores per task; ranks: (pretrained, random init) per layer.
    Paired bootstrap intervals are the margin +- 0.05, or +- 0.5 for the tasks in ``wide`` (few test pieces)."""
    from mert_plugin.probe.compare import compare

    probe = {}
    for task, (mine, ref) in {"pitch": pitch, "instrument": instrument, "key": key}.items():
        geometry = {name: {"geometry": {"effective_rank": [r[i] for r in ranks]}}
                    for i, name in enumerate(("pretrained", "random_init"))}
        half = 0.5 if task in wide else 0.05
        boot = {"ci_low": mine - ref - half, "ci_high": mine - ref + half, "test_pieces": pieces,
                "confidence": 0.95, "draws": 2000}
        probe[task] = {"metric": "accuracy", "pretrained": mine, "random_init": ref, "pretrained_std": std,
                       "random_init_std": std, "feature_sets": geometry,
                       "comparisons": {"random_init": compare(mine, std, ref, std, boot)}}
    return {"probe": probe}


GOOD_VALID = {"acoustic_acc": 0.3, "unigram_acc": 0.1, "acoustic_ce": 3.0, "unigram_ce": 4.5, "copy_acc": 0.8}


def test_verdict_needs_every_criterion():
    from mert_plugin.demo import verdict_checks

    def ok(report, valid=GOOD_VALID):
        return all(passed for _, passed, _ in verdict_checks(report, valid))

    assert ok(_report())
    assert not ok(_report(pitch=(0.52, 0.5)))                # a win inside the seed spread (0.04) is no win
    assert not ok(_report(wide=("pitch",)))                  # ... nor one whose piece interval includes 0
    assert not ok(_report(instrument=(0.4, 0.5)))            # pitch alone is not enough
    assert not ok(_report(key=(0.05, 0.2)))                  # a loss beyond the spread and the interval
    assert ok(_report(key=(0.09, 0.1)))                      # ... a loss within the spread is noise
    assert ok(_report(key=(0.05, 0.2), wide=("key",)))       # ... so is one that the test pieces cannot show
    assert not ok(_report(ranks=((3.0, 8.0), (10.0, 10.0))))  # layer 0 collapsed: 3.0 < 8.0 / 2
    assert ok(_report(ranks=((4.0, 8.0), (10.0, 10.0))))  # half the random init is enough
    assert not ok(_report(), {**GOOD_VALID, "acoustic_acc": 0.05})  # below the codes' unigram
    assert not ok(_report(), {})                             # unchecked is not passed
    old = _report()
    del old["probe"]["key"]["comparisons"]                   # a report from before paired comparisons
    checks = verdict_checks(old, GOOD_VALID)
    assert not all(p for _, p, _ in checks) and any("key: no paired comparison" in d for _, _, d in checks)
    names = [name for name, _, _ in verdict_checks(_report(), GOOD_VALID)]
    assert len(names) == 5 and any("pitch" in n for n in names) and any("unigram" in n for n in names)
    details = dict((n, d) for n, _, d in verdict_checks(_report(), GOOD_VALID))
    assert "CI +0.250..+0.350 over 10 test pieces" in details["better than random init on pitch"]


def test_verdict_prints_the_instrument_by_program_line_without_making_it_a_criterion(capsys):
    from mert_plugin.demo import verdict

    heldout = {"groups": 24, "chance": 0.167, "accuracy": {"pretrained": 0.183, "random_init": 0.275, "level": 0.333},
               "differences": {"random_init": {"difference": -0.092, "ci_low": -0.153, "ci_high": -0.031,
                                               "confidence": 0.95}}}
    assert verdict(_report(), GOOD_VALID, heldout) is True  # a diagnostic, not a sixth criterion
    out = capsys.readouterr().out
    assert "every GM program as the test instrument in turn" in out
    assert "pretrained 0.183, random init 0.275, level 0.333" in out and "-0.092 (95% CI -0.153..-0.031 over 24" in out
    assert verdict(_report(), GOOD_VALID) is True and "test instrument in turn" not in capsys.readouterr().out


def test_verdict_shows_each_random_init_draw(capsys):
    from mert_plugin.demo import verdict

    report = _report()
    report["probe"]["pitch"]["feature_sets"]["random_init"].update(draws=3, draw_scores=[0.45, 0.5, 0.55])
    verdict(report, GOOD_VALID)
    assert "random init = the mean over 3 draws (model seeds); each draw: pitch 0.450, 0.500, 0.550" in \
        capsys.readouterr().out
    verdict(_report(), GOOD_VALID)                           # one draw: nothing to show
    assert "draws" not in capsys.readouterr().out


def test_random_init_is_the_recipes_own_student_before_training(tmp_path, monkeypatch):
    """The demo's baseline is the student the recipe's yaml builds (its preset and seed, including a
    --recipe-arg=--preset/--seed), not a fixed mert-tiny: a wider student compared with a tiny random
    init would be judged against the wrong model."""
    import os
    from dataclasses import replace

    import torch
    from hyperpyyaml import load_hyperpyyaml

    from mert_plugin import MERTModel
    from mert_plugin.config import MERTConfig
    from mert_plugin.demo import RECIPE, initial_student

    monkeypatch.syspath_prepend(str(RECIPE))  # the yaml's !new:data.CropCollate, as `python train.py` has it
    trained = MERTModel.from_preset("mert-tiny", seed=1)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)  # as after training
    trained.save_pretrained(str(tmp_path / "tiny"))
    for seed, extra in ((1234, []), (7, ["--seed=7", "--lr=0.001"])):
        with open(os.path.join(RECIPE, "hparams", "mert_tiny.yaml"), encoding="utf-8") as f:
            hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "o"),
                                      "seed": seed})
        want = hp["student"].state_dict()
        got = initial_student(tmp_path / "tiny", 1234, extra).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), seed
    narrow = replace(MERTConfig.from_preset("mert-tiny"), hidden_size=64, intermediate_size=96)
    MERTModel.from_config(narrow, seed=3).save_pretrained(str(tmp_path / "narrow"))
    model = initial_student(tmp_path / "narrow", 5)
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 96
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 MERTModel.from_config(narrow, seed=5).state_dict().values()))
