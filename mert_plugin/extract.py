"""Feature extraction for audio of any length in bounded memory.

Full attention over a whole track costs O(T^2) memory (the reference tries to
allocate ~90 GB for 10 minutes). Here a track is cut into fixed windows
(default: the 5 s pretraining context) that overlap, and the frames are stitched.

Stitching rule (see :func:`plan_windows`):

* windows start on frame boundaries (multiples of the 320-sample hop), so a
  window's frame ``t`` *is* global frame ``start + t`` -- no resampling of the
  frame grid, and the output has exactly as many frames as a full-length pass
  (``config.num_frames(N)``);
* consecutive windows overlap by ``overlap_seconds``; inside an overlap each
  frame is taken from the window in which it sits further from the edge (the
  split is at the middle of the overlap), so every frame away from the track's
  ends has at least ``overlap_seconds / 2`` of context on both sides;
* the last window is aligned to end at the track's last frame (it may be up to
  one hop shorter than the others);
* a track no longer than one window is encoded in one pass, exactly as
  ``model(waveform)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import MERTError


@dataclass(frozen=True)
class Window:
    """One window: input samples [sample_start, sample_end) and the global
    frames [keep_start, keep_end) it contributes; ``frame_offset`` is the global
    index of the window's frame 0."""

    sample_start: int
    sample_end: int
    frame_offset: int
    keep_start: int
    keep_end: int


def plan_windows(num_samples: int, window: int, overlap: int, hop: int = 320,
                 receptive_field: int = 400) -> List[Window]:
    """Plan windows over ``num_samples`` samples (all arguments in samples)."""
    if window < receptive_field:
        raise MERTError(f"window of {window} samples is shorter than the {receptive_field}-sample receptive field")
    if not 0 <= overlap < window:
        raise MERTError(f"overlap must be in [0, window), got {overlap} for window {window}")
    total = _frames(num_samples, hop, receptive_field)
    if total <= 0:
        raise MERTError(f"{num_samples} samples is shorter than one frame ({receptive_field} samples)")
    per_window = _frames(window, hop, receptive_field)
    if num_samples <= window or total <= per_window:
        return [Window(0, num_samples, 0, 0, total)]
    step = window_step(window, overlap, hop, per_window)
    last = total - per_window
    starts = list(range(0, last, step)) + [last]
    windows = []
    for j, a in enumerate(starts):
        keep_start = 0 if j == 0 else (a + starts[j - 1] + per_window) // 2
        keep_end = total if j == len(starts) - 1 else (starts[j + 1] + a + per_window) // 2
        windows.append(Window(a * hop, min(a * hop + window, num_samples), a, keep_start, keep_end))
    return windows


def window_step(window: int, overlap: int, hop: int, per_window: int) -> int:
    """Frames between window starts; never more than a window's ``per_window`` frames: with no
    overlap, a window of 120,000 samples steps 375 frames but computes 374, and the frame between
    would be lost."""
    return max(1, min((window - overlap) // hop, per_window))


def _frames(n: int, hop: int, rf: int) -> int:
    return (n - rf) // hop + 1 if n >= rf else 0


def _normalise_layers(layers: Optional[Sequence[int]], num_states: int) -> List[int]:
    if layers is None:
        return list(range(num_states))
    out = []
    for l in layers:
        idx = l + num_states if l < 0 else l
        if not 0 <= idx < num_states:
            raise MERTError(f"layer {l} out of range: the model has hidden states 0..{num_states - 1}")
        out.append(idx)
    return out


@torch.no_grad()
def iter_windows(model, waveform: Tensor, window_seconds: float = 5.0, overlap_seconds: float = 1.0,
                 layers: Optional[Sequence[int]] = None, batch_size: int = 4
                 ) -> Iterator[Tuple[int, int, Tensor]]:
    """Encode ``waveform`` [N] window by window.

    Yields ``(frame_start, frame_end, states)`` in order, with ``states`` shaped
    [len(layers), frame_end - frame_start, D]; the pieces tile
    ``[0, model.num_frames(N))`` exactly. Peak memory is that of one batch of
    windows, whatever the track length.
    """
    if waveform.dim() != 1:
        raise MERTError(f"expected a 1-D waveform, got shape {list(waveform.shape)}")
    cfg = model.config
    sel = _normalise_layers(layers, cfg.num_hidden_states)
    run_layers = max(sel)  # skip layers nobody asked for
    sr = cfg.sample_rate
    window = int(round(window_seconds * sr))
    overlap = int(round(overlap_seconds * sr))
    plan = plan_windows(waveform.numel(), window, overlap, cfg.hop_length, cfg.receptive_field)
    device = next(model.parameters()).device
    i = 0
    while i < len(plan):
        # Batch consecutive windows of equal length (all but possibly the last).
        length = plan[i].sample_end - plan[i].sample_start
        group = [plan[i]]
        while (i + len(group) < len(plan) and len(group) < batch_size
               and plan[i + len(group)].sample_end - plan[i + len(group)].sample_start == length):
            group.append(plan[i + len(group)])
        batch = torch.stack([waveform[w.sample_start:w.sample_end] for w in group]).to(device)
        states = model(batch, num_layers=run_layers).hidden_states
        stacked = torch.stack([states[l] for l in sel])  # [L, B, t, D]
        for b, w in enumerate(group):
            lo, hi = w.keep_start - w.frame_offset, w.keep_end - w.frame_offset
            yield w.keep_start, w.keep_end, stacked[:, b, lo:hi]
        i += len(group)


@torch.no_grad()
def extract_features(model, waveform: Tensor, layers: Optional[Sequence[int]] = None, pooling: str = "none",
                     window_seconds: float = 5.0, overlap_seconds: float = 1.0, batch_size: int = 4,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Hidden states of a track of any length.

    Returns [len(layers), T, D] for ``pooling="none"`` or [len(layers), D] for
    ``pooling="mean"`` (mean over time, as MARBLE probes; computed as a running
    sum so the per-frame features are never all held at once).
    """
    if pooling not in ("none", "mean"):
        raise MERTError(f"pooling must be 'none' or 'mean', got {pooling!r}")
    total = model.num_frames(waveform.numel())
    out = None
    for start, end, states in iter_windows(model, waveform, window_seconds, overlap_seconds, layers, batch_size):
        if pooling == "mean":
            part = states.double().sum(dim=1)
            out = part if out is None else out + part
        else:
            if out is None:
                out = torch.empty(states.shape[0], total, states.shape[2], dtype=out_dtype)
            out[:, start:end] = states.to(out_dtype).cpu()
    if pooling == "mean":
        out = (out / total).to(out_dtype).cpu()
    return out
