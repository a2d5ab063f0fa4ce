"""Audio input: read, mix down, resample and validate.

Reading uses soundfile (wav, flac, ogg, mp3 via libsndfile); resampling uses
soxr's very-high-quality mode by default, or torchaudio's sinc resampler (what
the official MERT examples use) with ``resampler="torchaudio"``.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import AudioError

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".opus")
MIN_SAMPLES = 400  # receptive field of one MERT frame


def load_audio(path: str, sample_rate: int, resampler: str = "soxr", min_samples: int = MIN_SAMPLES) -> torch.Tensor:
    """Read ``path`` as mono float32 at ``sample_rate``: a 1-D tensor [N].

    Raises :class:`AudioError` naming the file for anything unusable: missing,
    a folder, unreadable, not audio, empty, non-finite samples, or shorter
    than ``min_samples`` after resampling. Silence, many channels and unusual
    sample rates are valid input.
    """
    import soundfile as sf

    path = check_audio_path(path)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError/TypeError
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise AudioError(f"{path}: cannot decode audio ({reason})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return prepare_waveform(wav, sr, sample_rate, name=path, resampler=resampler, min_samples=min_samples)


def check_audio_path(path: str) -> str:
    """Raise :class:`AudioError` unless ``path`` is a readable, non-empty regular file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file")
    return path


def prepare_waveform(wav: Union[np.ndarray, torch.Tensor], orig_sr: int, sample_rate: int, name: str = "waveform",
                     resampler: str = "soxr", min_samples: int = MIN_SAMPLES) -> torch.Tensor:
    """Validate, mix down ([C, N] or [N]) and resample an in-memory signal -> [N] float32."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav)
    if wav.dtype.kind not in "fiu":
        raise AudioError(f"{name}: expected numeric samples, got dtype {wav.dtype}")
    if wav.ndim == 2:
        wav = wav.mean(axis=0)  # channels-first [C, N]
    if wav.ndim != 1:
        raise AudioError(f"{name}: expected a 1-D mono signal or [channels, samples], got shape {list(wav.shape)}")
    if wav.size == 0:
        raise AudioError(f"{name}: contains no samples")
    if wav.dtype.kind in "iu":
        wav = wav.astype(np.float32) / float(np.iinfo(wav.dtype).max)
    wav = wav.astype(np.float32, copy=False)
    if not np.isfinite(wav).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    if not isinstance(orig_sr, (int, np.integer)) or orig_sr <= 0:
        raise AudioError(f"{name}: invalid sample rate {orig_sr!r}")
    out = torch.from_numpy(np.ascontiguousarray(resample(wav, int(orig_sr), sample_rate, resampler)))
    if out.numel() < min_samples:
        raise AudioError(f"{name}: too short: {out.numel()} samples at {sample_rate} Hz "
                         f"({out.numel() / sample_rate * 1000:.1f} ms); at least {min_samples} "
                         f"({min_samples / sample_rate * 1000:.1f} ms) are needed for one frame")
    return out


def resample(wav: np.ndarray, orig_sr: int, new_sr: int, resampler: str = "soxr") -> np.ndarray:
    """Resample a 1-D float32 signal. ``resampler``: ``soxr`` (VHQ) or ``torchaudio``."""
    if orig_sr == new_sr:
        return wav
    if resampler == "soxr":
        import soxr

        return soxr.resample(wav, orig_sr, new_sr, quality="VHQ").astype(np.float32, copy=False)
    if resampler == "torchaudio":
        from .compat import ensure_torchaudio_importable

        ensure_torchaudio_importable()
        import torchaudio.functional as AF

        return AF.resample(torch.from_numpy(wav), orig_sr, new_sr).numpy()
    raise AudioError(f"unknown resampler {resampler!r} (use 'soxr' or 'torchaudio')")


def find_audio_files(inputs: Sequence[str], extensions: Iterable[str] = AUDIO_EXTENSIONS,
                     unreadable: Optional[List[Tuple[str, str]]] = None) -> List[tuple]:
    """Expand files, folders (recursive) and glob patterns into ``(path, relative_name)`` pairs.

    ``relative_name`` is the path relative to the folder it was found in (or the
    file name for explicit files), used to mirror the folder structure in outputs.
    Missing inputs are returned with ``relative_name=None`` so the caller can
    report them without stopping. A folder that cannot be listed (permissions,
    I/O error) is never skipped silently: ``(folder, reason)`` is appended to
    ``unreadable`` when the caller passes a list (and reports it), otherwise a
    warning naming the folder is logged.
    """
    exts = tuple(e.lower() for e in extensions)
    out, seen = [], set()

    def cannot_list(exc: OSError):
        folder = exc.filename if exc.filename is not None else "?"
        reason = exc.strerror or type(exc).__name__
        if unreadable is not None:
            unreadable.append((str(folder), reason))
        else:
            logger.warning(f"cannot read folder {folder} ({reason}); its audio files are skipped")

    def add(path, rel):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.append((path, rel))

    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item, onerror=cannot_list):
                dirs.sort()
                for f in sorted(files):
                    full = os.path.join(root, f)
                    if f.lower().endswith(exts):
                        add(full, os.path.relpath(full, item))
        elif os.path.exists(item):
            add(item, os.path.basename(item))
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                add(item, None)
            for m in matches:
                if os.path.isdir(m):
                    for path, rel in find_audio_files([m], exts, unreadable):
                        add(path, rel)
                else:
                    add(m, os.path.basename(m))
        else:
            add(item, None)
    return out
