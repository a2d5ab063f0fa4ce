"""Bring a user's own audio + label CSV into the corpus format.

Input: a folder of audio files (anything soundfile reads: WAV, FLAC, OGG, ...) and a
CSV in the task format of :mod:`.tables` whose ``path`` column is relative to that
folder. Output (in ``out_dir``): 24 kHz mono WAVs under ``audio/``, ``<task>.csv``
with splits filled in, and the task added to ``corpus.json`` -- exactly what the
probe and the feature extractor read for the built-in corpus.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_write_json
from .build import MANIFEST_FORMAT, WAV_SUBTYPES, _write_wav
from .render import SAMPLE_RATE
from .tables import MULTILABEL_SEP, CorpusError, TaskTable, read_task_csv, split_counts, write_task_csv


def load_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read any soundfile-supported file as mono float32 at ``sample_rate``: ``[num_samples]``."""
    import soundfile as sf
    import soxr

    from ..errors import AudioError

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
        raise AudioError(f"cannot read audio {path}: {exc}") from None
    audio = audio.mean(axis=1)
    if len(audio) == 0 or not np.all(np.isfinite(audio)):
        raise AudioError(f"audio {path} is empty or has non-finite samples")
    if sr != sample_rate:
        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return audio


def import_folder(audio_dir, labels_csv, out_dir, *, task: Optional[str] = None,
                  clip_seconds: Optional[float] = None, sample_rate: int = SAMPLE_RATE, seed: int = 0,
                  split_fractions: Sequence[float] = (0.7, 0.15, 0.15), multilabel: Optional[bool] = None,
                  wav_subtype: str = "PCM_16", progress: bool = True) -> dict:
    """Convert ``audio_dir`` + ``labels_csv`` into a corpus task in ``out_dir``.

    * Every file is resampled to ``sample_rate`` mono (soxr) and, with ``clip_seconds``,
      cut into clips of that length (the remainder is dropped; a file shorter than one
      clip is kept whole). Clips inherit the row's label, split and piece.
    * Rows without a split get one by hashing their ``piece`` (default: the file), so
      clips of one file never straddle splits.
    * ``task`` defaults to the CSV's file name; the task is added to (or replaced in) an
      existing ``out_dir/corpus.json``.

    Returns the manifest.
    """
    from ..progress import progress_bar

    audio_dir, out = Path(audio_dir), Path(out_dir)
    if not audio_dir.is_dir():
        raise CorpusError(f"audio folder not found: {audio_dir}")
    if wav_subtype not in WAV_SUBTYPES:
        raise CorpusError(f"wav_subtype must be one of {list(WAV_SUBTYPES)}, got {wav_subtype!r}")
    if clip_seconds is not None and clip_seconds <= 0:
        raise CorpusError(f"clip_seconds must be > 0, got {clip_seconds}")
    table: TaskTable = read_task_csv(labels_csv, name=task, multilabel=multilabel, seed=seed,
                                     fractions=split_fractions)
    missing = [p for p in table.paths if not (audio_dir / p).is_file()]
    if missing:
        raise CorpusError(f"{len(missing)} of {len(table)} audio files listed in {labels_csv} are missing "
                          f"under {audio_dir}, e.g. {missing[:3]}")
    n_clip = int(round(clip_seconds * sample_rate)) if clip_seconds else None
    rows: List[Dict[str, object]] = []
    for i in progress_bar(range(len(table)), desc=f"import {table.name}", unit="file", disable=not progress):
        audio = load_audio(audio_dir / table.paths[i], sample_rate)
        stem = "audio/" + Path(table.paths[i]).with_suffix("").as_posix()
        if n_clip and len(audio) >= n_clip:
            pieces = [(f"{stem}_c{j:03d}.wav", audio[j * n_clip:(j + 1) * n_clip], j * clip_seconds)
                      for j in range(len(audio) // n_clip)]
        else:
            pieces = [(f"{stem}.wav", audio, 0.0)]
        for rel, clip, start in pieces:
            _write_wav(out / rel, clip, sample_rate, wav_subtype)
            rows.append({"path": rel, "label": MULTILABEL_SEP.join(table.labels[i]), "split": table.splits[i],
                         "piece": table.pieces[i], "source": table.paths[i], "start_s": round(start, 3)})
    write_task_csv(out / f"{table.name}.csv", rows)

    manifest_path = out / "corpus.json"
    manifest = {"format": MANIFEST_FORMAT, "sample_rate": sample_rate, "clip_seconds": clip_seconds,
                "seed": seed, "tasks": {}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise CorpusError(f"{manifest_path} is not valid JSON ({exc}); move it away first") from None
        if manifest.get("sample_rate") != sample_rate:
            raise CorpusError(f"{manifest_path} is at {manifest.get('sample_rate')} Hz, not {sample_rate} Hz")
    manifest.setdefault("tasks", {})[table.name] = {
        "csv": f"{table.name}.csv", "type": "multilabel" if table.multilabel else "multiclass",
        "metric": "roc_auc" if table.multilabel else "accuracy", "classes": table.classes,
        "description": f"imported from {Path(labels_csv).name}",
        "num_clips": split_counts([str(r["split"]) for r in rows]),
    }
    atomic_write_json(manifest_path, manifest)
    return manifest
