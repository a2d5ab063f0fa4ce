"""Tests of the embedded corpus: rendering, labels, splits, caching, CLI, user folders.

The label checks are independent of the code under test: pitch labels are compared
with an f0 estimated from the audio (YIN), key labels with music21's own
transposition, note timing with a hand-built score.
"""
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mert_plugin.corpus import build_corpus, read_task_csv
from mert_plugin.corpus.cli import main as corpus_main
from mert_plugin.corpus.render import (GM_INSTRUMENTS, GM_PROGRAMS, SOUNDFONT_PITCH_RANGE, TIMBRES, Note,
                                       bundled_soundfont, find_fluidsynth, import_tinysoundfont, notes_to_midi,
                                       render_synth)
from mert_plugin.corpus.scores import KEY_CLASSES, key_of, score_to_notes, transpose_key
from mert_plugin.corpus.tables import CorpusError, assign_splits
from mert_plugin.corpus.userdata import import_folder

torch.set_num_threads(1)
SR = 24000


def yin_f0(x: np.ndarray, sr: int, fmin: float = 50.0, fmax: float = 3000.0, threshold: float = 0.1) -> float:
    """Plain YIN (de Cheveigné & Kawahara 2002) over one analysis window, with parabolic
    interpolation; written here so the test does not reuse the synthesiser's own maths."""
    x = x.astype(np.float64) - x.mean()
    w = len(x) // 2
    taus = np.arange(1, int(sr / fmin) + 2)
    d = np.array([np.sum((x[:w] - x[t:t + w]) ** 2) for t in taus])
    cmnd = d * taus / np.maximum(np.cumsum(d), 1e-12)
    lo = int(sr / fmax)
    below = np.flatnonzero(cmnd[lo:] < threshold)
    i = lo + (below[0] if len(below) else int(np.argmin(cmnd[lo:])))
    while i + 1 < len(cmnd) and cmnd[i + 1] < cmnd[i]:
        i += 1
    a, b, c = cmnd[i - 1], cmnd[i], cmnd[i + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return sr / (taus[i] + shift)


def cents(f: float, midi: int) -> float:
    return 1200 * np.log2(f / (440.0 * 2 ** ((midi - 69) / 12)))


def tree_digest(root: Path) -> dict:
    """sha256 of every file under root except the cache, keyed by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


# The synth explicitly: `auto` picks the soundfont renderer where tinysoundfont is installed.
SMALL = dict(num_pieces=3, composers=("bach", "mozart"), versions_per_piece=2, max_piece_seconds=6.0,
             clip_seconds=2.0, note_variants=3, pitch_range=(57, 60), note_seconds=0.5, progress=False,
             renderer="synth")
HAS_SOUNDFONT = import_tinysoundfont() is not None and bundled_soundfont() is not None
needs_soundfont = pytest.mark.skipif(not HAS_SOUNDFONT, reason="tinysoundfont or pretty_midi's TimGM6mb.sf2 "
                                                               "not installed")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(out, seed=0, **SMALL)
    return out, manifest


# --------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("timbre", sorted(TIMBRES))
def test_render_is_deterministic_per_seed(timbre):
    notes = [Note(0.0, 0.3, 60, 90), Note(0.2, 0.3, 64, 70), Note(0.4, 0.2, 67, 100)]
    a = render_synth(notes, timbre, np.random.default_rng(1))
    b = render_synth(notes, timbre, np.random.default_rng(1))
    c = render_synth(notes, timbre, np.random.default_rng(2))
    assert a.dtype == np.float32 and a.ndim == 1 and np.all(np.isfinite(a))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert 0.5 < np.max(np.abs(a)) <= 1.0  # peak-normalised, not clipped


@pytest.mark.parametrize("timbre", sorted(TIMBRES))
@pytest.mark.parametrize("midi", [40, 57, 69, 81, 88, 95])
def test_rendered_note_has_the_pitch_of_its_midi_number(timbre, midi):
    y = render_synth([Note(0.0, 0.6, midi, 100)], timbre, np.random.default_rng(midi), reverb=False)
    f0 = yin_f0(y[int(0.06 * SR):int(0.06 * SR) + 3000], SR)  # early: high plucks decay fast
    assert abs(cents(f0, midi)) < 25, f"{timbre} {midi}: f0 {f0:.1f} Hz"


def test_notes_start_and_stop_where_the_events_say():
    y = render_synth([Note(0.5, 0.4, 69, 100)], "organ", np.random.default_rng(0), reverb=False)
    env = np.abs(y)
    assert env[: int(0.49 * SR)].max() == 0.0                 # silent before the onset
    assert env[int(0.55 * SR):int(0.85 * SR)].max() > 0.3      # sounding while held
    assert len(y) < int(1.1 * SR)                              # short release tail only


def test_midi_writer_round_trips_through_music21():
    from music21 import midi

    notes = [Note(0.0, 0.5, 60, 80), Note(0.5, 0.25, 64, 100), Note(1.0, 1.0, 67, 60)]
    mf = midi.MidiFile()
    mf.readstr(notes_to_midi(notes, program=19))
    s = midi.translate.midiFileToStream(mf)
    got = sorted((float(n.offset), float(n.quarterLength), n.pitch.midi) for n in s.flatten().notes)
    # 120 bpm: one quarter = 0.5 s
    assert got == [(0.0, 1.0, 60), (1.0, 0.5, 64), (2.0, 2.0, 67)]


@pytest.mark.skipif(find_fluidsynth() is None, reason="fluidsynth binary or GM soundfont not installed")
def test_fluidsynth_renderer_gives_audio_at_the_corpus_rate():
    from mert_plugin.corpus.render import render_fluidsynth

    y = render_fluidsynth([Note(0.0, 0.5, 69, 100)], "piano", max_seconds=1.0)
    assert y.dtype == np.float32 and 0 < len(y) <= SR and np.max(np.abs(y)) > 0.1


# --------------------------------------------------------------------------- soundfont renderer

def band_spectrum_db(y: np.ndarray, start_s: float = 0.1, seconds: float = 0.5) -> np.ndarray:
    """Share of energy (dB) in third-octave bands from 100 Hz to 12.8 kHz of one excerpt."""
    seg = y[int(start_s * SR):int((start_s + seconds) * SR)].astype(np.float64)
    power = np.abs(np.fft.rfft(seg * np.hanning(len(seg)))) ** 2
    f = np.fft.rfftfreq(len(seg), 1 / SR)
    edges = 100.0 * 2 ** np.arange(0, 7.01, 1 / 3)
    bands = np.array([power[(f >= lo) & (f < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    return 10 * np.log10(bands / bands.sum() + 1e-12)


@needs_soundfont
@pytest.mark.parametrize("instrument", list(GM_INSTRUMENTS))
def test_soundfont_render_is_audible_and_deterministic(instrument):
    from mert_plugin.corpus.render import _TSF_SYNTHS, render_soundfont

    notes = [Note(0.0, 0.4, 55, 90), Note(0.3, 0.5, 62, 70), Note(0.6, 0.3, 71, 110)]
    a = render_soundfont(notes, instrument, np.random.default_rng(1))
    b = render_soundfont(notes, instrument, np.random.default_rng(1))
    c = render_soundfont(notes, instrument, np.random.default_rng(2))
    assert a.dtype == np.float32 and a.ndim == 1 and np.all(np.isfinite(a))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.max(np.abs(a)) == pytest.approx(0.9, abs=1e-3)  # peak-normalised
    assert np.sqrt(np.mean(a[: int(0.9 * SR)].astype(np.float64) ** 2)) > 0.05  # sounding, not silence
    # The cached synth is reused between renders: the result must equal a fresh synth's,
    # also after a render that was cut while notes were still sounding.
    render_soundfont([Note(0.0, 5.0, 40, 127), Note(0.0, 5.0, 84, 127)], "strings", np.random.default_rng(0),
                     max_seconds=0.5)
    after_cut = render_soundfont(notes, instrument, np.random.default_rng(1))
    _TSF_SYNTHS.clear()
    fresh = render_soundfont(notes, instrument, np.random.default_rng(1))
    assert np.array_equal(a, after_cut) and np.array_equal(a, fresh)


ALL_PROGRAMS = [(family, program) for family, i in GM_INSTRUMENTS.items() for program in i.programs]


def test_gm_families_have_several_programs_each_in_one_family():
    assert all(len(i.programs) >= 3 for i in GM_INSTRUMENTS.values())
    programs = [p for _, p in ALL_PROGRAMS]
    assert len(programs) == len(set(programs)) and set(programs) == set(GM_PROGRAMS)
    assert not set(programs) & set(range(16, 20))  # no organ: TimGM6mb's sound an octave low


def sf2_preset_samples(path: str) -> dict:
    """``{bank-0 program: set of sample indices}`` of a SoundFont 2 file, read from its
    RIFF 'pdta' lists: preset headers -> preset zones' instrument generators (41) ->
    instrument zones' sampleID generators (53). Written for the test from the SF2 2.04
    layout, so that the program choice is checked against the file, not against itself."""
    import struct

    data = Path(path).read_bytes()
    pdta = {}

    def chunks(off, end):
        while off < end:
            cid, size = data[off:off + 4], struct.unpack("<I", data[off + 4:off + 8])[0]
            yield cid, off + 8, size
            off += 8 + size + (size & 1)

    for cid, off, size in chunks(12, len(data)):
        if cid == b"LIST" and data[off:off + 4] == b"pdta":
            pdta = {c.decode(): data[o:o + n] for c, o, n in chunks(off + 4, off + size)}

    def records(name, fmt):
        n, raw = struct.calcsize(fmt), pdta[name]
        return [struct.unpack(fmt, raw[i:i + n]) for i in range(0, len(raw), n)]

    phdr, pbag, pgen = records("phdr", "<20sHHHIII"), records("pbag", "<HH"), records("pgen", "<HH")
    inst, ibag, igen = records("inst", "<20sH"), records("ibag", "<HH"), records("igen", "<HH")

    def generated(bags, gens, first, last, oper):
        return {gens[g][1] for b in range(first, last) for g in range(bags[b][0], bags[b + 1][0])
                if gens[g][0] == oper}

    out = {}
    for k in range(len(phdr) - 1):  # the last header is the terminal 'EOP'
        _, program, bank, first_bag = phdr[k][:4]
        if bank == 0:
            instruments = generated(pbag, pgen, first_bag, phdr[k + 1][3], 41)
            out[program] = set().union(*(generated(ibag, igen, inst[i][1], inst[i + 1][1], 53)
                                         for i in instruments))
    return out


@needs_soundfont
def test_no_program_replays_another_programs_samples():
    """A held-out program must be a new set of samples: in TimGM6mb electric grand (2)
    holds all nine samples of acoustic grand (0), so they cannot both be in the corpus."""
    samples = sf2_preset_samples(bundled_soundfont())
    assert samples[0] <= samples[2]  # the parser sees the known overlap
    used = [p for _, p in ALL_PROGRAMS]
    for a in used:
        assert samples[a], f"program {a} has no samples"
        for b in used:
            if a != b:
                shared = len(samples[a] & samples[b])
                assert shared < 0.5 * len(samples[a]), f"program {a} shares {shared} of {len(samples[a])} samples with {b}"


@needs_soundfont
@pytest.mark.parametrize("family, program", ALL_PROGRAMS)
def test_soundfont_program_sounds_at_its_midi_number(family, program):
    """Every program the corpus plays, at every pitch of SOUNDFONT_PITCH_RANGE (which holds the
    default pitch range 48-72; build_corpus warns beyond it): YIN f0 within 50 cents, early and
    late in the note (a sample an octave off, like TimGM6mb's organs, fails)."""
    from mert_plugin.corpus.render import render_soundfont

    lo, hi = SOUNDFONT_PITCH_RANGE
    assert lo <= 48 and 72 <= hi
    for midi in range(lo, hi + 1):
        y = render_soundfont([Note(0.0, 0.9, midi, 90)], family, np.random.default_rng(midi), program=program,
                             max_seconds=1.2)
        assert len(y) == int(1.2 * SR)
        for start in (0.15, 0.6):
            f0 = yin_f0(y[int(start * SR):int(start * SR) + 3000], SR)
            assert abs(cents(f0, midi)) < 50, f"{family} program {program} MIDI {midi} at {start} s: {f0:.1f} Hz"


@needs_soundfont
def test_soundfont_programs_of_a_family_differ_and_others_are_refused():
    from mert_plugin.corpus import RenderError
    from mert_plugin.corpus.render import render_soundfont

    notes = [Note(0.0, 0.5, 60, 90)]
    ys = [render_soundfont(notes, "reed", np.random.default_rng(0), program=p) for p in GM_INSTRUMENTS["reed"].programs]
    assert np.array_equal(ys[0], render_soundfont(notes, "reed", np.random.default_rng(0)))  # the reference one
    assert all(not np.array_equal(a, b) for i, a in enumerate(ys) for b in ys[i + 1:])
    with pytest.raises(RenderError, match="not one of the reed family"):
        render_soundfont(notes, "reed", np.random.default_rng(0), program=0)


@needs_soundfont
def test_soundfont_programs_sound_different():
    from mert_plugin.corpus.render import render_soundfont

    for midi in (55, 67):
        spectra = {i: band_spectrum_db(render_soundfont([Note(0.0, 1.0, midi, 90)], i, np.random.default_rng(0),
                                                        reverb=False))
                   for i in GM_INSTRUMENTS}
        names = list(spectra)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                # measured: at least 9 dB RMS between third-octave spectra of any two programs
                dist = np.sqrt(np.mean((spectra[a] - spectra[b]) ** 2))
                assert dist > 4.0, f"{a} and {b} at MIDI {midi}: only {dist:.1f} dB apart"


@needs_soundfont
def test_soundfont_note_presets_differ():
    from mert_plugin.corpus.render import render_soundfont

    ys = [render_soundfont([Note(0.0, 1.5, 60, v)], "piano", np.random.default_rng(k), max_seconds=2.0)
          for k, v in ((1, 70), (2, 110))]
    # spectral tilt and room differ between presets, so their spectra do
    assert np.sqrt(np.mean((band_spectrum_db(ys[0]) - band_spectrum_db(ys[1])) ** 2)) > 0.5


def test_auto_falls_back_to_the_synth_without_tinysoundfont(monkeypatch, tmp_path):
    import sys

    from mert_plugin.corpus import RenderError, resolve_renderer

    monkeypatch.setitem(sys.modules, "tinysoundfont", None)  # makes `import tinysoundfont` raise ImportError
    assert import_tinysoundfont() is None
    assert resolve_renderer("auto") == ("synth", None)
    with pytest.raises(RenderError, match="tinysoundfont"):
        resolve_renderer("soundfont")
    m = build_corpus(tmp_path / "c", tasks=("pitch",), timbres=("flute", "pluck"), note_variants=3,
                     pitch_range=(60, 60), note_seconds=0.3, progress=False)
    assert m["renderer"] == "synth" and m["soundfont"] is None and m["soundfont_sha256"] is None
    assert m["tasks"]["pitch"]["num_clips"]["train"] > 0


@pytest.fixture(scope="module")
def soundfont_corpus(tmp_path_factory):
    if not HAS_SOUNDFONT:
        pytest.skip("tinysoundfont or pretty_midi's TimGM6mb.sf2 not installed")
    out = tmp_path_factory.mktemp("sf_corpus")
    return out, build_corpus(out, seed=0, **{**SMALL, "renderer": "auto"})


def test_soundfont_corpus_manifest_labels_and_pitches(soundfont_corpus):
    out, m = soundfont_corpus
    sf2 = bundled_soundfont()
    assert m["renderer"] == "soundfont" and m["soundfont"] == sf2
    assert m["soundfont_sha256"] == hashlib.sha256(Path(sf2).read_bytes()).hexdigest()
    assert m["settings"]["tinysoundfont_version"]
    assert "cut 70/15/15" in m["split_rule"]  # SMALL's (default) fractions, as percentages
    assert m["tasks"]["instrument"]["classes"] == list(GM_INSTRUMENTS) == list(m["timbres"])
    instruments = read_task_csv(out / "instrument.csv")
    assert {label for (label,) in instruments.labels} <= set(GM_INSTRUMENTS)
    for rel in instruments.paths[:4]:
        y, sr = sf.read(out / rel)
        assert sr == SR and len(y) == int(SMALL["clip_seconds"] * SR) and np.max(np.abs(y)) > 0.1
    pitch = read_task_csv(out / "pitch.csv")
    assert len(pitch) == len(GM_INSTRUMENTS) * SMALL["note_variants"] * 4
    for rel, (label,) in zip(pitch.paths, pitch.labels):
        y, _ = sf.read(out / rel)
        assert len(y) == int(SMALL["note_seconds"] * SR)
        assert abs(cents(yin_f0(y[int(0.1 * SR):int(0.1 * SR) + 3000], SR), int(label))) < 50, rel


def test_soundfont_corpus_is_byte_identical_for_a_seed(soundfont_corpus, tmp_path):
    out, _ = soundfont_corpus
    build_corpus(tmp_path / "again", seed=0, **{**SMALL, "renderer": "soundfont"})  # = what auto picked
    assert tree_digest(tmp_path / "again") == tree_digest(out)


def test_program_splits_keep_valid_and_test_programs_out_of_training():
    from mert_plugin.corpus.build import note_programs, split_programs

    for seed in range(20):
        plan = split_programs(list(GM_INSTRUMENTS), seed)
        for family, by_split in plan.items():
            programs = [p for s in ("train", "valid", "test") for p in by_split[s]]
            assert sorted(programs) == sorted(GM_INSTRUMENTS[family].programs)  # each in exactly one split
            # 70/15/15 of 4-7 programs: round(0.15 n) = 1 valid and 1 test, the rest (2-5) train
            assert [len(by_split[s]) for s in ("train", "valid", "test")] == [len(programs) - 2, 1, 1]
            assert note_programs(by_split, 1) == by_split["train"][:1]
            assert {s for s, ps in by_split.items() for p in note_programs(by_split, 2) if p in ps} == {"train", "test"}
            assert sorted(note_programs(by_split, 9)) == sorted(programs)
    assert split_programs(["piano"], 0) == split_programs(["piano"], 0)
    # the demo's 60/15/25: round(0.25 n) test programs, i.e. 2 for the 6- and 7-program families
    for seed in range(5):
        demo_plan = split_programs(list(GM_INSTRUMENTS), seed, (0.6, 0.15, 0.25))
        assert {f: len(s["test"]) for f, s in demo_plan.items()} == {
            f: 2 if len(i.programs) >= 6 else 1 for f, i in GM_INSTRUMENTS.items()}
    assert len({str(split_programs(["piano"], seed)) for seed in range(20)}) > 3  # the seed picks the test program


def _split_of_programs(out: Path, tasks) -> dict:
    """{program: {splits}} over the given task CSVs, checking each row's program is of its family."""
    seen: dict = {}
    for task in tasks:
        with open(out / f"{task}.csv") as f:
            for r in csv.DictReader(f):
                assert int(r["program"]) in GM_INSTRUMENTS[r["timbre"]].programs, r
                seen.setdefault(int(r["program"]), set()).add(r["split"])
    return seen


def test_soundfont_corpus_never_plays_a_program_in_two_splits(soundfont_corpus):
    out, m = soundfont_corpus
    pieces = _split_of_programs(out, ("key", "composer", "instrument"))
    notes = _split_of_programs(out, ("pitch",))
    both = _split_of_programs(out, ("key", "composer", "instrument", "pitch"))
    assert all(len(s) == 1 for s in both.values()), both  # across tasks too
    for family, by_split in m["programs"].items():
        for split, programs in by_split.items():
            assert all(both.get(p, {split}) == {split} for p in programs)
    # the pitch task (3 programs per family here) hears every family in train, valid and test
    for family in GM_INSTRUMENTS:
        splits = {s for p in GM_INSTRUMENTS[family].programs for s in notes.get(p, ())}
        assert splits == {"train", "valid", "test"}, family
    assert {s for ss in pieces.values() for s in ss} == {"train", "test"}  # SMALL has no valid piece
    versions = [v for p in m["pieces"] for v in p["versions"]]
    assert all(v["program"] in m["programs"][v["timbre"]][p["split"]] for p in m["pieces"] for v in p["versions"])
    assert len(versions) == SMALL["num_pieces"] * SMALL["versions_per_piece"]
    assert [p["program"] for p in m["note_presets"]] == [int(x) for x in read_task_csv(out / "pitch.csv").extra[
        "program"][::4]]  # 4 pitches per preset, in preset order


def test_note_variants_beyond_a_familys_programs_warn_and_use_them_all(tmp_path):
    if not HAS_SOUNDFONT:
        pytest.skip("tinysoundfont or pretty_midi's TimGM6mb.sf2 not installed")
    with pytest.warns(UserWarning, match="note_variants=6"):
        m = build_corpus(tmp_path / "c", tasks=("pitch",), timbres=("flute",), note_variants=6, renderer="soundfont",
                         pitch_range=(60, 60), note_seconds=0.3, progress=False)
    presets = m["note_presets"]
    assert sorted(p["program"] for p in presets) == sorted(GM_INSTRUMENTS["flute"].programs)
    assert sorted(p["split"] for p in presets) == ["test", "train", "train", "valid"]
    with pytest.warns(UserWarning, match="beyond MIDI"):
        build_corpus(tmp_path / "c", tasks=("pitch",), timbres=("flute",), note_variants=1, renderer="soundfont",
                     pitch_range=(40, 40), note_seconds=0.3, progress=False)


def test_synth_timbre_names_are_refused_by_the_soundfont_renderer(tmp_path):
    if not HAS_SOUNDFONT:
        pytest.skip("tinysoundfont or pretty_midi's TimGM6mb.sf2 not installed")
    with pytest.raises(CorpusError, match="renderer synth"):
        build_corpus(tmp_path / "c", tasks=("pitch",), timbres=("pluck",), progress=False)


# --------------------------------------------------------------------------- scores and keys

def _stream(names, ql=1.0):
    from music21 import note, stream

    s = stream.Stream()
    for n in names:
        s.append(note.Note(n, quarterLength=ql))
    return s


def test_c_major_scale_is_labelled_c_major():
    scale = _stream(["C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5"])
    assert key_of(scale)[0] == "C major"
    # and the rendered scale really is those pitches
    notes = score_to_notes(scale)
    y = render_synth(notes, "reed", np.random.default_rng(0), reverb=False)
    for n, midi in zip(notes, [60, 62, 64, 65, 67, 69, 71, 72]):
        seg = y[int((n.onset + 0.2) * SR):int((n.onset + 0.2) * SR) + 2400]
        assert abs(cents(yin_f0(seg, SR), midi)) < 25


def test_minor_scale_and_transposed_keys():
    assert key_of(_stream(["A3", "B3", "C4", "D4", "E4", "F4", "G#4", "A4"]))[0] == "A minor"
    scale = _stream(["C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5"])
    for k in (-5, 2, 7):  # music21 transposes the notes; transpose_key only the label
        assert key_of(scale.transpose(k))[0] == transpose_key("C major", k)
    assert len(set(KEY_CLASSES)) == 24 and transpose_key("B minor", 1) == "C minor"


def test_score_timing_uses_tempo_ties_and_dynamics():
    from music21 import dynamics, note, stream, tempo, tie

    s = stream.Stream()
    s.insert(0, tempo.MetronomeMark(number=60))
    s.insert(0, dynamics.Dynamic("ff"))
    a, b = note.Note("C4", quarterLength=1), note.Note("C4", quarterLength=1)
    a.tie, b.tie = tie.Tie("start"), tie.Tie("stop")
    for n in (a, b, note.Note("E4", quarterLength=0.5)):
        s.append(n)
    notes = score_to_notes(s)
    assert [(n.onset, n.duration, n.pitch) for n in notes] == [(0.0, 2.0, 60), (2.0, 0.5, 64)]
    assert notes[0].velocity > 100  # ff
    # no metronome mark: the default tempo (100 bpm) applies
    assert score_to_notes(_stream(["C4", "D4"]))[1].onset == pytest.approx(0.6)


# --------------------------------------------------------------------------- the built corpus

def test_corpus_layout_and_manifest(small_corpus):
    out, m = small_corpus
    assert m["sample_rate"] == SR and set(m["tasks"]) == {"key", "composer", "instrument", "pitch"}
    assert json.loads((out / "corpus.json").read_text()) == m
    for task, spec in m["tasks"].items():
        table = read_task_csv(out / spec["csv"])
        assert len(table) == sum(spec["num_clips"].values()) > 0
        assert set(table.classes) <= set(spec["classes"])
        for rel in table.paths[:5]:
            audio, sr = sf.read(out / rel)
            assert sr == SR and audio.ndim == 1
            expected = SMALL["note_seconds"] if task == "pitch" else SMALL["clip_seconds"]
            assert len(audio) == int(expected * SR)
    assert m["tasks"]["key"]["classes"] == list(KEY_CLASSES)


def test_splits_never_share_a_piece(small_corpus):
    out, m = small_corpus
    for spec in m["tasks"].values():
        with open(out / spec["csv"]) as f:
            rows = list(csv.DictReader(f))
        split_of = {}
        for r in rows:
            assert split_of.setdefault(r["piece"], r["split"]) == r["split"]
    notes = read_task_csv(out / "pitch.csv")
    # every preset is heard in exactly one split, and all three splits get presets
    assert set(notes.splits) == {"train", "valid", "test"}


def test_pitch_clips_sound_at_their_label(small_corpus):
    out, _ = small_corpus
    table = read_task_csv(out / "pitch.csv")
    for rel, (label,) in zip(table.paths, table.labels):
        y, _ = sf.read(out / rel)
        assert abs(cents(yin_f0(y[int(0.1 * SR):int(0.1 * SR) + 3000], SR), int(label))) < 30, rel


def test_key_labels_follow_music21_transposition(small_corpus):
    from music21 import converter, stream

    from mert_plugin.corpus.scores import corpus_root

    out, m = small_corpus
    table = read_task_csv(out / "key.csv")
    checked = set()
    for piece, (label,), shift in zip(table.pieces, table.labels, table.extra["transpose"]):
        if (piece, shift) in checked:
            continue
        checked.add((piece, shift))
        s = converter.parse(str(corpus_root() / piece))
        s = s.scores[0] if isinstance(s, stream.Opus) else s
        assert key_of(s.transpose(int(shift)))[0] == label
    assert len(checked) >= 2


def test_build_is_byte_identical_for_a_seed_and_differs_across_seeds(small_corpus, tmp_path):
    out, _ = small_corpus
    again = build_corpus(tmp_path / "again", seed=0, **SMALL)
    assert tree_digest(out) == tree_digest(tmp_path / "again")
    other = build_corpus(tmp_path / "other", seed=1, **{**SMALL, "tasks": ("pitch",)})
    a = sf.read(out / "audio/notes/organ/v0/p057.wav")[0]
    b = sf.read(tmp_path / "other/audio/notes/organ/v0/p057.wav")[0]
    assert not np.array_equal(a, b)
    assert other["seed"] == 1 and again["seed"] == 0


def test_rebuild_skips_finished_units(small_corpus, tmp_path):
    out, _ = small_corpus
    wav = sorted((out / "audio/notes").rglob("*.wav"))[0]
    before = wav.stat().st_mtime_ns
    build_corpus(out, seed=0, **SMALL)
    assert wav.stat().st_mtime_ns == before  # not rewritten
    wav.unlink()  # a missing clip makes its unit render again
    build_corpus(out, seed=0, **SMALL)
    assert wav.is_file()


def test_valid_and_test_keys_all_occur_in_training():
    from mert_plugin.corpus.build import plan_tonics
    from mert_plugin.corpus.scores import PieceInfo, key_name

    pieces = [PieceInfo(f"p{i}", "c", [], "D major" if i % 4 else "E minor", 0.9, 30.0) for i in range(16)]
    splits = {p.piece: ("train", "train", "valid", "test")[i % 4 if i < 12 else 0] for i, p in enumerate(pieces)}
    plan = plan_tonics(pieces, splits, {p.piece: True for p in pieces}, versions=2, seed=0)
    keys = {s: set() for s in ("train", "valid", "test")}
    for p in pieces:
        for v in range(2):
            keys[splits[p.piece]].add(key_name(plan[p.piece, v], p.key.split()[1]))
    assert keys["valid"] <= keys["train"] and keys["test"] <= keys["train"]
    train_tonics = [plan[p.piece, v] for p in pieces if splits[p.piece] == "train" and p.key == "D major"
                    for v in range(2)]
    assert len(set(train_tonics)) == min(12, len(train_tonics))  # balanced: no tonic twice before all once


# --------------------------------------------------------------------------- splits and tables

def test_assign_splits_is_order_independent_and_stratified():
    groups = [f"g{i}" for i in range(40)]
    strata = {g: "a" if i < 20 else "b" for i, g in enumerate(groups)}
    s1 = assign_splits(groups, seed=3, strata=strata)
    s2 = assign_splits(list(reversed(groups)), seed=3, strata=strata)
    assert s1 == s2
    for stratum in "ab":
        counts = [sum(1 for g in groups if strata[g] == stratum and s1[g] == s) for s in ("train", "valid", "test")]
        assert counts == [14, 3, 3]
    assert assign_splits(groups, seed=4, strata=strata) != s1
    assert assign_splits(["x"], seed=0) == {"x": "train"}


def test_task_csv_errors_are_corpus_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.wav,x\n")
    with pytest.raises(CorpusError, match="missing column"):
        read_task_csv(bad)
    leak = tmp_path / "leak.csv"
    leak.write_text("path,label,split,piece\na.wav,x,train,p\nb.wav,x,test,p\n")
    with pytest.raises(CorpusError, match="both"):
        read_task_csv(leak)


def test_import_folder_resamples_cuts_and_splits_by_file(tmp_path):
    src = tmp_path / "music"
    rows = ["path,label"]
    for i in range(6):
        t = np.arange(int(2.5 * 44100)) / 44100
        stereo = np.stack([np.sin(2 * np.pi * (220 + 40 * i) * t)] * 2, axis=1) * 0.3
        (src / "sub").mkdir(parents=True, exist_ok=True)
        sf.write(src / f"sub/song{i}.flac", stereo, 44100)
        rows.append(f"sub/song{i}.flac,{'rock;loud' if i % 2 else 'jazz'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    m = import_folder(src, tmp_path / "labels.csv", tmp_path / "out", task="genre", clip_seconds=1.0,
                      progress=False)
    table = read_task_csv(tmp_path / "out/genre.csv")
    assert m["tasks"]["genre"]["type"] == "multilabel" and table.multilabel
    assert len(table) == 12  # 2 full clips per 2.5 s file
    y, sr = sf.read(tmp_path / "out" / table.paths[0])
    assert sr == SR and y.ndim == 1 and len(y) == SR
    by_piece = {}
    for p, s in zip(table.pieces, table.splits):
        assert by_piece.setdefault(p, s) == s


def test_import_folder_names_missing_files(tmp_path):
    (tmp_path / "music").mkdir()
    (tmp_path / "labels.csv").write_text("path,label\nnope.wav,x\n")
    with pytest.raises(CorpusError, match="missing"):
        import_folder(tmp_path / "music", tmp_path / "labels.csv", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("args, message", [
    (["build", "--composers", "nobody"], "no scores for composer"),
    (["build", "--clip-seconds", "60"], "max_piece_seconds"),
    (["build", "--pitch-min", "90", "--pitch-max", "80", "--tasks", "pitch"], "pitch_range"),
    (["build", "--pitch-min", "60", "--pitch-max", "120", "--tasks", "pitch"], "piano range"),
    (["build", "--split-fractions", "0.7", "-0.1", "0.4", "--tasks", "pitch"], "split fractions"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, args, message):
    rc = corpus_main(args[:1] + ["--out", str(tmp_path / "o"), "--quiet"] + args[1:])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_fluidsynth_without_install_is_a_clear_error(tmp_path, capsys):
    if find_fluidsynth() is not None:
        pytest.skip("fluidsynth is installed here")
    rc = corpus_main(["build", "--out", str(tmp_path / "o"), "--renderer", "fluidsynth", "--quiet"])
    assert rc == 2 and "fluidsynth" in capsys.readouterr().err


def test_cli_builds_a_pitch_only_corpus(tmp_path, capsys):
    rc = corpus_main(["build", "--out", str(tmp_path / "o"), "--tasks", "pitch", "--timbres", "flute", "pluck",
                      "--renderer", "synth",
                      "--note-variants", "3", "--pitch-min", "60", "--pitch-max", "61", "--note-seconds", "0.3",
                      "--quiet"])
    assert rc == 0 and "pitch" in capsys.readouterr().out
    assert len(read_task_csv(tmp_path / "o/pitch.csv")) == 2 * 3 * 2
    # --split-fractions reaches the builder: no valid share -> no valid presets, and the manifest records it
    rc = corpus_main(["build", "--out", str(tmp_path / "f"), "--tasks", "pitch", "--timbres", "flute", "pluck",
                      "--renderer", "synth", "--note-variants", "3", "--pitch-min", "60", "--pitch-max", "60",
                      "--note-seconds", "0.3", "--split-fractions", "0.5", "0", "0.5", "--quiet"])
    assert rc == 0
    assert json.loads((tmp_path / "f/corpus.json").read_text())["settings"]["split_fractions"] == [0.5, 0.0, 0.5]
    assert "valid" not in read_task_csv(tmp_path / "f/pitch.csv").splits
