"""Note events -> mono float audio.

Three renderers:

* ``synth`` (built in, the fallback): six timbres made by additive / subtractive
  synthesis and Karplus-Strong, ADSR envelopes and a short synthetic room reverb.
  Every random choice comes from the ``numpy.random.Generator`` passed in, so the
  same seed gives the same samples.
* ``soundfont`` (pip only): sampled General MIDI instruments played by ``tinysoundfont``
  from a SoundFont, by default the ``TimGM6mb.sf2`` that the ``pretty_midi`` wheel
  ships. An instrument class is a family of several GM programs
  (:data:`GM_INSTRUMENTS`, :data:`GM_PROGRAMS`); a render plays one of them. The same
  seeded room and brightness variation as the synth are applied afterwards.
* ``fluidsynth`` (optional): writes a Standard MIDI File and calls the
  ``fluidsynth`` binary with a General MIDI soundfont, when both are installed.

Shapes: audio is a 1-D ``float32`` array ``[num_samples]`` in [-1, 1].
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.signal import lfilter

from ..errors import MERTError

SAMPLE_RATE = 24000
# Bumped whenever the synthesis changes, so cached renders are not reused.
SYNTH_VERSION = 2
# The same for the soundfont renderer (tinysoundfont + post-processing) and its program
# families: 2 = families of several GM programs, split by program.
SOUNDFONT_VERSION = 2
SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/soundfonts", "/usr/share/sounds/sf3")


class RenderError(MERTError, RuntimeError):
    """A renderer is unavailable or failed (e.g. fluidsynth missing or crashing)."""


class Note(NamedTuple):
    """One sounding note. ``onset``/``duration`` in seconds, ``pitch`` MIDI number, ``velocity`` 1..127."""

    onset: float
    duration: float
    pitch: int
    velocity: int


def midi_to_hz(pitch: float) -> float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12.0)


# --------------------------------------------------------------------------- building blocks

def adsr(n_hold: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """Envelope ``[n_hold + n_release]``: linear attack, exponential decay towards ``sustain``
    while the key is down, then an exponential release reaching -60 dB after ``release`` s.
    A note shorter than its attack releases from wherever the attack got to (no click)."""
    n_a, n_d, n_r = max(1, int(attack * sr)), max(1, int(decay * sr)), max(1, int(release * sr))
    t = np.arange(n_hold, dtype=np.float64)
    held = np.where(t < n_a, t / n_a, sustain + (1.0 - sustain) * np.exp(-(t - n_a) / n_d))
    level = held[-1] if n_hold else 0.0
    tail = level * np.exp(-6.9 * np.arange(n_r) / n_r)
    return np.concatenate([held, tail])


def one_pole_lowpass(x: np.ndarray, cutoff_hz: float, sr: int) -> np.ndarray:
    a = math.exp(-2.0 * math.pi * min(cutoff_hz, 0.45 * sr) / sr)
    return lfilter([1.0 - a], [1.0, -a], x)


def _phase(f0: float, n: int, sr: int, vibrato_hz: float = 0.0, vibrato_depth: float = 0.0,
           vibrato_delay: float = 0.2) -> np.ndarray:
    """Running phase (radians) ``[n]`` of the fundamental, with an optional sinusoidal vibrato
    (relative depth) that fades in after ``vibrato_delay`` s. Vibrato is symmetric, so the
    mean frequency stays ``f0``."""
    if vibrato_depth <= 0:
        return 2.0 * math.pi * f0 * np.arange(n) / sr
    t = np.arange(n) / sr
    fade = np.clip((t - vibrato_delay) / 0.3, 0.0, 1.0)
    inst = f0 * (1.0 + vibrato_depth * fade * np.sin(2.0 * math.pi * vibrato_hz * t))
    return 2.0 * math.pi * np.concatenate([[0.0], np.cumsum(inst[:-1])]) / sr


def _additive(phase: np.ndarray, f0: float, ratios: np.ndarray, amps: np.ndarray, sr: int,
              rng: np.random.Generator, decays: Optional[np.ndarray] = None) -> np.ndarray:
    """Sum of partials ``amps[k] * sin(ratios[k] * phase + random phase)`` ``[n]``; partials
    above 0.45*sr are dropped (no aliasing). ``decays[k]`` (s) adds a per-partial exponential decay."""
    keep = ratios * f0 < 0.45 * sr
    ratios, amps = ratios[keep], amps[keep]
    phi0 = rng.uniform(0, 2 * math.pi, size=len(ratios))
    parts = np.sin(np.outer(ratios, phase) + phi0[:, None]) * amps[:, None]  # [K, n]
    if decays is not None:
        t = np.arange(len(phase)) / sr
        parts *= np.exp(-np.outer(1.0 / decays[keep], t))
    return parts.sum(axis=0)


def karplus_strong(f0: float, n: int, sr: int, rng: np.random.Generator, t60: float,
                   brightness: float) -> np.ndarray:
    """Plucked string ``[n]``: a noise burst circulating in a delay loop with a loss filter
    ``(1-S) + S z^-1`` (S = 0.5 is the classic two-point average) and a first-order
    all-pass that supplies the fractional part of the period. The whole loop is one IIR
    filter, so scipy's ``lfilter`` runs it in C instead of a Python sample loop.

    Tuning is exact at f0: the loss filter's phase delay there is computed, and the
    all-pass coefficient is solved for the rest. Above 1 kHz, S shrinks like 1/f0:
    with S = 0.5 a note near 4 kHz would lose 1 dB per period and die within ~20 ms."""
    period = sr / f0
    w = 2.0 * math.pi * f0 / sr
    s = 0.5 * min(1.0, 1000.0 / f0)
    loss_delay = math.atan2(s * math.sin(w), 1.0 - s + s * math.cos(w)) / w  # phase delay at f0 (samples)
    # Loop delay = N (delay line) + loss_delay + d (all-pass); keep d in [0.1, 1.1), where
    # a first-order all-pass stays well behaved.
    n_int = int(math.floor(period - loss_delay - 0.1))
    d = period - loss_delay - n_int
    # All-pass (c + z^-1) / (1 + c z^-1) with phase delay exactly d at f0 (the textbook
    # (1-d)/(1+d) is its low-frequency limit and drifts sharp at high notes).
    c = math.sin(0.5 * w * (1.0 - d)) / math.sin(0.5 * w * (1.0 + d))
    g = 0.001 ** (1.0 / (f0 * t60))  # loop gain: -60 dB after t60 seconds
    # y = x + g ((1-s) + s z^-1) A(z) z^-N y; multiplied out by (1 + c z^-1):
    a = np.zeros(n_int + 3)
    a[0], a[1] = 1.0, c
    a[n_int] -= g * (1.0 - s) * c
    a[n_int + 1] -= g * ((1.0 - s) + s * c)
    a[n_int + 2] -= g * s
    excitation = np.zeros(n)
    burst = rng.uniform(-1.0, 1.0, size=min(n, n_int + 1))
    # Softer plucks have fewer high harmonics: low-pass the burst.
    excitation[: len(burst)] = one_pole_lowpass(burst - burst.mean(), brightness, sr)
    return lfilter([1.0, c], a, excitation)


# --------------------------------------------------------------------------- timbres

@dataclass(frozen=True)
class Timbre:
    """A synth voice. ``synth(f0, n_hold, velocity, sr, rng, preset) -> [n_hold + release]``."""

    name: str
    gm_program: int  # nearest General MIDI program (0-based); informational, see GM_INSTRUMENTS
    synth: Callable[..., np.ndarray]
    description: str


def _organ(f0, n_hold, vel, sr, rng, preset):
    # Drawbar organ: fixed harmonic stops, no decay, fast attack/release.
    ratios = np.array([1, 2, 3, 4, 6, 8], dtype=float)
    amps = np.array([1.0, 0.6, 0.35, 0.3, 0.15, 0.1]) * preset["brightness"] ** np.arange(6)
    env = adsr(n_hold, sr, 0.012, 0.05, 1.0, 0.08)
    return _additive(_phase(f0, len(env), sr), f0, ratios, amps, sr, rng) * env


def _piano(f0, n_hold, vel, sr, rng, preset):
    # Struck string: slightly stretched partials, higher partials decay faster, harder
    # strikes (velocity) are brighter; the damper cuts the sound at key release.
    k = np.arange(1, 15, dtype=float)
    inharm = 1e-4 * (f0 / 261.6)
    ratios = k * np.sqrt(1.0 + inharm * k ** 2)
    tilt = 0.45 - 0.25 * (vel / 127.0) * preset["brightness"]
    amps = k ** -1.0 * np.exp(-tilt * (k - 1))
    t1 = float(np.clip(2.5 * math.sqrt(261.6 / f0), 0.6, 6.0))
    decays = t1 / (1.0 + 0.6 * (k - 1))
    env = adsr(n_hold, sr, 0.004, 10.0, 1.0, 0.12)  # decay is in the partials, not the ADSR
    return _additive(_phase(f0, len(env), sr), f0, ratios, amps, sr, rng, decays) * env


def _pluck(f0, n_hold, vel, sr, rng, preset):
    env = adsr(n_hold, sr, 0.001, 10.0, 1.0, 0.06)  # the finger damps the string on release
    t60 = float(np.clip(3.0 * math.sqrt(220.0 / f0), 0.5, 5.0))
    cutoff = (1500.0 + 6000.0 * vel / 127.0) * preset["brightness"]
    return karplus_strong(f0, len(env), sr, rng, t60, cutoff) * env


def _reed(f0, n_hold, vel, sr, rng, preset):
    # Clarinet-like: mostly odd harmonics (a band-limited square wave) through a soft low-pass.
    k = np.arange(1, 26, dtype=float)
    amps = np.where(k % 2 == 1, 1.0 / k, 0.08 / k)
    amps = amps / (1.0 + (k * f0 / (2500.0 * preset["brightness"])) ** 2)
    env = adsr(n_hold, sr, 0.03, 0.1, 0.8, 0.06)
    return _additive(_phase(f0, len(env), sr), f0, k, amps, sr, rng) * env


def _strings(f0, n_hold, vel, sr, rng, preset):
    # Bowed string: band-limited sawtooth, slow attack, delayed vibrato.
    k = np.arange(1, 31, dtype=float)
    amps = (1.0 / k) / (1.0 + (k * f0 / (3000.0 * preset["brightness"])) ** 2)
    env = adsr(n_hold, sr, 0.08, 0.2, 0.85, 0.15)
    phase = _phase(f0, len(env), sr, vibrato_hz=5.5, vibrato_depth=0.003, vibrato_delay=0.25)
    return _additive(phase, f0, k, amps, sr, rng) * env


def _flute(f0, n_hold, vel, sr, rng, preset):
    # Nearly sinusoidal with a little breath noise and a gentle vibrato.
    k = np.array([1, 2, 3, 4], dtype=float)
    amps = np.array([1.0, 0.3, 0.12, 0.05]) * preset["brightness"] ** np.arange(4)
    env = adsr(n_hold, sr, 0.06, 0.1, 0.9, 0.08)
    phase = _phase(f0, len(env), sr, vibrato_hz=4.8, vibrato_depth=0.002, vibrato_delay=0.3)
    tone = _additive(phase, f0, k, amps, sr, rng)
    breath = one_pole_lowpass(rng.standard_normal(len(env)), 4000.0, sr)
    return (tone + 0.05 * breath) * env


TIMBRES: Dict[str, Timbre] = {
    t.name: t
    for t in (
        Timbre("organ", 19, _organ, "additive drawbar organ, sustained"),
        Timbre("piano", 0, _piano, "additive struck string with per-partial decay"),
        Timbre("pluck", 24, _pluck, "Karplus-Strong plucked string"),
        Timbre("reed", 71, _reed, "odd-harmonic (square-ish) reed, low-passed"),
        Timbre("strings", 48, _strings, "band-limited sawtooth with vibrato"),
        Timbre("flute", 73, _flute, "near-sine with breath noise and vibrato"),
    )
}


def timbre_preset(rng: np.random.Generator) -> Dict[str, float]:
    """Random per-recording variation of a timbre: brightness and room."""
    return {
        "brightness": float(rng.uniform(0.8, 1.2)),
        "rt60": float(rng.uniform(0.25, 0.7)),  # room reverberation time (s)
        "wet": float(rng.uniform(0.1, 0.25)),   # reverb level relative to the dry sound
    }


def room_reverb(x: np.ndarray, sr: int, rng: np.random.Generator, rt60: float, wet: float) -> np.ndarray:
    """Add a synthetic room: exponentially decaying white noise as impulse response
    (energy -60 dB after ``rt60`` s), applied by FFT convolution. ``[n] -> [n + len(ir) - 1]``."""
    n_ir = max(2, int(rt60 * sr))
    ir = rng.standard_normal(n_ir) * np.exp(-6.9 * np.arange(n_ir) / n_ir)
    ir[: int(0.005 * sr)] = 0.0  # 5 ms pre-delay before the first reflection
    ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
    n = len(x) + n_ir - 1
    n_fft = 1 << (n - 1).bit_length()
    reverb = np.fft.irfft(np.fft.rfft(x, n_fft) * np.fft.rfft(ir, n_fft), n_fft)[:n]
    out = reverb * wet
    out[: len(x)] += x
    return out


# --------------------------------------------------------------------------- the synth renderer

def render_synth(notes: Sequence[Note], timbre: str, rng: np.random.Generator, *,
                 sample_rate: int = SAMPLE_RATE, preset: Optional[Dict[str, float]] = None,
                 max_seconds: Optional[float] = None, reverb: bool = True,
                 peak: float = 0.9) -> np.ndarray:
    """Render ``notes`` with the built-in ``timbre``; returns ``float32 [num_samples]``.

    The output is peak-normalised to ``peak`` (loudness is then not a cue for any label)
    and, with ``max_seconds``, cut there with a 20 ms fade-out.
    """
    if timbre not in TIMBRES:
        raise RenderError(f"unknown timbre {timbre!r}; choose from {sorted(TIMBRES)}")
    if not notes:
        raise RenderError("nothing to render: no notes")
    sr = sample_rate
    preset = preset or timbre_preset(rng)
    voice = TIMBRES[timbre].synth
    rendered: List[Tuple[int, np.ndarray]] = []
    for note in sorted(notes):
        if max_seconds is not None and note.onset >= max_seconds:
            break
        start = int(round(note.onset * sr))
        n_hold = max(1, int(round(note.duration * sr)))
        amp = (max(1, min(127, note.velocity)) / 127.0) ** 1.5
        y = voice(midi_to_hz(note.pitch), n_hold, note.velocity, sr, rng, preset)
        rendered.append((start, amp * y))
    total = max(s + len(y) for s, y in rendered)
    out = np.zeros(total)
    for s, y in rendered:
        out[s: s + len(y)] += y
    if reverb:
        out = room_reverb(out, sr, rng, preset["rt60"], preset["wet"])
    return finish(out, sr, max_seconds, peak)


def finish(x: np.ndarray, sr: int, max_seconds: Optional[float], peak: float) -> np.ndarray:
    """Cut to ``max_seconds`` (20 ms fade-out at the cut) and peak-normalise; float32."""
    if max_seconds is not None and len(x) > int(max_seconds * sr):
        x = x[: int(max_seconds * sr)].copy()
        n_fade = min(len(x), int(0.02 * sr))
        x[len(x) - n_fade:] *= np.linspace(1.0, 0.0, n_fade)
    m = float(np.max(np.abs(x))) if len(x) else 0.0
    if m > 0:
        x = x * (peak / m)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- General MIDI soundfont

@dataclass(frozen=True)
class GMInstrument:
    """An instrument class of the sample-based renderers: a family of General MIDI programs
    (0-based) that make sound the same way. ``programs[0]`` is the family's reference
    program, played when a render names no program."""

    name: str
    programs: Tuple[int, ...]
    description: str

    @property
    def program(self) -> int:
        return self.programs[0]


# General MIDI name and TimGM6mb preset name of every program the families use.
GM_PROGRAMS: Dict[int, Tuple[str, str]] = {
    0: ("acoustic grand piano", "Piano 1"),
    4: ("electric piano 1", "E.Piano 1"),
    7: ("clavinet", "Clavinet"),
    11: ("vibraphone", "Vibraphone"),
    12: ("marimba", "Marimba"),
    24: ("nylon-string guitar", "Nylon Guitar"),
    25: ("steel-string guitar", "Steel Guitar"),
    26: ("jazz electric guitar", "Jazz Guitar"),
    27: ("clean electric guitar", "Clean Guitar"),
    28: ("muted electric guitar", "Guitar Mutes"),
    29: ("overdriven guitar", "Overdrive Guitar"),
    30: ("distortion guitar", "DistortionGuitar"),
    48: ("string ensemble 1", "Strings CLP"),
    40: ("violin", "Violin"),
    42: ("cello", "Cello"),
    43: ("contrabass", "Contrabass"),
    50: ("synth strings 1", "Synth Strings 1"),
    51: ("synth strings 2", "Synth Strings 2"),
    61: ("brass section", "Brass"),
    56: ("trumpet", "SoloTrumpet"),
    57: ("trombone", "Trombone"),
    58: ("tuba", "Tuba"),
    59: ("muted trumpet", "Mute Trumpet"),
    60: ("french horn", "French Horns"),
    62: ("synth brass 1", "Synth Brass 1"),
    71: ("clarinet", "Clarinet"),
    64: ("soprano sax", "SopSax (TB) v2.3"),
    66: ("tenor sax", "Tenor Sax (TB) v2.3"),
    69: ("english horn", "English Horn"),
    70: ("bassoon", "Bassoon"),
    73: ("flute", "Flute TB"),
    72: ("piccolo", "Piccolo"),
    75: ("pan flute", "Pan Flute"),
    79: ("ocarina", "Ocarina"),
}


def _family(name: str, programs: Tuple[int, ...], how: str) -> GMInstrument:
    listed = ", ".join(f"{p} {GM_PROGRAMS[p][0]}" for p in programs)
    return GMInstrument(name, programs, f"{how}: GM programs {listed} (sampled)")


# Six families that differ in how the sound is made (struck, plucked, bowed, lip reed,
# cane reed, air jet), four to seven GM programs each: every TimGM6mb program that
# sounds in tune and has samples of its own (no program holds half of its samples in
# another one's; checked by parsing the SoundFont's preset and instrument zones). The
# corpus splits each family by program (train/valid/test programs are disjoint), so the
# instrument and pitch tasks test instruments never heard in training; more training
# programs per family give a probe more than two timbres to learn a family from
# (docs/LEARNING.md 7.11). Every program was checked with the tests' YIN method: the f0
# of a rendered note is within 50 cents of its MIDI number over SOUNDFONT_PITCH_RANGE,
# with no sample an octave off. Left out of TimGM6mb's candidates:
#   1 bright piano, 2 electric grand, 41 viola, 44 tremolo and 49 slow strings, 63 synth
#   brass 2, 76 bottle, 82 calliope: half or more of their samples are those of 0, 40,
#   48, 62, 75 (2 holds all nine of 0's);
#   3 honky-tonk (detuned chorus: YIN an octave off at MIDI 52, 56-59, 65),
#   5 electric piano 2 (MIDI 59 sounds 100 cents sharp), 8 celesta (more than 50 cents
#   off at most pitches, up to 137 cents flat), 9 glockenspiel, 14 tubular bells, 31
#   guitar harmonics (octaves off), 13 xylophone (up to 90 cents off at the attack),
#   21 accordion, 23 bandoneon (50-66 cents flat above MIDI 72 / 76), 22 harmonica
#   (MIDI 71 an octave off), 45 pizzicato (plucked, not bowed), 65 alto sax, 67
#   baritone sax (silent keys: MIDI 64; 80 and up), 68 oboe (fundamental 17-19 dB below the 2nd harmonic at
#   MIDI 74-78: an octave off), 74 recorder (octave off at MIDI 47-49), 77 shakuhachi,
#   78 whistle (never in tune); organs 16-19: a 16' rank an octave below the key.
GM_INSTRUMENTS: Dict[str, GMInstrument] = {
    i.name: i
    for i in (
        _family("piano", (0, 4, 7, 11, 12), "struck keyboards and mallets"),
        _family("guitar", (24, 25, 26, 27, 28, 29, 30), "plucked guitars"),
        _family("strings", (48, 40, 42, 43, 50, 51), "bowed and synthesised strings"),
        _family("brass", (61, 56, 57, 60, 58, 59, 62), "brass"),
        _family("reed", (71, 64, 66, 69, 70), "reeds"),
        _family("flute", (73, 72, 75, 79), "flutes and pipes"),
    )
}
# MIDI range over which every program of GM_INSTRUMENTS was checked to sound at its
# label (YIN f0 within 50 cents). Piccolo fails below 47, soprano sax above 87.
SOUNDFONT_PITCH_RANGE = (47, 87)
BUNDLED_SOUNDFONT = ("pretty_midi", "TimGM6mb.sf2")  # (package, file) of the pip-installed default
SOUNDFONT_TAIL_S = 1.0  # rendered after the last note-off, for the release


def instrument_set(renderer: str) -> Dict[str, str]:
    """``{instrument class: description}`` of a renderer: the synth's timbres, or the GM
    program families of the sample-based renderers (``soundfont``, ``fluidsynth``)."""
    if renderer == "synth":
        return {t.name: t.description for t in TIMBRES.values()}
    return {i.name: i.description for i in GM_INSTRUMENTS.values()}


def import_tinysoundfont():
    """The ``tinysoundfont`` module, or ``None`` when it is not installed (or broken)."""
    try:
        import tinysoundfont
    except ImportError:
        return None
    return tinysoundfont


def bundled_soundfont() -> Optional[str]:
    """Path of pretty_midi's General MIDI soundfont ``TimGM6mb.sf2``, or ``None``. The
    package is located without importing it (its import needs mido and takes time)."""
    package, name = BUNDLED_SOUNDFONT
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def find_soundfont(soundfont: Optional[str] = None, system: bool = True) -> Optional[str]:
    """The soundfont a sample-based renderer uses: ``soundfont`` if given (``None`` if it is
    not a file), else pretty_midi's bundled one, else (with ``system``) the first
    ``.sf2``/``.sf3`` under :data:`SOUNDFONT_DIRS`, sorted by name so the choice is stable."""
    if soundfont:
        return soundfont if os.path.isfile(soundfont) else None
    found = bundled_soundfont()
    if found or not system:
        return found
    for d in SOUNDFONT_DIRS:
        if os.path.isdir(d):
            hits = sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in (".sf2", ".sf3"))
            if hits:
                return str(hits[0])
    return None


_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file, cached by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# One loaded synth per (soundfont, rate): parsing TimGM6mb takes about 15 ms, too much for
# every one of hundreds of note clips. Reuse is exact: every render starts from silence
# (all sounds off and flushed at the end of the previous one) and selects its program,
# and the tests check that a render equals the same render on a fresh synth.
_TSF_SYNTHS: Dict[Tuple[str, int], tuple] = {}
_TSF_FLUSH_S = 0.2


def _tsf_synth(tsf, path: str, sample_rate: int):
    key = (os.path.abspath(path), sample_rate)
    if key not in _TSF_SYNTHS:
        synth = tsf.Synth(samplerate=sample_rate)
        try:
            sfid = synth.sfload(path)
        except Exception as exc:  # tinysoundfont raises a bare Exception on unreadable files
            raise RenderError(f"tinysoundfont cannot load soundfont {path}: {exc}") from None
        _TSF_SYNTHS.clear()  # keep one: a loaded soundfont holds its samples as floats
        _TSF_SYNTHS[key] = (synth, sfid)
    return _TSF_SYNTHS[key]


def _tsf_render(synth, sfid: int, program: int, notes: Sequence[Note], n_total: int, sr: int) -> np.ndarray:
    """Play ``notes`` (sample-accurate note-on/off events) on channel 0 with GM ``program``
    for ``n_total`` samples; mono float64 ``[n_total]`` (the mean of the stereo output)."""
    try:
        synth.program_select(0, sfid, 0, program)
    except Exception as exc:
        raise RenderError(f"soundfont has no General MIDI program {program} (bank 0): {exc}") from None
    events = []  # (sample, order, pitch, velocity); note-offs (order 0) before note-ons
    for n in notes:
        on = int(round(n.onset * sr))
        if on >= n_total:
            continue
        off = max(on + 1, int(round((n.onset + n.duration) * sr)))
        p, v = int(np.clip(n.pitch, 0, 127)), int(np.clip(n.velocity, 1, 127))
        events.append((on, 1, p, v))
        events.append((off, 0, p, 0))
    events.sort()
    buf = np.zeros(2 * n_total, dtype=np.float32)  # interleaved stereo, as tinysoundfont writes it
    pos = 0
    try:
        for t, is_on, p, v in events:
            t = min(t, n_total)
            if t > pos:
                synth.generate_simple(t - pos, buffer=memoryview(buf[2 * pos:2 * t]).cast("B"))
                pos = t
            if is_on:
                synth.noteon(0, p, v)
            else:
                synth.noteoff(0, p)
        if n_total > pos:
            synth.generate_simple(n_total - pos, buffer=memoryview(buf[2 * pos:]).cast("B"))
    finally:
        synth.sounds_off()  # leave the synth silent for the next render
        synth.generate_simple(int(_TSF_FLUSH_S * sr))
    return buf.reshape(-1, 2).astype(np.float64).mean(axis=1)


def tilt(x: np.ndarray, sr: int, brightness: float, corner_hz: float = 1000.0) -> np.ndarray:
    """First-order spectral tilt: the part of ``x`` above ``corner_hz`` scaled by
    ``brightness ** 2`` (0.8-1.2 gives about -3.9 to +3.2 dB), the part below unchanged."""
    low = one_pole_lowpass(x, corner_hz, sr)
    return low + brightness ** 2 * (x - low)


def gm_program(instrument: str, program: Optional[int] = None) -> int:
    """The GM program a sample-based renderer plays for ``instrument``: ``program`` (which
    must belong to the family) or the family's reference program."""
    if instrument not in GM_INSTRUMENTS:
        raise RenderError(f"unknown instrument {instrument!r} for the sample-based renderers; "
                          f"choose from {list(GM_INSTRUMENTS)}")
    family = GM_INSTRUMENTS[instrument]
    if program is None:
        return family.program
    if program not in family.programs:
        raise RenderError(f"GM program {program} is not one of the {instrument} family's programs "
                          f"{list(family.programs)}")
    return int(program)


def render_soundfont(notes: Sequence[Note], instrument: str, rng: np.random.Generator, *,
                     program: Optional[int] = None, sample_rate: int = SAMPLE_RATE, soundfont: Optional[str] = None,
                     preset: Optional[Dict[str, float]] = None, max_seconds: Optional[float] = None,
                     reverb: bool = True, peak: float = 0.9) -> np.ndarray:
    """Render ``notes`` with GM ``program`` of the family ``instrument`` (:data:`GM_INSTRUMENTS`;
    default: the family's reference program) from a SoundFont, played by tinysoundfont;
    returns ``float32 [num_samples]``.

    ``soundfont`` defaults to pretty_midi's bundled ``TimGM6mb.sf2``. The render runs
    until :data:`SOUNDFONT_TAIL_S` after the last note-off (or ``max_seconds``). Then,
    as for the synth, ``preset`` (drawn from ``rng`` when not given) varies the
    recording: a spectral tilt (``brightness``) and a seeded room (``rt60``, ``wet``).
    The output is peak-normalised to ``peak`` and, with ``max_seconds``, cut there
    with a 20 ms fade-out. tinysoundfont itself has no randomness, so the same
    ``rng`` state gives the same samples.
    """
    program = gm_program(instrument, program)
    if not notes:
        raise RenderError("nothing to render: no notes")
    tsf = import_tinysoundfont()
    if tsf is None:
        raise RenderError("renderer 'soundfont' needs the tinysoundfont package "
                          "(pip install --no-deps tinysoundfont; its pyaudio dependency is only for playback)")
    path = find_soundfont(soundfont)
    if path is None:
        raise RenderError(f"renderer 'soundfont' needs a .sf2/.sf3 soundfont: {soundfont!r} is not a file"
                          if soundfont else "renderer 'soundfont' found no soundfont: install pretty_midi "
                          "(it ships TimGM6mb.sf2) or pass one")
    sr = sample_rate
    preset = preset or timbre_preset(rng)
    if max_seconds is not None:
        notes = [n for n in notes if n.onset < max_seconds]
        if not notes:
            raise RenderError(f"nothing to render: no note starts before {max_seconds} s")
    end = max(n.onset + n.duration for n in notes) + SOUNDFONT_TAIL_S
    if max_seconds is not None:
        end = min(end, max_seconds + 0.05)  # a little past the cut, so finish() fades there
    synth, sfid = _tsf_synth(tsf, path, sr)
    out = _tsf_render(synth, sfid, program, notes, int(round(end * sr)), sr)
    out = tilt(out, sr, preset["brightness"])
    if reverb:
        out = room_reverb(out, sr, rng, preset["rt60"], preset["wet"])
    return finish(out, sr, max_seconds, peak)


# --------------------------------------------------------------------------- MIDI + fluidsynth

def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def notes_to_midi(notes: Sequence[Note], program: int = 0, channel: int = 0) -> bytes:
    """A format-0 Standard MIDI File for ``notes``: 120 bpm and 480 ticks per quarter,
    so one second is exactly 960 ticks and note times survive the round trip."""
    tpq, ticks_per_s = 480, 960
    events = []  # (tick, order, bytes); note-offs (order 0) before note-ons at the same tick
    for n in notes:
        on = int(round(n.onset * ticks_per_s))
        off = max(on + 1, int(round((n.onset + n.duration) * ticks_per_s)))
        p, v = int(np.clip(n.pitch, 0, 127)), int(np.clip(n.velocity, 1, 127))
        events.append((on, 1, bytes([0x90 | channel, p, v])))
        events.append((off, 0, bytes([0x80 | channel, p, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(b"\x00\xff\x51\x03" + (500000).to_bytes(3, "big"))  # tempo: 120 bpm
    track += b"\x00" + bytes([0xC0 | channel, program & 0x7F])
    last = 0
    for tick, _, msg in events:
        track += _vlq(tick - last) + msg
        last = tick
    track += b"\x00\xff\x2f\x00"  # end of track
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def find_fluidsynth(soundfont: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """``(fluidsynth binary, soundfont path)`` if both are installed, else ``None``.
    The soundfont is ``soundfont`` if given, else the first ``.sf2``/``.sf3`` (sorted by
    name, so the choice is stable) under :data:`SOUNDFONT_DIRS`."""
    binary = shutil.which("fluidsynth")
    if binary is None:
        return None
    if soundfont:
        return (binary, soundfont) if os.path.isfile(soundfont) else None
    for d in SOUNDFONT_DIRS:
        if os.path.isdir(d):
            found = sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in (".sf2", ".sf3"))
            if found:
                return binary, str(found[0])
    return None


def render_fluidsynth(notes: Sequence[Note], timbre: str, *, program: Optional[int] = None,
                      sample_rate: int = SAMPLE_RATE, soundfont: Optional[str] = None,
                      max_seconds: Optional[float] = None, peak: float = 0.9, timeout: float = 300.0) -> np.ndarray:
    """Render ``notes`` with fluidsynth using GM ``program`` of the family ``timbre`` (a name in
    :data:`GM_INSTRUMENTS`; default: its reference program); ``float32 [n]``."""
    import soundfile as sf

    found = find_fluidsynth(soundfont)
    if found is None:
        raise RenderError("renderer 'fluidsynth' needs the fluidsynth binary on PATH and a .sf2/.sf3 "
                          f"soundfont (given, or under {', '.join(SOUNDFONT_DIRS)})")
    binary, sf_path = found
    program = gm_program(timbre, program)
    with tempfile.TemporaryDirectory(prefix="mert-fluidsynth-") as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        with open(mid, "wb") as f:
            f.write(notes_to_midi(notes, program))
        cmd = [binary, "-ni", "-q", "-r", str(sample_rate), "-g", "0.8", "-T", "wav", "-F", wav, sf_path, mid]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RenderError(f"fluidsynth took more than {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.isfile(wav):
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RenderError(f"fluidsynth failed (exit {proc.returncode}): {msg[-1] if msg else 'no output'}")
        audio, sr = sf.read(wav, dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate)
    return finish(audio, sample_rate, max_seconds, peak)
