"""Task tables (one CSV per task) and deterministic splits.

A task CSV has a header row and one row per clip:

=========  ========  ===========================================================
column     required  meaning
=========  ========  ===========================================================
``path``   yes       audio file, relative to the corpus/audio root (``/`` separators)
``label``  yes       class name; for a multi-label task, tags joined by ``;``
``split``  no        ``train``, ``valid`` or ``test``; if the column is missing
                     (or a cell is empty) the split is derived from ``piece``
``piece``  no        group that must not cross splits (song, recording, ...);
                     defaults to ``path``
=========  ========  ===========================================================

Any further columns are kept as metadata and ignored by the probe.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401 (old home, kept)
from ..errors import MERTError

SPLITS = ("train", "valid", "test")
REQUIRED_COLUMNS = ("path", "label")
MULTILABEL_SEP = ";"


class CorpusError(MERTError, ValueError):
    """Bad corpus input: an unknown option, a malformed CSV, missing audio, ..."""


# --------------------------------------------------------------------------- hashing / splits

def stable_hash(*parts) -> int:
    """A 64-bit hash of ``parts`` that is identical across processes and machines
    (unlike :func:`hash`, which is salted per interpreter)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def assign_splits(groups: Iterable[str], seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                  strata: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Map each group (piece) to ``train``/``valid``/``test``.

    Within each stratum (e.g. composer) the groups are ordered by
    ``stable_hash(seed, group)`` and cut by ``fractions``. A stratum with >= 3 groups
    gets at least one valid and one test group; with 2 groups: train + test; with 1:
    train. The assignment of a group depends only on the seed and on the other groups
    of its stratum, never on input order.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise CorpusError(f"split fractions must be three non-negative numbers, got {list(fractions)}")
    total = float(sum(fractions))
    f_valid, f_test = fractions[1] / total, fractions[2] / total
    by_stratum: Dict[str, List[str]] = {}
    for g in sorted(set(groups)):
        by_stratum.setdefault(strata[g] if strata else "", []).append(g)
    out: Dict[str, str] = {}
    for members in by_stratum.values():
        members.sort(key=lambda g: (stable_hash(seed, "split", g), g))
        n = len(members)
        if n >= 3:
            n_test = max(1, round(f_test * n)) if f_test > 0 else 0
            n_valid = max(1, round(f_valid * n)) if f_valid > 0 else 0
            n_test, n_valid = min(n_test, n - 1), min(n_valid, max(0, n - 1 - n_test))
        else:
            n_test, n_valid = (1 if (n == 2 and f_test > 0) else 0), 0
        for i, g in enumerate(members):
            out[g] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return out


# --------------------------------------------------------------------------- task tables

@dataclass
class TaskTable:
    """One task's rows. ``labels[i]`` is a list of tags (one tag for multi-class)."""

    name: str
    paths: List[str]
    labels: List[List[str]]
    splits: List[str]
    pieces: List[str]
    multilabel: bool = False
    extra: Dict[str, List[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> List[str]:
        return sorted({t for tags in self.labels for t in tags}, key=_natural_key)

    def indices(self, split: str) -> List[int]:
        return [i for i, s in enumerate(self.splits) if s == split]


def _natural_key(s: str):
    """Sort MIDI-pitch labels numerically ("48" < "100") and names alphabetically."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def read_task_csv(csv_path, name: Optional[str] = None, multilabel: Optional[bool] = None,
                  seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> TaskTable:
    """Read and validate a task CSV (format in the module docstring).

    ``multilabel=None`` infers it: a task is multi-label when any label contains ``;``.
    Rows without a split get one from :func:`assign_splits` over their ``piece``.
    Raises :class:`CorpusError` naming the file and row for every malformed input.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CorpusError(f"task CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CorpusError(f"{csv_path}: missing column(s) {missing}; header is {header} "
                              f"(required: path,label; optional: split,piece)")
        rows = list(reader)
    if not rows:
        raise CorpusError(f"{csv_path}: no rows")
    if multilabel is None:
        multilabel = any(MULTILABEL_SEP in (r["label"] or "") for r in rows)
    paths, labels, splits, pieces = [], [], [], []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        path, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
        if not path or not label:
            raise CorpusError(f"{csv_path}:{i}: empty path or label")
        split = (r.get("split") or "").strip()
        if split and split not in SPLITS:
            raise CorpusError(f"{csv_path}:{i}: split {split!r} is not one of {list(SPLITS)}")
        tags = [t.strip() for t in label.split(MULTILABEL_SEP) if t.strip()] if multilabel else [label]
        paths.append(path)
        labels.append(tags)
        splits.append(split)
        pieces.append((r.get("piece") or "").strip() or path)
    if any(not s for s in splits):
        auto = assign_splits(pieces, seed, fractions)
        splits = [s or auto[p] for s, p in zip(splits, pieces)]
    _check_no_piece_leak(csv_path, pieces, splits)
    extra = {c: [r.get(c, "") for r in rows] for c in header if c not in ("path", "label", "split", "piece")}
    return TaskTable(name or csv_path.stem, paths, labels, splits, pieces, bool(multilabel), extra)


def _check_no_piece_leak(csv_path: Path, pieces: Sequence[str], splits: Sequence[str]) -> None:
    seen: Dict[str, str] = {}
    for p, s in zip(pieces, splits):
        if seen.setdefault(p, s) != s:
            raise CorpusError(f"{csv_path}: piece {p!r} appears in both {seen[p]!r} and {s!r} splits")


def write_task_csv(path: Path, rows: Sequence[Mapping[str, object]],
                   columns: Sequence[str] = ("path", "label", "split", "piece")) -> None:
    """Write rows (dicts) with ``columns`` first, then any extra keys in sorted order."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns) + extra, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(Path(path), buf.getvalue())


def split_counts(splits: Sequence[str]) -> Dict[str, int]:
    return {s: sum(1 for x in splits if x == s) for s in SPLITS}


def label_counts(labels: Iterable[str]) -> List[Tuple[str, int]]:
    counts: Dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return sorted(counts.items(), key=lambda kv: _natural_key(kv[0]))
