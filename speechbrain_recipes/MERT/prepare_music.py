"""Data preparation: a folder of audio (searched recursively) -> SpeechBrain CSV manifests.

Writes into ``save_folder``:

* ``train.csv`` and ``valid.csv`` with columns ``ID,duration,path``: ``ID`` is
  the file's path relative to ``data_folder`` (also the name its offline
  labels are stored under), ``duration`` is in seconds, and ``path`` is
  ``$data_root/<ID>`` so the manifests survive moving the corpus;
* ``skipped.txt``: one line ``<path>\\t<reason>`` per file that was left out
  (unreadable, not audio, NaN/Inf samples, shorter than ``min_duration``, or a
  name clash); skipping is never fatal;
* ``prepare_music.json``: the options, so an unchanged rerun is skipped.

The train/valid split is deterministic and stable when files are added: a
file goes to valid when a hash of its relative path falls below
``valid_fraction`` (at least one file each side when there are two or more).

Usage::

    python prepare_music.py DATA_FOLDER SAVE_FOLDER [--valid_fraction 0.05] [--min_duration 3]

Exit status: 0 all files usable, 2 manifests written but some files skipped, 1 error.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from mert_plugin.atomic import atomic_write_json, atomic_write_text
from mert_plugin.audio import AUDIO_EXTENSIONS, check_audio_path, find_audio_files
from mert_plugin.errors import AudioError

logger = logging.getLogger(__name__)
OPTIONS_FILE = "prepare_music.json"
CSV_FIELDS = ("ID", "duration", "path")


def prepare_music(data_folder: str, save_folder: str, valid_fraction: float = 0.05, min_duration: float = 1.0,
                  check_decode: bool = True, skip_prep: bool = False, progress: bool = True,
                  max_files: int = 0) -> Dict[str, str]:
    """Scan ``data_folder`` and write the manifests; returns their paths.

    ``check_decode`` decodes every file once (catches truncated files and
    NaN/Inf samples, which the header alone does not show); without it only
    the header is read. ``max_files`` (0 = all; the recipe's ``--debug``) checks
    only that many files, evenly spread through the sorted listing.
    """
    paths = {split: os.path.join(save_folder, f"{split}.csv") for split in ("train", "valid")}
    paths["skipped"] = os.path.join(save_folder, "skipped.txt")
    if skip_prep:
        return paths
    if not os.path.isdir(data_folder):
        raise AudioError(f"{data_folder}: data folder not found")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    options = {"data_folder": os.path.abspath(data_folder), "valid_fraction": valid_fraction,
               "min_duration": min_duration, "check_decode": check_decode}
    if max_files:
        options["max_files"] = int(max_files)  # a shortened manifest is never taken for a full one
    if _already_done(save_folder, options, paths):
        logger.info(f"Manifests in {save_folder} are up to date; skipping data preparation")
        return paths

    rows, skipped = scan_folder(data_folder, min_duration, check_decode, progress, max_files)
    if not rows:
        raise AudioError(f"{data_folder}: no usable audio file ({len(skipped)} skipped; see {paths['skipped']})"
                         if skipped else f"{data_folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    train, valid = split_rows(rows, valid_fraction)
    os.makedirs(save_folder, exist_ok=True)
    _write_csv(paths["train"], train)
    _write_csv(paths["valid"], valid)
    atomic_write_text(paths["skipped"], "".join(f"{p}\t{reason}\n" for p, reason in skipped))
    atomic_write_json(os.path.join(save_folder, OPTIONS_FILE), options, sort_keys=False)
    hours = sum(r[1] for r in rows) / 3600
    logger.info(f"Data preparation: {len(train)} train and {len(valid)} valid files ({hours:.2f} h); "
                f"{len(skipped)} skipped" + (f", listed in {paths['skipped']}" if skipped else ""))
    for p, reason in skipped[:20]:
        logger.warning(f"skipped {p}: {reason}")
    return paths


def scan_folder(data_folder: str, min_duration: float, check_decode: bool = True, progress: bool = True,
                max_files: int = 0) -> Tuple[List[Tuple[str, float]], List[Tuple[str, str]]]:
    """-> ([(relative_path, duration_s)], [(path, reason)]) for every audio-named file (and folder that
    cannot be read); with ``max_files`` > 0, for that many files evenly spread through the listing."""
    from mert_plugin.progress import progress_bar

    rows, stems, unreadable = [], {}, []
    files = find_audio_files([data_folder], unreadable=unreadable)
    if 0 < max_files < len(files):
        files = [files[i * len(files) // max_files] for i in range(max_files)]
    skipped = [(folder, f"cannot read folder ({reason})") for folder, reason in unreadable]
    for path, rel in progress_bar(files, desc="scanning audio", disable=not progress, unit="file"):
        rel = rel.replace(os.sep, "/")
        stem = os.path.splitext(rel)[0]
        if stem in stems:
            skipped.append((path, f"same name as {stems[stem]} with another extension (label files would clash)"))
            continue
        try:
            duration = probe_duration(path, check_decode)
        except AudioError as exc:
            skipped.append((path, str(exc).split(": ", 1)[-1]))
            continue
        if duration < min_duration:
            skipped.append((path, f"too short ({duration:.2f} s < min_duration {min_duration} s)"))
            continue
        stems[stem] = rel
        rows.append((rel, duration))
    return rows, skipped


def probe_duration(path: str, check_decode: bool = True) -> float:
    """Duration in seconds; :class:`AudioError` for anything that cannot be used."""
    import soundfile as sf

    check_audio_path(path)
    try:
        info = sf.info(path)
        if not check_decode:
            frames = info.frames
        else:
            frames = 0
            for block in sf.blocks(path, blocksize=info.samplerate * 60, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioError(f"{path}: contains NaN or infinite samples")
                frames += block.shape[0]
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types for broken input
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise AudioError(f"{path}: cannot decode audio ({reason})") from None
    if frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: contains no samples")
    return frames / info.samplerate


def split_rows(rows: List[Tuple[str, float]], valid_fraction: float):
    """Deterministic split on a hash of the relative path -> (train, valid)."""
    def score(rel):
        return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:12], 16) / float(16 ** 12)

    scored = sorted(rows, key=lambda r: score(r[0]))
    n_valid = sum(1 for r in rows if score(r[0]) < valid_fraction)
    if len(rows) >= 2 and valid_fraction > 0:
        n_valid = min(max(n_valid, 1), len(rows) - 1)
    valid, train = scored[:n_valid], scored[n_valid:]
    return sorted(train), sorted(valid)


def _write_csv(path: str, rows: List[Tuple[str, float]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(CSV_FIELDS)
    for rel, duration in rows:
        writer.writerow((rel, f"{duration:.3f}", f"$data_root/{rel}"))
    atomic_write_text(path, buf.getvalue())


def _already_done(save_folder: str, options: dict, paths: Dict[str, str]) -> bool:
    try:
        with open(os.path.join(save_folder, OPTIONS_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return saved == options and all(os.path.isfile(p) for p in paths.values())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("--valid_fraction", type=float, default=0.05)
    parser.add_argument("--min_duration", type=float, default=1.0)
    parser.add_argument("--no_decode_check", action="store_true", help="read headers only (faster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = prepare_music(args.data_folder, args.save_folder, args.valid_fraction, args.min_duration,
                              check_decode=not args.no_decode_check)
    except (AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {paths['train']} and {paths['valid']}")
    with open(paths["skipped"], encoding="utf-8") as f:
        n_skipped = sum(1 for _ in f)
    if n_skipped:
        print(f"{n_skipped} file(s) skipped, listed in {paths['skipped']}", file=sys.stderr)
        return 2  # manifests written, but not every file made it
    return 0


if __name__ == "__main__":
    sys.exit(main())
