"""``mert-probe``: MLP-probe frozen features on the tasks of a corpus.

    mert-probe --corpus CORPUS --features pretrained=DIR --features random_init=DIR \\
               --baseline cqt [--task key --task pitch] [--seeds 0 1 2] [--train-log train_log.txt] \\
               --out OUT
    mert-probe --csv mytask=labels.csv --audio-root AUDIO --features mert=DIR --out OUT
    mert-probe --corpus CORPUS --features pretrained=DIR --features random_init=SEED1_DIR \\
               --features random_init=SEED2_DIR --out OUT      # a name twice: draws, pooled

Writes OUT/report.json, OUT/report.md and OUT/plots/*.png. User errors print one
``error: ...`` line and exit with status 2 (1 for file-system errors).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from ..errors import run_cli


def _name_value(text: str, what: str) -> tuple:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=PATH, got {text!r}")
    return name, value


def _pairs(items, what: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for name, value in items or []:
        if name in out:
            raise argparse.ArgumentTypeError(f"{what} name {name!r} given twice")
        out[name] = value
    return out


def _feature_sets(items) -> Dict[str, object]:
    """``--features NAME=DIR`` pairs; a name given several times collects its folders as draws of
    one model (e.g. random inits with different seeds), probed and pooled (``run_probe``)."""
    out: Dict[str, list] = {}
    for name, value in items or []:
        out.setdefault(name, []).append(value)
    return {name: dirs[0] if len(dirs) == 1 else dirs for name, dirs in out.items()}


def _parser() -> argparse.ArgumentParser:
    from .features import BASELINES
    from .mlp import ProbeConfig

    d = ProbeConfig()
    p = argparse.ArgumentParser(prog="mert-probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder for report.json, report.md, plots/")
    p.add_argument("--corpus", help="corpus folder with corpus.json (from mert-corpus)")
    p.add_argument("--task", action="append", help="only these corpus tasks (repeatable; default all)")
    p.add_argument("--csv", action="append", type=lambda s: _name_value(s, "--csv"), metavar="NAME=CSV",
                   help="extra task from a CSV (path,label[,split][,piece]); repeatable")
    p.add_argument("--audio-root", help="folder CSV paths are relative to (default: corpus, else CSV folder)")
    p.add_argument("--features", action="append", type=lambda s: _name_value(s, "--features"),
                   metavar="NAME=DIR", help="feature set: DIR/<clip path without extension>.npy; repeatable. "
                   "The same NAME several times: independent draws of one model (e.g. random inits with "
                   "different seeds), probed one by one and pooled (score = mean over draws, std includes "
                   "their spread)")
    p.add_argument("--baseline", action="append", choices=BASELINES, default=None,
                   help="hand-crafted baseline computed from the audio (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--layer-lr-scale", type=float, default=d.layer_lr_scale,
                   help="learning-rate multiplier of the layer weights (1 = MARBLE)")
    p.add_argument("--no-standardize", action="store_true", help="do not z-score features with train stats")
    p.add_argument("--train-log", help="SpeechBrain train_log.txt to plot pre-training losses from")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        feature_sets = _feature_sets(args.features)
        task_csvs = _pairs(args.csv, "--csv")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    return run_cli(lambda: _run(args, feature_sets, task_csvs))


def _run(args, feature_sets, task_csvs) -> int:
    import torch

    from .mlp import ProbeConfig
    from .run import run_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProbeConfig(max_epochs=args.max_epochs, patience=args.patience, lr=args.lr,
                         batch_size=args.batch_size, layer_lr_scale=args.layer_lr_scale,
                         standardize=not args.no_standardize)
    report = run_probe(args.out, feature_sets=feature_sets, corpus_dir=args.corpus, tasks=args.task,
                       task_csvs=task_csvs, audio_root=args.audio_root, baselines=args.baseline or [],
                       seeds=args.seeds, config=config, train_log=args.train_log, progress=not args.quiet)
    for task, e in report["probe"].items():
        scores = ", ".join(f"{n} {e[n]:.3f}±{e[n + '_std']:.3f}" if e[n] is not None else f"{n} n/a"
                           for n in report["feature_sets"] + report["baselines"])
        print(f"{task} ({e['metric']}): {scores}")
    print(f"wrote {args.out}/report.json, report.md and plots/ in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
