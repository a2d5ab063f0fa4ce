"""The end-to-end demo behind ``make demo``: corpus -> pretrain -> export -> extract -> probe.

Every step uses the project's real entry points, offline, on 2 CPU cores:

1. ``mert-corpus``: render music21 scores into labelled 24 kHz clips (key, composer,
   instrument, pitch tasks; split by piece);
2. the SpeechBrain recipe (``speechbrain_recipes/MERT/train.py hparams/mert_tiny.yaml``):
   fit the demo acoustic teacher, write offline labels, pretrain ``mert-tiny`` on the
   *training-split* clips only, export it;
3. ``mert-export-onnx``: the pretrained model and the same model at its random
   initialisation (same seed as the recipe), each behind the ONNX parity gate;
4. ``OnnxPredictMERT`` on ``essentia.standard.MonoLoader`` audio: all layers, mean-pooled
   per clip;
5. ``mert-probe``: MARBLE-style probes per layer and weighted sum, pretrained vs random
   init vs a CQT baseline, 3 seeds; ``report.json``, ``report.md`` and plots.

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

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "speechbrain_recipes" / "MERT"


def _step(title: str):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float):
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)


def build_corpus(out: Path, num_pieces: int, seed: int, quick: bool) -> Path:
    from mert_plugin.corpus import build_corpus as build

    corpus = out / "corpus"
    # Quick: one composer, so its few pieces still fill train, valid and test.
    small = dict(composers=("bach",), note_variants=4, pitch_range=(60, 66), max_piece_seconds=10.0,
                 tasks=("instrument", "pitch")) if quick else {}
    build(corpus, num_pieces=num_pieces, seed=seed, progress=True, **small)
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
            "acoustic_teacher": teacher}
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


def export(model_dir: Path, preset_seed: int, out: Path):
    """ONNX graphs of the pretrained model and of its own random initialisation."""
    from extractors.export_onnx import export_onnx
    from mert_plugin import MERTModel

    graphs = {}
    for name, make in (("pretrained", lambda: MERTModel.from_pretrained(str(model_dir))),
                       ("random_init", lambda: MERTModel.from_preset("mert-tiny", seed=preset_seed))):
        path = out / "onnx" / f"mert_tiny_{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or not path.with_suffix(".json").exists():
            meta = export_onnx(make(), str(path), window_seconds=5.0, name=f"mert-tiny ({name}, demo)",
                               source="demo")
            worst = max(meta["export"]["parity_max_abs_diff"].values())
            print(f"    {path.name}: max |onnxruntime - PyTorch| = {worst:.1e}")
        graphs[name] = path
    return graphs


def extract(corpus: Path, graphs, out: Path):
    """All-layer, mean-pooled features of every clip via Essentia's MonoLoader + OnnxPredictMERT."""
    import numpy as np
    from tqdm import tqdm

    import extractors.essentia  # noqa: F401  (registers essentia.standard.OnnxPredictMERT)
    from essentia.standard import MonoLoader, OnnxPredictMERT
    from mert_plugin.probe import save_clip_features

    paths = sorted({row["path"] for t in corpus.glob("*.csv") for row in csv.DictReader(open(t, newline=""))})
    folders = {}
    for name, graph in graphs.items():
        folder = out / "features" / name
        algo = OnnxPredictMERT(graphFilename=str(graph), output="all", batchSize=8)
        todo = [p for p in paths if not (folder / Path(p).with_suffix(".npy")).exists()]
        for rel in tqdm(todo, desc=f"extract {name}", unit="clip", mininterval=2):
            audio = MonoLoader(filename=str(corpus / rel), sampleRate=24000, resampleQuality=4)()
            states = algo(audio)                      # [L+1, frames, D]
            save_clip_features(str(folder), rel, np.asarray(states).mean(axis=1))  # [L+1, D]
        folders[name] = folder
    return folders


def probe(corpus: Path, features, train_log: Path, out: Path, tasks, seeds):
    from mert_plugin.probe import run_probe

    return run_probe(out / "probe", corpus_dir=corpus, tasks=tasks, feature_sets={k: str(v) for k, v in features.items()},
                     baselines=("cqt",), seeds=seeds, train_log=str(train_log) if train_log.exists() else None)


def verdict(report) -> bool:
    """Does pretraining beat its own random initialisation by more than the run-to-run spread?"""
    won = False
    print("\n    Weighted-sum probes, test split, mean ± std over seeds:")
    print("    task          metric     pretrained        random init       cqt baseline      margin > spread?")
    for task, e in report["probe"].items():
        margin = e["pretrained"] - e["random_init"]
        spread = e["pretrained_std"] + e["random_init_std"]
        ok = margin > spread
        won |= ok
        print(f"    {task:<13} {e['metric']:<10} {e['pretrained']:.3f} ± {e['pretrained_std']:.3f}   "
              f"{e['random_init']:.3f} ± {e['random_init_std']:.3f}   {e.get('cqt', float('nan')):.3f} ± "
              f"{e.get('cqt_std', float('nan')):.3f}   {'yes' if ok else 'no'} ({margin:+.3f} vs {spread:.3f})")
    return won


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
    from mert_plugin.corpus.tables import atomic_write_json

    atomic_write_json(path, settings)  # creates ``out``
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="End-to-end MERT demo on an embedded corpus (offline, CPU).")
    ap.add_argument("--out", default=str(REPO / "demo_output"), help="output folder (default: demo_output/)")
    ap.add_argument("--pieces", type=int, default=40, help="music21 pieces to render (default 40)")
    ap.add_argument("--epochs", type=int, default=5, help="pretraining epochs (default 5)")
    ap.add_argument("--tasks", nargs="+", default=None, help="probe only these tasks (default: all)")
    ap.add_argument("--acoustic-teacher", default="fitted", choices=["fitted", "none"],
                    help="acoustic teacher of the tiny recipe: 'fitted' (demo k-means codebooks over a random "
                         "EnCodec encoder) or 'none' (CQT target only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe-arg", action="append", default=[], metavar="--KEY=VALUE",
                    help="extra argument for the recipe's train.py (repeatable), e.g. --recipe-arg=--lr=0.0001")
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
    if args.quick:
        args.pieces, args.epochs = min(args.pieces, 6), 1
    problem = claim_output_folder(out, {"pieces": args.pieces, "epochs": args.epochs, "seed": args.seed,
                                        "acoustic_teacher": args.acoustic_teacher, "quick": args.quick,
                                        "recipe_args": {"overrides": overrides, "flags": sorted(flags)}})
    if problem:
        ap.error(problem)
    seeds = (0, 1) if args.quick else (0, 1, 2)
    recipe_seed = 1234 + args.seed
    start = time.perf_counter()

    t = _step("1/5 corpus: rendering music21 scores (mert-corpus)")
    corpus = build_corpus(out, args.pieces, args.seed, args.quick)
    _done(t)
    t = _step("2/5 pretraining mert-tiny with the SpeechBrain recipe (teacher fit, offline labels, Brain.fit)")
    model_dir = pretrain(training_folder(corpus, out), out, args.epochs, recipe_seed, args.acoustic_teacher,
                        args.recipe_arg)
    _done(t)
    t = _step("3/5 ONNX export with parity gate (mert-export-onnx), pretrained and random init")
    graphs = export(model_dir, recipe_seed, out)
    _done(t)
    t = _step("4/5 features: essentia MonoLoader -> OnnxPredictMERT, mean over time, all layers")
    features = extract(corpus, graphs, out)
    _done(t)
    t = _step(f"5/5 probing (mert-probe): per layer + weighted sum, {len(seeds)} seeds, CQT baseline")
    report = probe(corpus, features, out / "pretrain" / "train_log.txt", out, args.tasks, seeds)
    _done(t)

    won = verdict(report)
    summary = {"beats_random_init": won, "seconds": round(time.perf_counter() - start), "out": str(out),
               "quick": args.quick}
    with open(out / "demo_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nreport: {out / 'probe' / 'report.md'} (plots in {out / 'probe' / 'plots'})")
    print(f"total: {summary['seconds']} s. Pretrained beats its random init beyond the spread on at least one "
          f"task: {'YES' if won else 'NO'}")
    if args.quick:
        return 0  # a smoke run is too small for the comparison to mean anything
    return 0 if won else 3


if __name__ == "__main__":
    sys.exit(main())
