"""Audio of any length in bounded memory: block decoding and streaming windows.

:func:`decode_stream` yields a file as mono float32 chunks at the model's rate
(soundfile blocks -> channel mean -> streaming soxr, very high quality); the
samples are bit-identical to :func:`mert_plugin.audio.load_audio`'s.
:class:`StreamWindower` cuts that stream into exactly the windows of
:func:`mert_plugin.extract.plan_windows` without knowing the length in
advance: a window is released as soon as enough audio has arrived to be sure
it is not one of the last two (whose placement depends on the length), and
the rest when the stream ends. Memory is one window plus one hop of windows
plus one block, whatever the length of the track.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import numpy as np

from mert_plugin.audio import MIN_SAMPLES, check_audio_path
from mert_plugin.errors import AudioError
from mert_plugin.extract import Window, plan_windows, window_step

BLOCK_FRAMES = 1 << 16  # input frames read per block (~1.4 s at 44.1 kHz)


def decode_stream(path: str, sample_rate: int, block_frames: int = BLOCK_FRAMES,
                  min_samples: int = MIN_SAMPLES) -> Iterator[np.ndarray]:
    """Yield ``path`` as mono float32 chunks [n] at ``sample_rate``.

    Raises :class:`AudioError` naming the file for anything unusable (missing,
    a folder, unreadable, not audio, empty, NaN/Inf samples, shorter than
    ``min_samples`` after resampling) -- possibly after some chunks were yielded,
    so consumers must not treat output as final until the generator finishes.
    """
    import soundfile as sf
    import soxr

    path = check_audio_path(path)
    try:
        f = sf.SoundFile(path)
    except Exception as exc:  # LibsndfileError, RuntimeError, TypeError, OSError
        raise AudioError(f"{path}: cannot decode audio ({_reason(exc)})") from None
    total = 0
    with f:
        rate = f.samplerate
        if rate <= 0:
            raise AudioError(f"{path}: invalid sample rate {rate}")
        resampler = None if rate == sample_rate else soxr.ResampleStream(rate, sample_rate, 1, dtype="float32",
                                                                         quality="VHQ")
        while True:
            try:
                block = f.read(block_frames, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"{path}: cannot decode audio ({_reason(exc)})") from None
            last = block.shape[0] < block_frames
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            if not np.isfinite(mono).all():
                raise AudioError(f"{path}: contains NaN or infinite samples")
            chunk = mono if resampler is None else resampler.resample_chunk(mono, last=last)
            if chunk.shape[0]:
                total += chunk.shape[0]
                yield np.ascontiguousarray(chunk, dtype=np.float32)
            if last:
                break
    if total == 0:
        raise AudioError(f"{path}: contains no samples")
    if total < min_samples:
        raise AudioError(f"{path}: too short: {total} samples at {sample_rate} Hz ({total / sample_rate * 1000:.1f} "
                         f"ms); at least {min_samples} ({min_samples / sample_rate * 1000:.1f} ms) are needed "
                         "for one frame")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class StreamWindower:
    """Release the windows of ``plan_windows(N, window, overlap, hop, rf)`` from a stream.

    ``push(chunk)`` and then ``finish()`` return lists of ``(Window, samples)``;
    ``samples`` is the window's audio [sample_end - sample_start]. Concatenated
    over both calls they are exactly ``plan_windows(N, ...)`` for the total N.
    """

    def __init__(self, window: int, overlap: int, hop: int, receptive_field: int):
        self.window, self.overlap, self.hop, self.rf = window, overlap, hop, receptive_field
        self.per_window = (window - receptive_field) // hop + 1
        self.step = window_step(window, overlap, hop, self.per_window)  # as plan_windows
        plan_windows(max(window, receptive_field), window, overlap, hop, receptive_field)  # validates arguments
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0      # global index of _buf[0]
        self._received = 0       # samples pushed so far
        self._released: List[Window] = []

    @property
    def num_samples(self) -> int:
        return self._received

    def push(self, chunk: np.ndarray) -> List[Tuple[Window, np.ndarray]]:
        self._buf = np.concatenate([self._buf, chunk.astype(np.float32, copy=False)])
        self._received += chunk.shape[0]
        out = []
        frames_known = (self._received - self.rf) // self.hop + 1 if self._received >= self.rf else 0
        while True:
            j = len(self._released)
            a = j * self.step
            # Window j is a regular one (neither of the last two) iff the track has
            # more than a + step + per_window frames; frames only grow, so once true it stays true.
            if frames_known <= a + self.step + self.per_window:
                break
            keep_start = 0 if j == 0 else (a + (a - self.step) + self.per_window) // 2
            keep_end = (a + self.step + a + self.per_window) // 2
            w = Window(a * self.hop, a * self.hop + self.window, a, keep_start, keep_end)
            out.append((w, self._slice(w)))
            self._released.append(w)
            self._drop_before((a + self.step) * self.hop)
        return out

    def finish(self) -> List[Tuple[Window, np.ndarray]]:
        """The remaining windows, once the stream has ended (raises for < one frame)."""
        if self._received < self.rf:
            raise AudioError(f"{self._received} samples is shorter than one frame ({self.rf} samples)")
        plan = plan_windows(self._received, self.window, self.overlap, self.hop, self.rf)
        done = len(self._released)
        if plan[:done] != self._released:  # would be a bug in the release rule above
            raise RuntimeError(f"streamed windows diverged from plan_windows for {self._received} samples")
        out = [(w, self._slice(w)) for w in plan[done:]]
        self._released = plan
        return out

    def _slice(self, w: Window) -> np.ndarray:
        lo = w.sample_start - self._buf_start
        return self._buf[lo:w.sample_end - self._buf_start].copy()

    def _drop_before(self, sample: int) -> None:
        if sample > self._buf_start:
            self._buf = self._buf[sample - self._buf_start:]
            self._buf_start = sample
