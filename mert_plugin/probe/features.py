"""Clip features for probing: loading frozen layer features and hand-crafted baselines.

Feature-set format (what an extractor writes and the probe reads)::

    FEATURE_DIR/<clip path relative to the corpus, without its extension>.npy

e.g. clip ``audio/pieces/bach/bwv66.6/t+2_organ_00.wav`` ->
``FEATURE_DIR/audio/pieces/bach/bwv66.6/t+2_organ_00.npy``. Each array is either
``[L, D]`` (already mean-pooled over time, one row per layer, layer 0 = the CNN/
embedding output as in ``hidden_states``) or ``[L, T, D]`` (pooled here by the mean
over T, as in the MARBLE protocol).

Shapes: N = clips, L = layers, D = feature size, T = frames.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import MERTError

BASELINES = ("cqt", "mfcc", "level")


class ProbeError(MERTError, ValueError):
    """Bad probe input: missing or inconsistent feature files, unknown task, ..."""


def feature_file(feature_dir, rel_audio_path: str) -> Path:
    """Where the features of a clip live: ``<feature_dir>/<rel path without extension>.npy``.

    For reading, ``<rel path with extension>.npy`` (``b.wav.npy``) is accepted too when
    the first does not exist: ``mert-extract`` uses that name when two inputs differ only
    by extension."""
    rel = Path(rel_audio_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise ProbeError(f"clip path must be relative and inside the corpus: {rel_audio_path!r}")
    return Path(feature_dir) / rel.with_suffix(".npy")


def _existing_feature_file(feature_dir, rel_audio_path: str) -> Path:
    main = feature_file(feature_dir, rel_audio_path)
    alt = Path(feature_dir) / (rel_audio_path + ".npy")
    return alt if not main.is_file() and alt.is_file() else main


def save_clip_features(feature_dir, rel_audio_path: str, features: np.ndarray) -> Path:
    """Write one clip's features (``[L, D]`` or ``[L, T, D]``) atomically; returns the path."""
    features = np.asarray(features)
    if features.ndim not in (2, 3):
        raise ProbeError(f"features must be [L, D] or [L, T, D], got shape {features.shape}")
    path = feature_file(feature_dir, rel_audio_path)
    buf = io.BytesIO()
    np.save(buf, features, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pool(features: np.ndarray, where: str = "") -> np.ndarray:
    """``[L, D] -> [L, D]``; ``[L, T, D] -> [L, D]`` (mean over time)."""
    if features.ndim == 3:
        if features.shape[1] == 0:
            raise ProbeError(f"{where}: features have zero frames")
        return features.mean(axis=1)
    if features.ndim == 2:
        return features
    raise ProbeError(f"{where}: features must be [L, D] or [L, T, D], got shape {features.shape}")


def load_feature_set(feature_dir, rel_paths: Sequence[str], name: str = "") -> np.ndarray:
    """Load and pool the features of every clip: ``float32 [N, L, D]``.

    Raises :class:`ProbeError` listing how many files are missing (with examples), or
    which file has a different ``[L, D]`` than the first one.
    """
    feature_dir = Path(feature_dir)
    label = f"feature set {name!r} ({feature_dir})" if name else str(feature_dir)
    if not feature_dir.is_dir():
        raise ProbeError(f"{label}: folder not found")
    files = [_existing_feature_file(feature_dir, p) for p in rel_paths]
    missing = [str(f.relative_to(feature_dir)) for f in files if not f.is_file()]
    if missing:
        raise ProbeError(f"{label}: {len(missing)} of {len(files)} feature files are missing, "
                         f"e.g. {missing[:3]} (expected <clip path without extension>.npy)")
    out = None
    for i, f in enumerate(files):
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ProbeError(f"{label}: cannot read {f}: {exc}") from None
        arr = pool(arr, str(f))
        if out is None:
            out = np.empty((len(files),) + arr.shape, dtype=np.float32)
        elif arr.shape != out.shape[1:]:
            raise ProbeError(f"{label}: {f} has pooled shape {list(arr.shape)} but "
                             f"{files[0]} has {list(out.shape[1:])}")
        out[i] = arr
    if out is None:
        raise ProbeError(f"{label}: no clips to load")
    if not np.all(np.isfinite(out)):
        raise ProbeError(f"{label}: features contain NaN or inf")
    return out


class HandcraftedExtractor:
    """Hand-crafted clip features: ``[num_samples] -> [1, D]`` (one pseudo-layer).

    * ``cqt``: nnAudio CQT (84 semitone bins from C1, hop 320 = MERT's 75 Hz frame rate),
      log magnitude, mean and std over time per bin -> D = 168.
    * ``mfcc``: nnAudio MFCC (20 coefficients, 128 mels, 1024-point FFT, hop 320),
      mean and std over time -> D = 40.
    * ``level``: loudness and its course in time only, no spectrum: the frame RMS in dB
      (1024-sample frames, hop 320) summarised by mean, std, min, max and its 10/50/90th
      percentiles; the peak sample in dB and the crest factor (peak minus mean); the share of
      frames within 20 dB of the loudest; and the envelope, the mean frame dB of 8 equal
      parts of the clip minus the clip's mean -> D = 18. What a probe reads from it is what
      level and envelope alone tell (attack/decay shapes tell instrument families apart), the
      bar that "learnt timbre" must clear.
    """

    def __init__(self, kind: str, sample_rate: int = 24000):
        import torch
        from nnAudio import features as nn_features

        if kind not in BASELINES:
            raise ProbeError(f"unknown baseline {kind!r}; choose from {list(BASELINES)}")
        self.kind, self.sample_rate, self.torch = kind, sample_rate, torch
        if kind == "level":
            self.layer = None
        elif kind == "cqt":
            self.layer = nn_features.CQT1992v2(sr=sample_rate, hop_length=320, fmin=32.7, n_bins=84,
                                               bins_per_octave=12, verbose=False)
        else:
            self.layer = nn_features.MFCC(sr=sample_rate, n_mfcc=20, n_fft=1024, hop_length=320, n_mels=128,
                                          verbose=False)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        if self.kind == "level":
            return level_features(audio)[None]
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
            spec = self.layer(x)[0]  # [bins, frames]
            if self.kind == "cqt":
                spec = torch.log(spec + 1e-5)
            feats = torch.cat([spec.mean(dim=1), spec.std(dim=1)])
        return feats.numpy()[None].astype(np.float32)


def level_features(audio: np.ndarray, frame: int = 1024, hop: int = 320, parts: int = 8) -> np.ndarray:
    """The ``level`` baseline of one clip: ``[num_samples] -> float32 [18]`` (see
    :class:`HandcraftedExtractor`). Clips shorter than a frame are zero-padded to one frame."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    starts = np.arange(0, len(x) - frame + 1, hop)
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[starts]  # [T, frame]
    db = 20 * np.log10(np.sqrt((frames ** 2).mean(1)) + 1e-8)           # [T]
    peak = 20 * np.log10(np.abs(x).max() + 1e-8)
    envelope = [part.mean() - db.mean() for part in np.array_split(db, parts) if len(part)]
    envelope += [0.0] * (parts - len(envelope))                         # clips of fewer than 8 frames
    stats = [db.mean(), db.std(), db.min(), db.max(), *np.percentile(db, [10, 50, 90]), peak, peak - db.mean(),
             float(np.mean(db >= db.max() - 20.0))]
    return np.asarray(stats + envelope, dtype=np.float32)


def handcrafted_features(audio_root, rel_paths: Sequence[str], kind: str, sample_rate: int = 24000,
                         progress: bool = True) -> np.ndarray:
    """Compute a hand-crafted baseline for every clip: ``float32 [N, 1, D]``.
    Audio that is not at ``sample_rate`` is resampled (soxr), stereo is averaged."""
    from ..progress import progress_bar

    from ..corpus.userdata import load_audio

    audio_root = Path(audio_root)
    missing = [p for p in rel_paths if not (audio_root / p).is_file()]
    if missing:
        raise ProbeError(f"baseline {kind!r}: {len(missing)} of {len(rel_paths)} audio files are missing "
                         f"under {audio_root}, e.g. {missing[:3]}")
    extract = HandcraftedExtractor(kind, sample_rate)
    rows: List[np.ndarray] = []
    for p in progress_bar(rel_paths, desc=f"baseline {kind}", unit="clip", disable=not progress):
        rows.append(extract(load_audio(audio_root / p, sample_rate)))
    return np.stack(rows)
