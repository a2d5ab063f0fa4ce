"""Build the default corpus: music21 scores -> rendered audio clips + one CSV per task.

Output folder layout::

    OUT/
      corpus.json                 manifest: tasks, classes, seed, settings, pieces
      key.csv composer.csv instrument.csv pitch.csv
      audio/pieces/<composer>/<piece>/t<shift>_<timbre>_<clip>.wav        (synth)
      audio/pieces/<composer>/<piece>/t<shift>_<family>-gm<program>_<clip>.wav  (soundfont, fluidsynth)
      audio/notes/<timbre>/v<variant>/p<midi>.wav
      .cache/                     parsed scores (JSON), markers of finished units

Every random choice is drawn from a generator seeded by ``stable_hash(seed, <what>)``,
so a unit's audio does not depend on which other units are built, and the same
settings give byte-identical WAV files, CSVs and manifest.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .render import (GM_INSTRUMENTS, SAMPLE_RATE, SOUNDFONT_PITCH_RANGE, SOUNDFONT_VERSION, SYNTH_VERSION, Note,
                     RenderError, file_sha256, find_fluidsynth, find_soundfont, import_tinysoundfont,
                     instrument_set, render_fluidsynth, render_soundfont, render_synth, timbre_preset)
from .scores import (DEFAULT_BPM, DEFAULT_COMPOSERS, KEY_CLASSES, MODAL_COLLECTIONS, PITCH_CLASS_NAMES,
                     PieceInfo, candidate_order, parse_piece, transpose_key, transpose_notes)
from .tables import (SPLITS, CorpusError, assign_splits, atomic_write_bytes, atomic_write_json,
                     split_counts, stable_hash, write_task_csv)

ALL_TASKS = ("key", "composer", "instrument", "pitch")
MANIFEST_FORMAT = "mert-corpus/1"
PARSE_VERSION = 2          # bump when score_to_notes or key_of change, to invalidate cached parses
SILENCE_RMS = 0.003        # clips quieter than this (about -50 dBFS) are dropped
RENDERERS = ("auto", "synth", "soundfont", "fluidsynth")
WAV_SUBTYPES = ("PCM_16", "FLOAT")


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(stable_hash(*parts))


def resolve_renderer(renderer: str, soundfont: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(renderer, soundfont)`` actually used.

    ``auto`` means ``soundfont`` when the pip-installable parts are there (the
    tinysoundfont package, and ``soundfont`` or pretty_midi's bundled TimGM6mb.sf2),
    else the built-in ``synth``. It never picks fluidsynth, nor a soundfont found in
    the system folders: both depend on what the operating system has installed. The
    manifest records the renderer and the soundfont's sha256, so two corpora can be
    told apart."""
    if renderer not in RENDERERS:
        raise CorpusError(f"renderer must be one of {list(RENDERERS)}, got {renderer!r}")
    if renderer == "auto":
        path = find_soundfont(soundfont, system=False)
        if soundfont and path is None:
            raise RenderError(f"soundfont {soundfont!r} is not a file")
        if path is not None and import_tinysoundfont() is not None:
            return "soundfont", path
        return "synth", None
    if renderer == "soundfont":
        if import_tinysoundfont() is None:
            raise RenderError("renderer 'soundfont' was asked for but the tinysoundfont package is not installed "
                              "(pip install --no-deps tinysoundfont; its pyaudio dependency is only for playback)")
        path = find_soundfont(soundfont)
        if path is None:
            raise RenderError(f"soundfont {soundfont!r} is not a file" if soundfont else
                              "renderer 'soundfont' found no .sf2/.sf3 soundfont (install pretty_midi, which "
                              "ships TimGM6mb.sf2, or pass a soundfont path)")
        return "soundfont", path
    if renderer == "fluidsynth":
        found = find_fluidsynth(soundfont)
        if found is None:
            raise RenderError("renderer 'fluidsynth' was asked for but no fluidsynth binary + .sf2/.sf3 "
                              "soundfont was found (install e.g. apt packages fluidsynth and "
                              "timgm6mb-soundfont, or pass a soundfont path)")
        return "fluidsynth", found[1]
    return "synth", None


def render_notes(notes: Sequence[Note], timbre: str, rng: np.random.Generator, *, renderer: str,
                 soundfont: Optional[str], sample_rate: int, max_seconds: Optional[float],
                 preset: Optional[dict] = None, program: Optional[int] = None) -> np.ndarray:
    """Dispatch to the chosen renderer; ``float32 [num_samples]``. ``program`` (a GM program
    of the family ``timbre``) is for the sample-based renderers; the synth has none."""
    if renderer == "fluidsynth":
        return render_fluidsynth(notes, timbre, program=program, sample_rate=sample_rate, soundfont=soundfont,
                                 max_seconds=max_seconds)
    if renderer == "soundfont":
        return render_soundfont(notes, timbre, rng, program=program, sample_rate=sample_rate, soundfont=soundfont,
                                preset=preset, max_seconds=max_seconds)
    return render_synth(notes, timbre, rng, sample_rate=sample_rate, preset=preset, max_seconds=max_seconds)


# --------------------------------------------------------------------------- cache helpers

def _write_wav(path: Path, audio: np.ndarray, sr: int, subtype: str) -> None:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sr, subtype=subtype, format="WAV")
    atomic_write_bytes(path, buf.getvalue())


def _cached_clips(out: Path, marker: Path, names: Callable[[int], str],
                  make_clips: Callable[[], List[Optional[np.ndarray]]], sr: int, subtype: str) -> List[int]:
    """Write one rendered unit's clips to ``out / names(j)`` and return the indices ``j`` kept.

    ``make_clips()`` renders the unit and returns its clips (``None`` for a dropped clip).
    The WAV files are the cache: ``marker`` (a JSON list of kept indices, written after
    the last WAV) says the unit is complete, so a rebuild with the same settings skips
    rendering as long as the marker and all its WAVs exist.
    """
    if marker.is_file():
        try:
            kept = [int(j) for j in json.loads(marker.read_text())["clips"]]
            if all((out / names(j)).is_file() for j in kept):
                return kept
        except (ValueError, KeyError, TypeError):
            pass  # damaged marker: render again
    kept = []
    for j, clip in enumerate(make_clips()):
        if clip is not None:
            _write_wav(out / names(j), clip, sr, subtype)
            kept.append(j)
    atomic_write_json(marker, {"clips": kept})
    return kept


def _load_piece(piece: str, composer: str, cache: Path, max_seconds: float, bpm: float) -> PieceInfo:
    import music21

    key = stable_hash(PARSE_VERSION, music21.__version__, piece, max_seconds, bpm)
    path = cache / "scores" / f"{key:016x}.json"
    if path.is_file():
        try:
            return PieceInfo.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns about harmless notation quirks
        info = parse_piece(piece, composer, max_seconds=max_seconds, default_bpm=bpm)
    atomic_write_json(path, info.to_json())
    return info


# --------------------------------------------------------------------------- piece selection

def select_pieces(composers: Sequence[str], num_pieces: int, seed: int, *, cache: Path,
                  max_seconds: float, min_seconds: float, bpm: float,
                  progress: bool = True) -> Tuple[List[PieceInfo], List[dict]]:
    """Pick ``num_pieces`` pieces, taking composers in turn (each in its seeded order), so
    they are spread evenly; a composer that runs out leaves its turns to the others.

    A piece that fails to parse, is shorter than ``min_seconds`` or duplicates the music of
    an already chosen piece (same opening, see :meth:`PieceInfo.fingerprint`) is skipped
    and reported. Returns ``(pieces, skipped)``.
    """
    from ..progress import progress_bar

    candidates = {c: iter(candidate_order(c, seed)) for c in composers}
    chosen: List[PieceInfo] = []
    skipped: List[dict] = []
    seen = set()

    def next_piece(composer: str) -> Optional[PieceInfo]:
        for piece in candidates[composer]:
            try:
                info = _load_piece(piece, composer, cache, max_seconds, bpm)
            except Exception as exc:  # corrupt or exotic corpus files: skip, report, go on
                skipped.append({"piece": piece, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            if info.duration < min_seconds:
                skipped.append({"piece": piece, "reason": f"shorter than one clip ({info.duration:.1f} s)"})
            elif info.fingerprint() in seen:
                skipped.append({"piece": piece, "reason": "same music as an already chosen piece"})
            else:
                seen.add(info.fingerprint())
                return info
        return None

    active = list(composers)
    with progress_bar(total=num_pieces, desc="scores", unit="piece", disable=not progress) as bar:
        while active and len(chosen) < num_pieces:
            for composer in list(active):
                if len(chosen) >= num_pieces:
                    break
                info = next_piece(composer)
                if info is None:
                    active.remove(composer)
                else:
                    chosen.append(info)
                    bar.update(1)
    return chosen, skipped


def _balanced(items: Sequence, n: int, rng: np.random.Generator) -> list:
    """``n`` items made of back-to-back random permutations of ``items``: every item occurs
    ``n // len(items)`` or one more times, in random order."""
    out: list = []
    while len(out) < n:
        out.extend(items[i] for i in rng.permutation(len(items)))
    return out[:n]


def plan_tonics(pieces: Sequence[PieceInfo], splits: Dict[str, str], in_key_task: Dict[str, bool],
                versions: int, seed: int) -> Dict[Tuple[str, int], int]:
    """Target tonic (pitch class) of every version ``(piece, v)``.

    Key-task versions of one mode in the train split get the 12 tonics in balanced
    order; valid/test versions of that mode draw only from the tonics train has for
    it, so that no valid/test key label is missing from training (as long as train has
    a piece in that mode). Other pieces get balanced tonics of their own.
    """
    plan: Dict[Tuple[str, int], int] = {}

    def deal(units, pool, *what):
        for unit, tonic in zip(units, _balanced(pool, len(units), rng_for(seed, "tonics", *what))):
            plan[unit] = tonic

    deal([(p.piece, v) for p in pieces if not in_key_task[p.piece] for v in range(versions)],
         list(range(12)), "other")
    for mode in ("major", "minor"):
        group = [p for p in pieces if in_key_task[p.piece] and p.key.endswith(mode)]
        units = {s: [(p.piece, v) for p in group if splits[p.piece] == s for v in range(versions)]
                 for s in ("train", "valid", "test")}
        deal(units["train"], list(range(12)), mode, "train")
        seen = sorted({plan[u] for u in units["train"]}) or list(range(12))
        for split in ("valid", "test"):
            deal(units[split], seen, mode, split)
    return plan


def split_programs(families: Sequence[str], seed: int,
                   fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> Dict[str, Dict[str, List[int]]]:
    """``{family: {split: [GM programs]}}`` for the sample-based renderers.

    Every family's programs (:data:`~.render.GM_INSTRUMENTS`) are split like pieces
    (:func:`~.tables.assign_splits` over ``"<family>/gm<program>"``, one stratum per
    family): with 4-7 programs and the default fractions, 1 valid, 1 test and the rest train
    (the demo's 60/15/25 gives 6- and 7-program families 2 test programs). A program
    is in one split only, for the pitch task and the piece tasks alike, so valid and
    test clips are played by instruments never heard in training. Each list follows
    the family's own program order."""
    out: Dict[str, Dict[str, List[int]]] = {}
    for family in families:
        programs = GM_INSTRUMENTS[family].programs
        groups = {f"{family}/gm{p}": p for p in programs}
        splits = assign_splits(groups, seed, fractions)
        out[family] = {s: [p for g, p in groups.items() if splits[g] == s] for s in SPLITS}
    return out


def note_programs(by_split: Dict[str, List[int]], n: int) -> List[int]:
    """The first ``n`` programs of a family for the pitch task, taken from its splits in
    turn (train, test, valid, train, ...), so that 2 programs give a train and a test
    one, 3 programs all three splits, and all of them the whole family."""
    queues = [list(by_split[s]) for s in ("train", "test", "valid")]
    order: List[int] = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order[:n]


def _slug(piece: str) -> str:
    """``"mozart/k155/movement1.mxl" -> "k155_movement1"`` (file-system safe)."""
    stem = piece.split("/", 1)[-1].rsplit(".", 1)[0]
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in stem)


# --------------------------------------------------------------------------- the builder

def build_corpus(out_dir, *, num_pieces: int = 20, composers: Sequence[str] = DEFAULT_COMPOSERS,
                 versions_per_piece: int = 2, max_piece_seconds: float = 30.0, clip_seconds: float = 5.0,
                 seed: int = 0, renderer: str = "auto", soundfont: Optional[str] = None,
                 timbres: Optional[Sequence[str]] = None, tasks: Sequence[str] = ALL_TASKS,
                 transpose: bool = True, note_variants: int = 4, pitch_range: Tuple[int, int] = (48, 72),
                 note_seconds: float = 2.0, sample_rate: int = SAMPLE_RATE, wav_subtype: str = "PCM_16",
                 split_fractions: Sequence[float] = (0.7, 0.15, 0.15), key_min_correlation: float = 0.75,
                 default_bpm: float = DEFAULT_BPM, progress: bool = True) -> dict:
    """Render the default corpus into ``out_dir`` and return the manifest (also written
    to ``out_dir/corpus.json``).

    Piece tasks (``key``, ``composer``, ``instrument``) share the same clips: each of
    ``num_pieces`` scores is rendered ``versions_per_piece`` times (each version with
    its own transposition and timbre, drawn so that tonics and timbres are balanced),
    cut after ``max_piece_seconds`` and split into ``clip_seconds`` clips. The ``pitch``
    task renders isolated notes over ``pitch_range`` (inclusive MIDI numbers) for
    ``note_variants`` random presets of every timbre, ``note_seconds`` long.

    Splits: pieces are split per composer (:func:`~.tables.assign_splits`), so all
    clips and versions of a piece share a split; note presets are split per timbre by
    ``stable_hash(seed, "<timbre>/v<variant>")``, so a preset's notes all share a split
    and test presets are never heard in training.

    With the sample-based renderers (``soundfont``, ``fluidsynth``) a timbre is a family
    of GM programs, split by program (:func:`split_programs`), as NSynth keeps test
    instruments out of training: a note preset is one program (``note_variants`` is
    then the number of programs per family, at most the family's, see
    :func:`note_programs`) and takes that program's split; a version of a piece plays a
    program of its family from the piece's split, dealt in balanced order.
    """
    from ..progress import progress_bar

    tasks = tuple(tasks)
    _validate(tasks, composers, num_pieces, versions_per_piece, max_piece_seconds, clip_seconds,
              note_variants, pitch_range, note_seconds, sample_rate, wav_subtype)
    asked = renderer
    renderer, soundfont = resolve_renderer(renderer, soundfont)
    instruments = instrument_set(renderer)
    timbres = tuple(timbres) if timbres else tuple(instruments)
    bad = [t for t in timbres if t not in instruments]
    if bad:
        picked = f" ('{asked}' picked it here)" if asked == "auto" else ""
        raise CorpusError(f"unknown instrument(s) {bad} for renderer '{renderer}'{picked}; choose from "
                          f"{list(instruments)}" + ("" if renderer == "synth" else
                                                    ", or pass --renderer synth for the synth's timbres"))
    soundfont_sha256 = file_sha256(soundfont) if soundfont else None
    sampled = renderer != "synth"  # timbres are GM program families, split by program
    programs = split_programs(timbres, seed, split_fractions) if sampled else {}
    # What the audio depends on besides the settings: cached units of another renderer,
    # renderer version or soundfont file are never reused.
    render_id = (renderer, SYNTH_VERSION if renderer == "synth" else SOUNDFONT_VERSION, soundfont_sha256)
    out = Path(out_dir)
    cache = out / ".cache"
    sr = sample_rate
    render_kw = dict(renderer=renderer, soundfont=soundfont, sample_rate=sr)
    rows: Dict[str, List[dict]] = {t: [] for t in tasks}
    manifest_pieces: List[dict] = []
    skipped: List[dict] = []

    # ---- polyphonic pieces: key / composer / instrument
    if any(t in tasks for t in ("key", "composer", "instrument")):
        pieces, skipped = select_pieces(composers, num_pieces, seed, cache=cache, max_seconds=max_piece_seconds,
                                        min_seconds=clip_seconds, bpm=default_bpm, progress=progress)
        if not pieces:
            raise CorpusError("no usable pieces: every candidate failed to parse or was too short")
        splits = assign_splits([p.piece for p in pieces], seed, split_fractions,
                               strata={p.piece: p.composer for p in pieces})
        n_units = len(pieces) * versions_per_piece
        in_key_task = {p.piece: "key" in tasks and p.key_correlation >= key_min_correlation
                       and p.composer not in MODAL_COLLECTIONS for p in pieces}
        tonics = plan_tonics(pieces, splits, in_key_task, versions_per_piece, seed)
        unit_timbres = _balanced(list(timbres), n_units, rng_for(seed, "timbres"))
        unit_programs = _plan_unit_programs(pieces, splits, unit_timbres, versions_per_piece, programs, seed,
                                            split_fractions) if sampled else {}
        n_clip = int(round(clip_seconds * sr))
        bar = progress_bar(total=n_units, desc="render pieces", unit="version", disable=not progress)
        for i, info in enumerate(pieces):
            entry = {"piece": info.piece, "composer": info.composer, "split": splits[info.piece],
                     "key": info.key, "key_correlation": round(info.key_correlation, 4),
                     "seconds": round(min(info.duration, max_piece_seconds), 3), "versions": []}
            tonic, _mode = info.key.split(" ")
            for v in range(versions_per_piece):
                u = i * versions_per_piece + v
                target = tonics[info.piece, v]
                shift = ((target - PITCH_CLASS_NAMES.index(tonic) + 6) % 12) - 6 if transpose else 0
                timbre = unit_timbres[u]
                program = unit_programs.get(u)
                key = transpose_key(info.key, shift)
                voice = timbre if program is None else f"{timbre}-gm{program}"
                stem = f"audio/pieces/{info.composer}/{_slug(info.piece)}/t{shift:+d}_{voice}"
                unit_key = stable_hash(*render_id, PARSE_VERSION, soundfont, sr, max_piece_seconds,
                                       default_bpm, clip_seconds, wav_subtype, seed, info.piece, v, shift, timbre,
                                       *(() if program is None else (program,)))

                def make_clips(info=info, shift=shift, timbre=timbre, v=v, program=program):
                    audio = render_notes(transpose_notes(info.notes, shift), timbre,
                                         rng_for(seed, "unit", info.piece, v), max_seconds=max_piece_seconds,
                                         program=program, **render_kw)
                    clips = [audio[j * n_clip:(j + 1) * n_clip] for j in range(len(audio) // n_clip)]
                    # Drop near-silent clips (long rests): they carry no label information.
                    return [c if np.sqrt(np.mean(c.astype(np.float64) ** 2)) >= SILENCE_RMS else None
                            for c in clips]

                kept = _cached_clips(out, cache / "units" / f"{unit_key:016x}.json",
                                     lambda j, stem=stem: f"{stem}_{j:02d}.wav", make_clips, sr, wav_subtype)
                for j in kept:
                    common = {"path": f"{stem}_{j:02d}.wav", "split": splits[info.piece], "piece": info.piece,
                              "composer": info.composer, "timbre": timbre, "transpose": shift,
                              "key": key, "start_s": round(j * clip_seconds, 3),
                              **({} if program is None else {"program": program})}
                    if in_key_task[info.piece]:
                        rows["key"].append({**common, "label": key,
                                            "key_correlation": round(info.key_correlation, 4)})
                    if "composer" in tasks:
                        rows["composer"].append({**common, "label": info.composer})
                    if "instrument" in tasks:
                        rows["instrument"].append({**common, "label": timbre})
                entry["versions"].append({"transpose": shift, "timbre": timbre,
                                          **({} if program is None else {"program": program}),
                                          "key": key, "clips": len(kept)})
                bar.update(1)
            manifest_pieces.append(entry)
        bar.close()

    # ---- isolated notes: pitch
    note_presets: List[dict] = []
    if "pitch" in tasks:
        pitches = list(range(pitch_range[0], pitch_range[1] + 1))
        group_programs: Dict[str, int] = {}
        if sampled:
            _check_note_programs(timbres, note_variants, pitch_range)
            for t in timbres:
                for v, p in enumerate(note_programs(programs[t], note_variants)):
                    group_programs[f"{t}/v{v}"] = p
            groups = {g: g.split("/")[0] for g in group_programs}
            split_of = {p: s for t in timbres for s, ps in programs[t].items() for p in ps}
            note_splits = {g: split_of[p] for g, p in group_programs.items()}
        else:
            groups = {f"{t}/v{v}": t for t in timbres for v in range(note_variants)}
            note_splits = assign_splits(groups, seed, split_fractions, strata=groups)
        n_note = int(round(note_seconds * sr))
        hold = 0.75 * note_seconds  # key down for 3/4 of the clip, then the release rings out
        bar = progress_bar(total=len(groups), desc="render notes", unit="preset", disable=not progress)
        for group, timbre in groups.items():
            prng = rng_for(seed, "note-preset", group)
            preset, velocity = timbre_preset(prng), int(prng.integers(50, 121))
            program = group_programs.get(group)
            unit_key = stable_hash(*render_id, soundfont, sr, note_seconds, wav_subtype, seed,
                                   group, pitch_range[0], pitch_range[1], *(() if program is None else (program,)))

            def make_notes(group=group, timbre=timbre, preset=preset, velocity=velocity, program=program):
                clips = []
                for p in pitches:
                    y = render_notes([Note(0.0, hold, p, velocity)], timbre, rng_for(seed, "note", group, p),
                                     max_seconds=note_seconds, preset=preset, program=program, **render_kw)
                    clips.append(np.pad(y[:n_note], (0, max(0, n_note - len(y)))))  # exactly note_seconds
                return clips

            kept = _cached_clips(out, cache / "units" / f"{unit_key:016x}.json",
                                 lambda k, group=group: f"audio/notes/{group}/p{pitches[k]:03d}.wav",
                                 make_notes, sr, wav_subtype)
            with_program = {} if program is None else {"program": program}
            for k in kept:
                rows["pitch"].append({"path": f"audio/notes/{group}/p{pitches[k]:03d}.wav", "label": str(pitches[k]),
                                      "split": note_splits[group], "piece": group, "timbre": timbre,
                                      "velocity": velocity, **with_program})
            note_presets.append({"preset": group, "timbre": timbre, **with_program, "split": note_splits[group],
                                 "velocity": velocity, **{k: round(v, 4) for k, v in preset.items()}})
            bar.update(1)
        bar.close()

    # ---- tables + manifest
    classes = {"key": list(KEY_CLASSES), "composer": list(dict.fromkeys(p["composer"] for p in manifest_pieces)),
               "instrument": list(timbres),
               "pitch": [str(p) for p in range(pitch_range[0], pitch_range[1] + 1)]}
    descriptions = {
        "key": f"global key of the piece (music21 key profiles + first/last bass note, see scores.key_of), "
               f"transposed with the audio; modal collections {list(MODAL_COLLECTIONS)} and pieces whose key "
               f"correlation is below {key_min_correlation} are left out",
        "composer": "composer (music21 corpus folder) of the piece",
        "instrument": ("synth timbre the whole piece was rendered with" if renderer == "synth" else
                       "instrument family (General MIDI programs that make sound the same way) the whole piece "
                       "was rendered with; the GM program is in the 'program' column, and valid/test versions "
                       "play programs never heard in training"),
        "pitch": "MIDI pitch of an isolated note (NSynth-like)",
    }
    manifest_tasks = {}
    for t in tasks:
        if not rows[t]:
            raise CorpusError(f"task {t!r} got no clips (pieces too short; for 'key': only modal composers, "
                              f"or all below key_min_correlation?)")
        write_task_csv(out / f"{t}.csv", rows[t])
        manifest_tasks[t] = {"csv": f"{t}.csv", "type": "multiclass", "metric": "accuracy",
                             "classes": classes[t], "description": descriptions[t],
                             "num_clips": split_counts([r["split"] for r in rows[t]])}
    cut = "/".join(f"{100 * f / sum(split_fractions):g}" for f in split_fractions)
    pieces_rule = (f"pieces: per composer, ordered by sha256(seed, piece), cut {cut} (at least one valid and "
                   "one test piece per composer with >= 3 pieces)")
    split_rule = pieces_rule + ("; GM programs: the same rule over '<family>/gm<program>', per family (corpus.json's "
                                "'programs' lists each split's); a version of a piece plays a program of its family "
                                "from the piece's split; a note preset is one program and has its split" if sampled
                                else "; notes: the same rule over '<timbre>/v<variant>' presets, per timbre")
    manifest = {
        "format": MANIFEST_FORMAT,
        "sample_rate": sr,
        "clip_seconds": clip_seconds,
        "seed": seed,
        "renderer": renderer,
        "soundfont": soundfont,
        "soundfont_sha256": soundfont_sha256,
        "tasks": manifest_tasks,
        "timbres": {t: instruments[t] for t in timbres},
        **({"programs": programs} if sampled else {}),
        "settings": {"num_pieces": num_pieces, "composers": list(composers), "versions_per_piece": versions_per_piece,
                     "max_piece_seconds": max_piece_seconds, "transpose": transpose,
                     "note_variants": note_variants, "pitch_range": list(pitch_range), "note_seconds": note_seconds,
                     "wav_subtype": wav_subtype, "split_fractions": list(split_fractions),
                     "key_min_correlation": key_min_correlation, "default_bpm": default_bpm,
                     "synth_version": SYNTH_VERSION, "soundfont_version": SOUNDFONT_VERSION,
                     "tinysoundfont_version": _package_version("tinysoundfont") if renderer == "soundfont" else None},
        "pieces": manifest_pieces,
        "note_presets": note_presets,
        "skipped_pieces": skipped,
        "split_rule": split_rule,
    }
    atomic_write_json(out / "corpus.json", manifest)
    return manifest


def _plan_unit_programs(pieces: Sequence[PieceInfo], splits: Dict[str, str], unit_timbres: Sequence[str],
                        versions: int, programs: Dict[str, Dict[str, List[int]]], seed: int,
                        fractions: Sequence[float]) -> Dict[int, int]:
    """GM program of every version ``u`` (index ``piece * versions + v``): the versions of
    one family in one split get that family's programs of that split, in balanced order."""
    units: Dict[Tuple[str, str], List[int]] = {}
    for i, info in enumerate(pieces):
        for v in range(versions):
            u = i * versions + v
            units.setdefault((unit_timbres[u], splits[info.piece]), []).append(u)
    plan: Dict[int, int] = {}
    for (family, split), us in sorted(units.items()):
        pool = programs[family][split]
        if not pool:
            raise CorpusError(f"the {family} family has no GM program in the {split} split, but {split} pieces "
                              f"need one (split fractions {list(fractions)} leave its "
                              f"{len(GM_INSTRUMENTS[family].programs)} programs none there)")
        for u, p in zip(us, _balanced(pool, len(us), rng_for(seed, "programs", family, split))):
            plan[u] = p
    return plan


def _check_note_programs(timbres: Sequence[str], note_variants: int, pitch_range: Tuple[int, int]) -> None:
    """Warn when the pitch task asks for more programs than a family has (it gets them all),
    or for pitches outside the range the programs were checked over."""
    short = {t: len(GM_INSTRUMENTS[t].programs) for t in timbres if len(GM_INSTRUMENTS[t].programs) < note_variants}
    if short:
        warnings.warn(f"note_variants={note_variants}: with a sample-based renderer a note preset is one GM "
                      f"program, and these families have fewer: {short}; the pitch task uses all of their "
                      f"programs instead", stacklevel=3)
    lo, hi = SOUNDFONT_PITCH_RANGE
    if pitch_range[0] < lo or pitch_range[1] > hi:
        warnings.warn(f"pitch_range {tuple(pitch_range)} goes beyond MIDI {lo}-{hi}, where every GM program "
                      f"of TimGM6mb was checked to sound at its label; outside it some notes of some programs sound an "
                      f"octave off or out of tune (docs/CORPUS_AND_PROBING.md §1.3)", stacklevel=3)


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _validate(tasks, composers, num_pieces, versions, max_s, clip_s, note_variants, pitch_range,
              note_s, sr, subtype) -> None:
    bad = [t for t in tasks if t not in ALL_TASKS]
    if bad or not tasks:
        raise CorpusError(f"unknown task(s) {bad or tasks}; choose from {list(ALL_TASKS)}")
    if not composers:
        raise CorpusError("at least one composer is needed")
    checks = [
        (num_pieces >= 1, f"num_pieces must be >= 1, got {num_pieces}"),
        (versions >= 1, f"versions_per_piece must be >= 1, got {versions}"),
        (clip_s > 0 and math.isfinite(clip_s), f"clip_seconds must be > 0, got {clip_s}"),
        (max_s >= clip_s, f"max_piece_seconds ({max_s}) must be >= clip_seconds ({clip_s})"),
        (note_variants >= 1, f"note_variants must be >= 1, got {note_variants}"),
        (21 <= pitch_range[0] <= pitch_range[1] <= 108,
         f"pitch_range must be within the piano range 21 <= low <= high <= 108, got {tuple(pitch_range)}"),
        (note_s > 0, f"note_seconds must be > 0, got {note_s}"),
        (8000 <= sr <= 96000, f"sample_rate {sr} is out of range (MERT expects 24000)"),
        (subtype in WAV_SUBTYPES, f"wav_subtype must be one of {list(WAV_SUBTYPES)}, got {subtype!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CorpusError(msg)
