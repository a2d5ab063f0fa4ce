"""``mert-corpus``: build the default corpus or import a folder of user audio.

    mert-corpus build --out DIR [--num-pieces 20] [--clip-seconds 5] [--seed 0]
                      [--renderer auto|synth|soundfont|fluidsynth] [--tasks key composer instrument pitch] ...
    mert-corpus import --audio DIR --labels labels.csv --out DIR [--task NAME] [--clip-seconds 5]
    mert-corpus renderers          # which renderers this machine offers

User errors print one ``error: ...`` line and exit with status 2 (1 for file-system errors).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from ..errors import run_cli


def _parser() -> argparse.ArgumentParser:
    from .build import ALL_TASKS, RENDERERS, WAV_SUBTYPES
    from .render import GM_INSTRUMENTS, TIMBRES
    from .scores import DEFAULT_COMPOSERS

    p = argparse.ArgumentParser(prog="mert-corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="render music21 scores into a labelled clip corpus")
    b.add_argument("--out", required=True, help="output folder (re-running it skips finished work)")
    b.add_argument("--num-pieces", type=int, default=20, help="scores to render (default 20, ~30 s on 2 cores)")
    b.add_argument("--composers", nargs="+", default=list(DEFAULT_COMPOSERS),
                   help=f"music21 corpus composers/collections (default: {' '.join(DEFAULT_COMPOSERS)})")
    b.add_argument("--versions-per-piece", type=int, default=2, help="renders per piece (transposition+timbre)")
    b.add_argument("--max-piece-seconds", type=float, default=30.0, help="render at most this much of a piece")
    b.add_argument("--clip-seconds", type=float, default=5.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--split-fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                   metavar=("TRAIN", "VALID", "TEST"),
                   help="share of the pieces (per composer) and of the note presets / programs (per family) "
                        "in each split (default 0.7 0.15 0.15; the demo uses 0.6 0.15 0.25 for more test pieces)")
    b.add_argument("--renderer", choices=RENDERERS, default="auto",
                   help="auto = soundfont when tinysoundfont and a soundfont (pretty_midi's TimGM6mb.sf2) are "
                        "installed, else the built-in synth; fluidsynth needs the binary and a GM soundfont")
    b.add_argument("--soundfont", help="soundfont for the soundfont/fluidsynth renderers "
                                       "(default: pretty_midi's TimGM6mb.sf2, else the first found)")
    b.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    b.add_argument("--timbres", nargs="+", choices=list(dict.fromkeys([*GM_INSTRUMENTS, *TIMBRES])),
                   help=f"instrument classes (default: all of the renderer's). soundfont/fluidsynth: "
                        f"{' '.join(GM_INSTRUMENTS)} (families of 4 GM programs, split by program); "
                        f"synth: {' '.join(TIMBRES)}")
    b.add_argument("--no-transpose", action="store_true", help="render pieces in their written key")
    b.add_argument("--note-variants", type=int, default=4,
                   help="presets per timbre for the pitch task; soundfont/fluidsynth: GM programs per family, "
                        "each preset one program (at most 4, all of a family's; more warns and uses all)")
    b.add_argument("--pitch-min", type=int, default=48)
    b.add_argument("--pitch-max", type=int, default=72)
    b.add_argument("--note-seconds", type=float, default=2.0)
    b.add_argument("--key-min-correlation", type=float, default=0.75,
                   help="leave pieces with a less clear key out of the key task")
    b.add_argument("--wav-subtype", choices=WAV_SUBTYPES, default="PCM_16")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("import", help="convert a folder of audio + labels CSV into a corpus task")
    i.add_argument("--audio", required=True, help="folder the CSV's paths are relative to")
    i.add_argument("--labels", required=True, help="CSV with columns path,label[,split][,piece]")
    i.add_argument("--out", required=True)
    i.add_argument("--task", help="task name (default: the CSV's file name)")
    i.add_argument("--clip-seconds", type=float, help="cut files into clips of this length")
    i.add_argument("--multilabel", action="store_true", default=None,
                   help="labels are ';'-separated tags (default: detected)")
    i.add_argument("--seed", type=int, default=0, help="seed of the split assignment for rows without one")
    i.add_argument("--wav-subtype", choices=WAV_SUBTYPES, default="PCM_16")
    i.add_argument("--quiet", action="store_true")

    sub.add_parser("renderers", help="list the renderers available here")
    return p


def _summary(manifest: dict) -> str:
    lines = [f"renderer={manifest.get('renderer', '-')} seed={manifest.get('seed')}"]
    for name, t in manifest["tasks"].items():
        n = t["num_clips"]
        lines.append(f"  {name:<11} {len(t['classes']):>3} classes  train {n['train']:>5}  "
                     f"valid {n['valid']:>5}  test {n['test']:>5}   {t['csv']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    if args.command == "renderers":
        from .build import resolve_renderer
        from .render import find_fluidsynth, find_soundfont, import_tinysoundfont

        found = find_fluidsynth()
        sf2 = find_soundfont()
        tsf = import_tinysoundfont() is not None
        print("synth       built in (the fallback of 'auto')")
        print("soundfont   " + ("available: tinysoundfont + " + sf2 if tsf and sf2 else
                                "not available (" + ", ".join(
                                    ([] if tsf else ["no tinysoundfont: pip install --no-deps tinysoundfont"])
                                    + ([] if sf2 else ["no soundfont: pip install pretty_midi"])) + ")"))
        print(f"fluidsynth  {'available: ' + ' + '.join(found) if found else 'not available (no binary or soundfont)'}")
        print(f"auto        {resolve_renderer('auto')[0]}")
        return 0
    t0 = time.perf_counter()
    if args.command == "build":
        from .build import build_corpus

        manifest = build_corpus(
            args.out, num_pieces=args.num_pieces, composers=args.composers,
            versions_per_piece=args.versions_per_piece, max_piece_seconds=args.max_piece_seconds,
            clip_seconds=args.clip_seconds, seed=args.seed, renderer=args.renderer, soundfont=args.soundfont,
            timbres=args.timbres, tasks=args.tasks, transpose=not args.no_transpose,
            note_variants=args.note_variants, pitch_range=(args.pitch_min, args.pitch_max),
            note_seconds=args.note_seconds, key_min_correlation=args.key_min_correlation,
            split_fractions=tuple(args.split_fractions),
            wav_subtype=args.wav_subtype, progress=not args.quiet)
    else:
        from .userdata import import_folder

        manifest = import_folder(args.audio, args.labels, args.out, task=args.task,
                                 clip_seconds=args.clip_seconds, seed=args.seed, multilabel=args.multilabel,
                                 wav_subtype=args.wav_subtype, progress=not args.quiet)
    print(_summary(manifest))
    print(f"wrote {args.out}/corpus.json in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
