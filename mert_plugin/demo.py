"""The end-to-end demo behind ``make demo``: corpus -> pretrain -> export -> extract -> probe.

Every step uses the project's real entry points, offline, on 2 CPU cores:

1. ``mert-corpus``: render music21 scores into labelled 24 kHz clips (key, composer,
   instrument, pitch tasks; split by piece);
2. the SpeechBrain recipe (``speechbrain_recipes/MERT/train.py hparams/mert_tiny.yaml`` with
   ``--preset=mert-small``, the yaml's student at twice the width: docs/LEARNING.md 7.6): fit the
   demo acoustic teacher, write offline labels, pretrain on the *training-split* clips only,
   export it;
3. ``mert-export-onnx``: the pretrained model, the same model at its random initialisation
   (same seed as the recipe) and ``--random-inits - 1`` more random initialisations (the next
   seeds), each behind the ONNX parity gate;
4. ``OnnxPredictMERT`` on ``essentia.standard.MonoLoader`` audio: all layers, mean-pooled
   per clip;
5. ``mert-probe``: MARBLE-style probes per layer and weighted sum, pretrained vs random
   init (pooled over its draws: :func:`mert_plugin.probe.mlp.pool_draws`) vs a CQT baseline
   and a level-only baseline (loudness and envelope, no spectrum), 3 seeds, paired comparisons
   over the test pieces; ``report.json``, ``report.md`` and plots;
   plus the instrument task with every GM program as the test instrument in turn
   (``probe/instrument_by_program.json``, printed under the probe table, not a criterion).

Work already done is reused on a rerun with the same settings (every step is resumable); a rerun
with other settings into the same ``--out`` is refused (use ``--fresh``). Run::

    python -m mert_plugin.demo [--out demo_output] [--epochs N] [--fresh]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "speechbrain_recipes" / "MERT"


def _step(title: str):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float):
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)


DEMO_PRESET = "mert-small"  # the student (--recipe-arg=--preset=mert-tiny: the yaml's own, ~2x faster)
# the MFCC regression target (mert_tiny.yaml's mfcc_weight, 0 there): the features keep the timbre that
# the pitch codes teach them to drop (docs/LEARNING.md 7.7); --recipe-arg=--mfcc_weight=0 turns it off
DEMO_MFCC_WEIGHT = 3.0
RANDOM_INITS = 3  # random-init draws the verdict compares with: one draw's instrument score moves by 0.17 with its
                  # seed, more than the probe seeds' spread (docs/LEARNING.md 7.8, 7.9)
CURVE_POINTS = 6  # snapshots in the learning curve: the default run has 6 epochs; longer runs are thinned

# The demo's corpus is shaped for a paired comparison over test *pieces* (mert_plugin.probe.compare):
# 12 pieces per composer, split 7/2/3, cut at 20 s, give 15 test pieces (3 per composer) from as
# much audio as 8 pieces of 30 s per composer split 6/1/1 (one test piece per composer). Haydn has
# only 9 scores in music21's corpus, so Beethoven (26) takes his place.
DEMO_CORPUS = dict(composers=("bach", "palestrina", "monteverdi", "mozart", "beethoven"), max_piece_seconds=20.0,
                   split_fractions=(0.6, 0.15, 0.25))


def build_corpus(out: Path, num_pieces: int, seed: int, quick: bool) -> Path:
    from mert_plugin.corpus import build_corpus as build

    corpus = out / "corpus"
    # Quick: one composer, so its few pieces still fill train, valid and test.
    shape = dict(composers=("bach",), note_variants=4, pitch_range=(60, 66), max_piece_seconds=10.0,
                 tasks=("instrument", "pitch")) if quick else DEMO_CORPUS
    build(corpus, num_pieces=num_pieces, seed=seed, progress=True, **shape)
    return corpus


def training_folder(corpus: Path, out: Path) -> Path:
    """A folder of links to the clips of the *train* split of every task.

    Pretraining never hears a valid/test clip, so the probes measure what was
    learnt from other audio, not a memory of the test set.
    """
    folder = out / "pretrain_audio"
    seen = set()
    for table in sorted(corpus.glob("*.csv")):
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] == "train" and row["path"] not in seen:
                    seen.add(row["path"])
                    link = folder / row["path"]
                    if not link.exists():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        os.symlink((corpus / row["path"]).resolve(), link)
    print(f"    {len(seen)} training-split clips linked under {folder}")
    return folder


def parse_recipe_args(extra) -> tuple:
    """``--KEY=VALUE`` items -> ({KEY: VALUE}, [other --FLAGs]); the last value of a KEY wins, as
    it will in the recipe's command line. ValueError on anything else."""
    overrides, flags = {}, []
    for arg in extra:
        key, sep, value = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            raise ValueError(f"--recipe-arg expects --KEY=VALUE or --FLAG, got {arg!r}")
        if sep:
            overrides[key] = value
        elif arg not in flags:
            flags.append(arg)
    return overrides, flags


def recipe_command(data: Path, out: Path, epochs: int, seed: int, teacher: str, extra=()) -> list:
    """The recipe's command line; ``extra`` ``--KEY=VALUE`` items replace the demo's own value for KEY."""
    args = {"data_folder": data, "output_folder": out / "pretrain", "number_of_epochs": epochs, "seed": seed,
            "max_train_files": 0, "max_valid_files": 0, "device": "cpu",
            "total_updates": 0,  # the learning rate decays to zero at the end of the last epoch
            "snapshot_folder": out / "pretrain" / "snapshots",  # for the learning curve
            "acoustic_teacher": teacher, "preset": DEMO_PRESET, "mfcc_weight": DEMO_MFCC_WEIGHT}
    if teacher == "fitted":  # the EnCodec-shaped teacher: 8 codebooks x 1024 codes
        args.update(teacher_codebooks=8, teacher_clusters=1024)
    overrides, flags = parse_recipe_args(extra)
    args.update(overrides)  # the recipe's yaml parser refuses duplicate keys
    flags = ["--noprogressbar"] + [f for f in flags if f != "--noprogressbar"]
    return [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "mert_tiny.yaml"),
            *(f"--{k}={v}" for k, v in args.items()), *flags]


def pretrain(data: Path, out: Path, epochs: int, seed: int, teacher: str, extra=()) -> Path:
    """Run the SpeechBrain recipe as a user would; returns the exported model folder."""
    cmd = recipe_command(data, out, epochs, seed, teacher, extra)
    print("    $ " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, cwd=RECIPE, env=env)
    return out / "pretrain" / "export"


def model_seed(recipe_seed: int, extra=()) -> int:
    """The seed the recipe initialised its student with: ``--recipe-arg=--seed=N`` wins over the demo's."""
    return int(parse_recipe_args(extra)[0].get("seed", recipe_seed))


def initial_student(model_dir: Path, recipe_seed: int, extra=(), seed: Optional[int] = None):
    """The recipe's student before its first update: the pretrained model's geometry (whatever
    ``preset`` the recipe ran) initialised with the recipe's seed (``--recipe-arg=--seed=N`` wins
    over the demo's), as the yaml's ``MERTModel.from_preset(preset, seed)`` did; ``seed`` draws
    another initialisation of the same student."""
    from mert_plugin import MERTModel

    seed = model_seed(recipe_seed, extra) if seed is None else seed
    return MERTModel.from_config(MERTModel.from_pretrained(str(model_dir)).config, seed=seed)


def random_init_names(recipe_seed: int, extra=(), count: int = RANDOM_INITS) -> dict:
    """``{feature-set name: model seed}`` of the random-init draws: ``random_init`` is the recipe's
    own initialisation (the learning curve's starting point), ``random_init_seed<N>`` the next
    ``count - 1`` seeds."""
    first = model_seed(recipe_seed, extra)
    return {("random_init" if k == 0 else f"random_init_seed{first + k}"): first + k for k in range(count)}


def export(model_dir: Path, recipe_seed: int, out: Path, extra=(), random_inits: int = RANDOM_INITS):
    """ONNX graphs of the pretrained model and of ``random_inits`` random initialisations of it
    (:func:`random_init_names`)."""
    from extractors.export_onnx import export_onnx
    from mert_plugin import MERTModel

    graphs = {}
    makers = [("pretrained", lambda: MERTModel.from_pretrained(str(model_dir)))]
    makers += [(name, lambda seed=seed: initial_student(model_dir, recipe_seed, extra, seed=seed))
               for name, seed in random_init_names(recipe_seed, extra, random_inits).items()]
    for name, make in makers:
        path = out / "onnx" / f"student_{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or not path.with_suffix(".json").exists():
            meta = export_onnx(make(), str(path), window_seconds=5.0, name=f"demo student ({name})",
                               source="demo")
            worst = max(meta["export"]["parity_max_abs_diff"].values())
            print(f"    {path.name}: max |onnxruntime - PyTorch| = {worst:.1e}")
        graphs[name] = path
    return graphs


def extract(corpus: Path, graphs, out: Path):
    """All-layer, mean-pooled features of every clip via Essentia's MonoLoader + OnnxPredictMERT."""
    import numpy as np

    from mert_plugin.progress import progress_bar

    import extractors.essentia  # noqa: F401  (registers essentia.standard.OnnxPredictMERT)
    from essentia.standard import MonoLoader, OnnxPredictMERT
    from mert_plugin.probe import save_clip_features

    paths = sorted({row["path"] for t in corpus.glob("*.csv") for row in csv.DictReader(open(t, newline=""))})
    folders = {}
    for name, graph in graphs.items():
        folder = out / "features" / name
        algo = OnnxPredictMERT(graphFilename=str(graph), output="all", batchSize=8)
        todo = [p for p in paths if not (folder / Path(p).with_suffix(".npy")).exists()]
        for rel in progress_bar(todo, desc=f"extract {name}", unit="clip"):
            audio = MonoLoader(filename=str(corpus / rel), sampleRate=24000, resampleQuality=4)()
            states = algo(audio)                      # [L+1, frames, D]
            save_clip_features(str(folder), rel, np.asarray(states).mean(axis=1))  # [L+1, D]
        folders[name] = folder
    return folders


def probe(corpus: Path, features, train_log: Path, out: Path, tasks, seeds):
    """Probe the pretrained features against the random-init draws, pooled as one feature set
    ``random_init`` (its own initialisation first), and the CQT and level baselines."""
    from mert_plugin.probe import run_probe

    draws = [str(v) for k, v in features.items() if k.startswith("random_init")]
    sets = {"pretrained": str(features["pretrained"]), "random_init": draws}
    return run_probe(out / "probe", corpus_dir=corpus, tasks=tasks, feature_sets=sets,
                     baselines=("cqt", "level"), seeds=seeds, train_log=str(train_log) if train_log.exists() else None)


def instrument_by_program(corpus: Path, features, out: Path) -> Optional[dict]:
    """The instrument task with every GM program as the test instrument in turn
    (:mod:`mert_plugin.probe.heldout`), saved to ``probe/instrument_by_program.json``; None for a
    corpus without programs. Pretrained vs the recipe's own random init (one draw: a reading, not
    a criterion)."""
    from mert_plugin.atomic import atomic_write_json
    from mert_plugin.probe.heldout import instrument_by_program as by_program

    result = by_program(corpus, {k: features[k] for k in ("pretrained", "random_init")})
    if result is not None:
        atomic_write_json(out / "probe" / "instrument_by_program.json", result)
    return result


MUST_WIN = ("pitch", "instrument")  # the musical knowledge MERT's teachers are meant to put into the layers


def _last_valid_stats(train_log: Path) -> dict:
    from mert_plugin.probe.report import parse_train_log

    records = parse_train_log(train_log) if train_log.is_file() else []
    return {k[len("valid "):]: v for k, v in (records[-1] if records else {}).items() if k.startswith("valid ")}


def verdict_checks(report, valid_stats: dict) -> list:
    """The demo's criteria, each ``(name, passed, detail)``; the verdict is YES only when all pass.

    1. pretrained is *better* than its random init on pitch AND on instrument;
    2. it is *worse* on no task;
    3. its features are not collapsed: effective rank >= half the random init's at every layer
       (every task's training clips; the random init's mean over its draws);
    4. masked prediction beats the unigram baseline of the teacher's codes (validation split).

    Better / worse (:mod:`mert_plugin.probe.compare`): the score difference is beyond the summed
    seed spread of the two probes AND a paired bootstrap over the test pieces puts its 95 %
    interval wholly above (below) 0. With several random-init draws (``--random-inits``) the random
    init's score is the mean over every draw and probe seed, and its spread holds the draws'
    spread (:func:`mert_plugin.probe.mlp.pool_draws`). A report without these comparisons (made
    before they existed) fails criteria 1 and 2: nothing measured, nothing met.
    """
    from mert_plugin.probe.compare import BETTER, WORSE, describe

    probe = report["probe"]
    checks = []

    def vs_random(e):
        return e.get("comparisons", {}).get("random_init")

    for task in MUST_WIN:
        c = vs_random(probe[task]) if task in probe else None
        if c is None:
            checks.append((f"better than random init on {task}", False,
                           "task not probed" if task not in probe else "no paired comparison in the report"))
            continue
        checks.append((f"better than random init on {task}", c["decision"] == BETTER, describe(c)))
    unknown = [t for t, e in probe.items() if vs_random(e) is None]
    losses = [f"{t} {describe(vs_random(e))}" for t, e in probe.items()
              if vs_random(e) is not None and vs_random(e)["decision"] == WORSE]
    detail = "; ".join(losses + [f"{t}: no paired comparison" for t in unknown]) or "none"
    checks.append(("worse than random init on no task", not losses and not unknown, detail))
    worst = None
    for task, e in probe.items():
        sets = e.get("feature_sets", {})
        try:
            mine, ref = sets["pretrained"]["geometry"]["effective_rank"], sets["random_init"]["geometry"]["effective_rank"]
        except KeyError:
            continue
        for layer, (a, b) in enumerate(zip(mine, ref)):
            ratio = a / b if b > 0 else 0.0
            if worst is None or ratio < worst[0]:
                worst = (ratio, task, layer, a, b)
    if worst is None:
        checks.append(("features not collapsed", False, "no geometry in the report"))
    else:
        ratio, task, layer, a, b = worst
        checks.append(("features not collapsed (effective rank >= 1/2 of random init, every layer)", ratio >= 0.5,
                       f"worst: {task} layer {layer}: {a:.1f} vs {b:.1f} ({ratio:.3f}x)"))
    acc, uni = valid_stats.get("acoustic_acc"), valid_stats.get("unigram_acc")
    if acc is None or uni is None:
        checks.append(("masked prediction beats the codes' unigram", False, "no validation acoustic_acc/unigram_acc "
                                                                           "in the train log"))
    else:
        detail = f"accuracy {acc:.3f} vs {uni:.3f}"
        if "acoustic_ce" in valid_stats and "unigram_ce" in valid_stats:
            detail += f"; CE {valid_stats['acoustic_ce']:.2f} vs {valid_stats['unigram_ce']:.2f} nats"
        if "copy_acc" in valid_stats:
            detail += f"; copying the nearest visible label: {valid_stats['copy_acc']:.3f}"
        checks.append(("masked prediction beats the codes' unigram (validation)", acc > uni, detail))
    return checks


def verdict(report, valid_stats: dict, heldout: Optional[dict] = None) -> bool:
    """Print the probe table and every criterion; True only when all of them pass. ``heldout``
    (:func:`instrument_by_program`) adds the instrument task with every program held out in turn,
    printed for reading, not a criterion."""
    from mert_plugin.probe.compare import describe
    from mert_plugin.probe.heldout import describe as describe_heldout

    print("\n    Weighted-sum probes, test split, mean ± std over seeds; pretrained - random init with its paired "
          "bootstrap interval over the test pieces:")
    print("    task          metric     pretrained        random init       cqt baseline      level baseline    "
          "pretrained - random init")
    for task, e in report["probe"].items():
        c = e.get("comparisons", {}).get("random_init")
        print(f"    {task:<13} {e['metric']:<10} {e['pretrained']:.3f} ± {e['pretrained_std']:.3f}   "
              f"{e['random_init']:.3f} ± {e['random_init_std']:.3f}   {e.get('cqt', float('nan')):.3f} ± "
              f"{e.get('cqt_std', float('nan')):.3f}   {e.get('level', float('nan')):.3f} ± "
              f"{e.get('level_std', float('nan')):.3f}   {describe(c) + ': ' + c['decision'] if c else 'n/a'}")
    draws = {task: e["feature_sets"]["random_init"] for task, e in report["probe"].items()
             if e.get("feature_sets", {}).get("random_init", {}).get("draws", 1) > 1}
    if draws:
        print(f"    random init = the mean over {next(iter(draws.values()))['draws']} draws (model seeds); each draw: "
              + "; ".join(f"{task} " + ", ".join(f"{v:.3f}" for v in fs["draw_scores"]) for task, fs in draws.items()))
    if heldout:
        acc = heldout["accuracy"]
        print(f"\n    Instrument with every GM program as the test instrument in turn (logistic probes, all layers; "
              f"not a criterion): pretrained {acc['pretrained']:.3f}, random init {acc['random_init']:.3f}, level "
              f"{acc.get('level', float('nan')):.3f}, chance {heldout['chance']:.3f}; pretrained - random init "
              f"{describe_heldout(heldout, 'random_init')}")
    checks = verdict_checks(report, valid_stats)
    print("\n    Criteria:")
    for name, ok, detail in checks:
        print(f"    [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    return all(ok for _, ok, _ in checks)


def learning_curve(corpus: Path, out: Path, recipe_seed: int, extra=()):
    """Cheap logistic probes of the random init (0 updates) and of at most ``CURVE_POINTS`` of the
    recipe's per-epoch snapshots, evenly spread (each costs a feature extraction of the corpus)."""
    from mert_plugin import MERTModel
    from mert_plugin.atomic import atomic_write_json
    from mert_plugin.probe.curve import learning_curve as curve_of, plot_learning_curve, snapshots

    models = [(0, initial_student(out / "pretrain" / "export", recipe_seed, extra))]
    models += [(u, MERTModel.from_pretrained(path))
               for u, path in snapshots(out / "pretrain" / "snapshots", at_most=CURVE_POINTS)]
    tasks = [t for t in MUST_WIN if (corpus / f"{t}.csv").is_file()]
    curve = curve_of(models, corpus, tasks)
    atomic_write_json(out / "probe" / "learning_curve.json", curve)
    plot_learning_curve(curve, out / "probe" / "plots" / "learning_curve.png")
    for task in tasks:
        print(f"    {task:<11} " + "  ".join(f"{u}: {a:.3f}" for u, a in zip(curve["updates"], curve["tasks"][task])))
    return curve


def claim_output_folder(out: Path, settings: dict):
    """Record the settings a demo folder is built with; a rerun resumes only with the same ones.

    Every step reuses what the folder holds (the recipe even resumes from its last checkpoint),
    so a rerun with other settings would silently report the old model. Returns an error
    message for that case, else None.
    """
    path = out / "demo_settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            changed = sorted(k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k])
            return (f"{out} holds a demo run made with other settings ({', '.join(changed) or 'unreadable'} "
                    f"differ): pass --fresh to start it over, or choose another --out")
        return None
    if out.is_dir() and any(out.iterdir()):
        return (f"{out} is not empty and has no demo_settings.json (a run of an older version, or not a demo "
                f"folder): pass --fresh to start it over, or choose another --out")
    from mert_plugin.atomic import atomic_write_json

    atomic_write_json(path, settings)  # creates ``out``
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="End-to-end MERT demo on an embedded corpus (offline, CPU).")
    ap.add_argument("--out", default=str(REPO / "demo_output"), help="output folder (default: demo_output/)")
    ap.add_argument("--pieces", type=int, default=60, help="music21 pieces to render (default 60)")
    ap.add_argument("--epochs", type=int, default=6, help="pretraining epochs (default 6, about 780 updates)")
    ap.add_argument("--tasks", nargs="+", default=None, help="probe only these tasks (default: all)")
    ap.add_argument("--acoustic-teacher", default="cqt-kmeans", choices=["cqt-kmeans", "fitted", "none"],
                    help="acoustic teacher of the tiny recipe: 'cqt-kmeans' (default: k-means over a level-free "
                         "semitone CQT, fitted on the training clips), 'fitted' (k-means codebooks over a random "
                         "EnCodec encoder) or 'none' (CQT target only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe-arg", action="append", default=[], metavar="--KEY=VALUE",
                    help="extra argument for the recipe's train.py (repeatable), e.g. --recipe-arg=--lr=0.0001")
    ap.add_argument("--random-inits", type=int, default=None, metavar="N",
                    help=f"random initialisations (model seeds) the pretrained model is compared with, pooled "
                         f"(default {RANDOM_INITS}; 2 with --quick; 1 = the recipe's own initialisation only)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    ap.add_argument("--quick", action="store_true",
                    help="a shortened smoke run (few pieces and notes, 1 epoch, 2 seeds): checks the pipeline, "
                         "too small to compare models")
    args = ap.parse_args(argv)
    try:
        overrides, flags = parse_recipe_args(args.recipe_arg)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if args.random_inits is not None and args.random_inits < 1:
        ap.error(f"--random-inits must be at least 1, got {args.random_inits}")
    random_inits = args.random_inits or (2 if args.quick else RANDOM_INITS)
    if args.quick:
        args.pieces, args.epochs = min(args.pieces, 6), 1
    preset = overrides.get("preset", DEMO_PRESET)
    problem = claim_output_folder(out, {"pieces": args.pieces, "epochs": args.epochs, "seed": args.seed,
                                        "acoustic_teacher": args.acoustic_teacher, "quick": args.quick,
                                        "student": preset,
                                        "mfcc_weight": overrides.get("mfcc_weight", DEMO_MFCC_WEIGHT),
                                        "corpus": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in DEMO_CORPUS.items()},
                                        "recipe_args": {"overrides": overrides, "flags": sorted(flags)}})
    if problem:
        ap.error(problem)
    seeds = (0, 1) if args.quick else (0, 1, 2)
    recipe_seed = 1234 + args.seed
    start = time.perf_counter()

    t = _step("1/6 corpus: rendering music21 scores (mert-corpus)")
    corpus = build_corpus(out, args.pieces, args.seed, args.quick)
    _done(t)
    t = _step(f"2/6 pretraining {preset} with the SpeechBrain recipe (teacher fit, offline labels, Brain.fit)")
    model_dir = pretrain(training_folder(corpus, out), out, args.epochs, recipe_seed, args.acoustic_teacher,
                        args.recipe_arg)
    _done(t)
    t = _step(f"3/6 ONNX export with parity gate (mert-export-onnx), pretrained and {random_inits} random init(s)")
    graphs = export(model_dir, recipe_seed, out, args.recipe_arg, random_inits)
    _done(t)
    t = _step("4/6 features: essentia MonoLoader -> OnnxPredictMERT, mean over time, all layers")
    features = extract(corpus, graphs, out)
    _done(t)
    t = _step(f"5/6 probing (mert-probe): per layer + weighted sum, {len(seeds)} seeds, CQT and level baselines")
    train_log = out / "pretrain" / "train_log.txt"
    report = probe(corpus, features, train_log, out, args.tasks, seeds)
    heldout = instrument_by_program(corpus, features, out) if "instrument" in report["probe"] else None
    _done(t)
    t = _step("6/6 learning curve: logistic probes of the per-epoch snapshots")
    learning_curve(corpus, out, recipe_seed, args.recipe_arg)
    _done(t)

    valid_stats = _last_valid_stats(train_log)
    won = verdict(report, valid_stats, heldout)
    checks = [{"name": n, "passed": ok, "detail": d} for n, ok, d in verdict_checks(report, valid_stats)]
    summary = {"verdict": won, "checks": checks, "seconds": round(time.perf_counter() - start), "out": str(out),
               "quick": args.quick}
    from mert_plugin.atomic import atomic_write_json

    atomic_write_json(out / "demo_summary.json", summary)
    print(f"\nreport: {out / 'probe' / 'report.md'} (plots in {out / 'probe' / 'plots'}, learning curve in "
          f"learning_curve.png)")
    failed = [c["name"] for c in checks if not c["passed"]]
    print(f"total: {summary['seconds']} s. Pretraining taught the model music (all {len(checks)} criteria above): "
          f"{'YES' if won else 'NO'}" + (f" (failed: {'; '.join(failed)})" if failed else ""))
    if args.quick:
        return 0  # a smoke run is too small for the comparison to mean anything
    return 0 if won else 3


if __name__ == "__main__":
    sys.exit(main())
