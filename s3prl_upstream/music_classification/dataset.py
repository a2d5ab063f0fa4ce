"""Clip table (``path,label,split`` CSV) and the dataset that reads it at 16 kHz.

The CSV is what ``mert-corpus`` writes for each task: a header row, ``path``
relative to an audio root (``/`` separators), one ``label`` per clip, and
``split`` in ``train``/``valid``/``test`` (``dev`` is accepted as ``valid``).
Further columns are ignored.
"""
from __future__ import annotations

import csv
import os
import random
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mert_plugin.audio import load_audio
from mert_plugin.errors import MERTError

SAMPLE_RATE = 16000  # s3prl feeds every upstream 16 kHz audio
MIN_SAMPLES = 400  # 25 ms: shorter clips are almost surely broken
# s3prl calls the validation split "dev"; corpus tables call it "valid".
SPLIT_ALIASES = {"dev": "valid"}


class Clip(NamedTuple):
    path: str  # as written in the CSV, relative to the audio root
    label: str
    split: str  # train, valid or test


def canonical_split(split: str) -> str:
    return SPLIT_ALIASES.get(split, split)


def read_clip_table(csv_path: str) -> List[Clip]:
    """Rows of a ``path,label,split`` CSV; :class:`MERTError` naming file and line for bad input."""
    if not os.path.isfile(csv_path):
        raise MERTError(f"{csv_path}: clip table not found (set config.downstream_expert.datarc.csv)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", "label", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise MERTError(f"{csv_path}: missing column(s) {missing}; need path,label,split")
        clips = []
        for line, row in enumerate(reader, start=2):
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            split = canonical_split((row["split"] or "").strip())
            if not path or not label:
                raise MERTError(f"{csv_path}:{line}: empty path or label")
            if split not in ("train", "valid", "test"):
                raise MERTError(f"{csv_path}:{line}: split {split!r} is not train, valid (dev) or test")
            if ";" in label:
                raise MERTError(f"{csv_path}:{line}: multi-label row {label!r}; this downstream is "
                                f"single-label clip classification")
            clips.append(Clip(path, label, split))
    if not clips:
        raise MERTError(f"{csv_path}: no rows")
    return clips


def check_audio_files(paths: Sequence[str], source: str) -> None:
    """Fail before training if any file is missing, unreadable, empty or too short.

    Reads only headers (``soundfile.info``), so it is cheap; lists every bad file.
    """
    import soundfile as sf

    bad = []
    for path in paths:
        try:
            info = sf.info(path)
        except Exception as exc:  # missing, a folder, not audio, permission denied
            reason = "no such file" if not os.path.exists(path) else (
                "is a folder" if os.path.isdir(path) else (str(exc).strip().splitlines() or ["unreadable"])[-1])
            bad.append(f"{path} ({reason})")
            continue
        if info.frames * SAMPLE_RATE < MIN_SAMPLES * info.samplerate:
            bad.append(f"{path} ({info.frames} samples at {info.samplerate} Hz: empty or under 25 ms)")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise MERTError(f"{source}: {len(bad)} unusable audio file(s): {shown}")


class MusicClipDataset(Dataset):
    """One split of a clip table: items ``(wav [n] float32 at 16 kHz, label index, path)``.

    ``max_seconds`` crops long clips: a random window when ``random_crop`` (training),
    else the beginning (evaluation, deterministic).
    """

    def __init__(self, clips: Sequence[Clip], root: str, class_index: Dict[str, int],
                 max_seconds: Optional[float] = None, random_crop: bool = False):
        self.clips = list(clips)
        self.root = root
        self.class_index = class_index
        self.max_samples = int(max_seconds * SAMPLE_RATE) if max_seconds else None
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.clips)

    def full_path(self, clip: Clip) -> str:
        return os.path.join(self.root, *clip.path.split("/"))

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, str]:
        clip = self.clips[i]
        wav = load_audio(self.full_path(clip), SAMPLE_RATE)
        if self.max_samples and wav.numel() > self.max_samples:
            start = random.randint(0, wav.numel() - self.max_samples) if self.random_crop else 0
            wav = wav[start:start + self.max_samples]
        return wav, self.class_index[clip.label], clip.path

    @staticmethod
    def collate_fn(samples):
        wavs, labels, paths = zip(*samples)
        return list(wavs), list(labels), list(paths)
