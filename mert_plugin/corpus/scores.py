"""music21 scores -> note events and labels (key, composer).

music21 is imported lazily: importing it takes about a second and only corpus
building needs it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .render import Note
from .tables import CorpusError, stable_hash

# One fixed spelling per pitch class, so that enharmonic keys share a label.
PITCH_CLASS_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
KEY_CLASSES = tuple(f"{n} {m}" for m in ("major", "minor") for n in PITCH_CLASS_NAMES)
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc", ".mid", ".midi")
# Composers with enough pieces in music21's bundled corpus and real composer labels.
DEFAULT_COMPOSERS = ("bach", "palestrina", "monteverdi", "mozart", "haydn")
# Renaissance/medieval collections are modal: "major/minor key" is not a meaningful label
# for them, so their pieces are left out of the key task (they stay in the other tasks).
MODAL_COLLECTIONS = ("palestrina", "monteverdi", "trecento", "josquin", "ciconia", "luca")
DEFAULT_BPM = 100.0       # used when a score has no metronome mark
DEFAULT_VELOCITY = 80     # used when a part has no dynamics (between mp and mf)


@dataclass
class PieceInfo:
    """What the corpus builder needs from one score (cached as JSON).

    ``notes`` are in seconds from the start of the piece; ``key`` is one of
    :data:`KEY_CLASSES` and ``key_correlation`` music21's Krumhansl-Schmuckler
    correlation for it (how clearly tonal the piece is)."""

    piece: str
    composer: str
    notes: List[Note]
    key: str
    key_correlation: float
    duration: float

    def fingerprint(self) -> int:
        """Hash of the opening melody's intervals and rhythm: equal for two files holding the
        same music, even transposed, so duplicates can be dropped."""
        head = self.notes[:48]
        return stable_hash(*[(n.pitch - head[0].pitch, round(n.onset - head[0].onset, 2)) for n in head])

    def to_json(self) -> dict:
        return {"piece": self.piece, "composer": self.composer, "key": self.key,
                "key_correlation": self.key_correlation, "duration": self.duration,
                "notes": [list(n) for n in self.notes]}

    @classmethod
    def from_json(cls, d: dict) -> "PieceInfo":
        notes = [Note(float(a), float(b), int(c), int(e)) for a, b, c, e in d["notes"]]
        return cls(d["piece"], d["composer"], notes, d["key"], float(d["key_correlation"]), float(d["duration"]))


# --------------------------------------------------------------------------- keys

def key_name(pitch_class: int, mode: str) -> str:
    """``(9, "minor") -> "A minor"``."""
    if mode not in ("major", "minor"):
        raise CorpusError(f"key mode must be 'major' or 'minor', got {mode!r}")
    return f"{PITCH_CLASS_NAMES[pitch_class % 12]} {mode}"


def transpose_key(key: str, semitones: int) -> str:
    """The key label after transposing the music by ``semitones`` (mode unchanged)."""
    tonic, mode = key.split(" ")
    return key_name(PITCH_CLASS_NAMES.index(tonic) + semitones, mode)


KEY_TONIC_MARGIN = 0.1  # how much key-profile correlation the tonic rule of key_of may give up


def outer_bass_pitch_classes(stream) -> Tuple[Optional[int], Optional[int]]:
    """Pitch classes of the lowest note sounding at the very start and at the very end
    (``None`` if there are no notes)."""
    notes = list(stream.flatten().notes)
    if not notes:
        return None, None
    start = min(float(n.offset) for n in notes)
    end = max(float(n.offset + n.quarterLength) for n in notes)
    first = [p for n in notes if float(n.offset) <= start + 1e-6 for p in n.pitches]
    last = [p for n in notes if float(n.offset + n.quarterLength) >= end - 1e-6 for p in n.pitches]
    return (min(first, key=lambda p: p.ps).pitchClass, min(last, key=lambda p: p.ps).pitchClass)


def key_of(stream) -> Tuple[str, float]:
    """Global key label of a music21 stream: ``(one of KEY_CLASSES, correlation)``.

    Key-profile correlation alone (music21's ``analyze('key')``, Krumhansl-Schmuckler
    with Aarden-Essen profiles) often cannot tell a key from its relative: a plain
    C-major scale correlates best with A minor (0.824 vs 0.818). Tonal music starts and
    ends on its tonic, so among the keys whose correlation is within
    :data:`KEY_TONIC_MARGIN` of the best, the best one whose tonic is the first or the
    last bass note wins (both count because da-capo movements end on the trio); if
    there is none, the best overall. The label describes the whole stream (like
    GiantSteps' global keys), not local modulations; for modal music (Palestrina,
    Monteverdi) it is the nearest major/minor key."""
    best = stream.analyze("key")
    top = best.correlationCoefficient
    tonics = set(outer_bass_pitch_classes(stream)) - {None}
    chosen = next((k for k in [best] + list(best.alternateInterpretations)
                   if k.tonic.pitchClass in tonics and k.mode in ("major", "minor")
                   and k.correlationCoefficient >= top - KEY_TONIC_MARGIN), best)
    return key_name(chosen.tonic.pitchClass, chosen.mode), float(chosen.correlationCoefficient)


# --------------------------------------------------------------------------- corpus pieces

def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def list_pieces(composer: str) -> List[str]:
    """Score files of one composer/collection of music21's bundled corpus, as ids relative to
    the corpus root (``"bach/bwv66.6.mxl"``). Non-score files (e.g. ``.rntxt`` analyses) are
    left out."""
    from music21 import corpus

    root = corpus_root()
    by_stem: Dict[str, str] = {}
    # The corpus has some pieces in two formats (e.g. beethoven/opus18no1/movement4 as
    # .mxl and .krn); keep one file per stem, or the same music could land in two splits.
    for p in sorted(corpus.getComposer(composer), key=lambda p: (SCORE_SUFFIXES.index(Path(p).suffix.lower())
                                                                 if Path(p).suffix.lower() in SCORE_SUFFIXES
                                                                 else 99, str(p))):
        rel = Path(p).relative_to(root)
        if rel.suffix.lower() in SCORE_SUFFIXES:
            by_stem.setdefault(rel.with_suffix("").as_posix(), rel.as_posix())
    ids = sorted(by_stem.values())
    if not ids:
        raise CorpusError(f"music21's corpus has no scores for composer {composer!r} "
                          f"(try one of {list(DEFAULT_COMPOSERS)}, 'beethoven', 'trecento', 'ryansMammoth')")
    return ids


def candidate_order(composer: str, seed: int) -> List[str]:
    """All pieces of ``composer`` in a seeded, order-independent pseudo-random order."""
    return sorted(list_pieces(composer), key=lambda p: (stable_hash(seed, "piece", p), p))


def parse_piece(piece: str, composer: str, *, max_seconds: Optional[float] = None,
                default_bpm: float = DEFAULT_BPM) -> PieceInfo:
    """Parse a corpus piece (id relative to :func:`corpus_root`) into a :class:`PieceInfo`.
    An opus file (several scores) contributes its first score."""
    from music21 import converter, stream

    s = converter.parse(str(corpus_root() / piece))
    if isinstance(s, stream.Opus):
        s = s.scores[0]
    notes = score_to_notes(s, max_seconds=max_seconds, default_bpm=default_bpm)
    if not notes:
        raise CorpusError(f"{piece}: no pitched notes")
    key, corr = key_of(s)
    duration = max(n.onset + n.duration for n in notes)
    return PieceInfo(piece, composer, notes, key, corr, duration)


# --------------------------------------------------------------------------- score -> notes

def _tempo_segments(score, default_bpm: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts_ql, starts_s, seconds_per_ql)`` of constant-tempo segments."""
    from music21 import tempo

    has_marks = any(True for _ in score.recurse().getElementsByClass(tempo.MetronomeMark))
    segments = []
    if has_marks:
        # music21 also reports zero-length boundaries (one per part's copy of a mark at
        # offset 0); only spans with a length matter.
        for start, end, mm in score.metronomeMarkBoundaries():
            if end > start:
                segments.append((float(start), 60.0 / float(mm.getQuarterBPM() or default_bpm)))
    if not segments:
        segments = [(0.0, 60.0 / default_bpm)]
    segments.sort()
    starts = np.array([s for s, _ in segments])
    spq = np.array([r for _, r in segments])
    starts_s = np.concatenate([[0.0], np.cumsum(np.diff(starts) * spq[:-1])]) + starts[0] * spq[0]
    return starts, starts_s, spq


def _to_seconds(ql: float, seg) -> float:
    starts, starts_s, spq = seg
    i = max(0, int(np.searchsorted(starts, ql, side="right")) - 1)
    return float(starts_s[i] + (ql - starts[i]) * spq[i])


def score_to_notes(score, *, max_seconds: Optional[float] = None,
                   default_bpm: float = DEFAULT_BPM) -> List[Note]:
    """All pitched notes of a music21 score as :class:`Note` (seconds, MIDI, velocity).

    * Tempo comes from the score's metronome marks (``default_bpm`` when there are none).
    * Tied notes are merged into one note (cheaper than music21's ``stripTies``).
    * Velocity: the note's own ``volume.velocity`` if set, else the last dynamic
      marking (``p``, ``f``, ...) before it in its part, else :data:`DEFAULT_VELOCITY`.
    * Chords become one note per pitch; grace notes (zero length) are skipped.
    * With ``max_seconds``, notes starting at or after it are dropped.
    """
    from music21 import dynamics, stream

    seg = _tempo_segments(score, default_bpm)
    parts = list(score.getElementsByClass(stream.Part)) or [score]  # a bare Stream is one part
    notes: List[Note] = []
    for part in parts:
        flat = part.flatten()
        dyn = [(float(d.offset), d.volumeScalar) for d in flat.getElementsByClass(dynamics.Dynamic)
               if d.volumeScalar is not None]
        dyn_offsets = [o for o, _ in dyn]
        open_ties: Dict[int, int] = {}  # MIDI pitch -> index (in this part's list) of the note it extends
        part_notes: List[List[float]] = []  # [start_ql, end_ql, midi, velocity]
        for el in flat.notes:
            ql = float(el.quarterLength)
            if ql <= 0:
                continue
            start = float(el.offset)
            if max_seconds is not None and _to_seconds(start, seg) >= max_seconds:
                break  # flat.notes is sorted by offset
            if el.volume.velocity is not None:
                vel = int(el.volume.velocity)
            else:
                i = bisect.bisect_right(dyn_offsets, start) - 1
                vel = int(round(dyn[i][1] * 127)) if i >= 0 else DEFAULT_VELOCITY
            members = el.notes if el.isChord else [el]
            for m in members:
                if not hasattr(m, "pitch"):
                    continue  # unpitched percussion
                midi = int(round(m.pitch.ps))
                tie = m.tie if m.tie is not None else getattr(el, "tie", None)
                kind = tie.type if tie is not None else None
                if kind in ("continue", "stop") and midi in open_ties:
                    part_notes[open_ties[midi]][1] = start + ql
                    if kind == "stop":
                        del open_ties[midi]
                    continue
                part_notes.append([start, start + ql, midi, vel])
                if kind == "start":
                    open_ties[midi] = len(part_notes) - 1
        for s, e, midi, vel in part_notes:
            t0, t1 = _to_seconds(s, seg), _to_seconds(e, seg)
            notes.append(Note(round(t0, 6), round(t1 - t0, 6), int(midi), int(vel)))
    notes.sort()
    return notes


def transpose_notes(notes: Sequence[Note], semitones: int, low: int = 21, high: int = 108) -> List[Note]:
    """Shift every pitch by ``semitones``; a note pushed outside the piano range
    [``low``, ``high``] is moved by octaves back inside (keeps its pitch class, so the
    transposed key label stays right)."""
    out = []
    for n in notes:
        p = n.pitch + semitones
        while p < low:
            p += 12
        while p > high:
            p -= 12
        out.append(n._replace(pitch=p))
    return out
