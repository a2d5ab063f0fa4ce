"""In-batch noise mixture (MERT_SPEC.md §5.4).

With probability ``prob`` a clip gets ``U{min_count..max_count}`` segments of
``U{min_samples..max_samples}`` samples added to it at unit gain, each cut from
the *other* clips of the same batch (their concatenation, so a segment may run
across two of them). Nothing is rescaled: it is plain addition, as the
reference. The caller keeps the clean audio for the targets, which makes the
objective a denoising one.

Differences from the reference, on purpose: ``prob`` is the probability that a
clip *is* mixed (the reference mixes when ``rand > mixture_prob``; both are 0.5
in every released recipe), and padded samples of other clips are never used as
noise. A segment that does not fit (clip or pool shorter than the segment) is
skipped, where the reference's ``try/except`` leaves the whole clip clean.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import MERTError


def mix_in_batch_noise(
    wav: Tensor,
    prob: float = 0.5,
    min_samples: int = 12000,
    max_samples: int = 24000,
    min_count: int = 1,
    max_count: int = 3,
    lengths: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Return a noisy copy of ``wav`` [B, N]; ``wav`` itself is not modified.

    Args:
        wav: [B, N] clean clips.
        prob: probability that a clip receives noise.
        min_samples, max_samples: segment length range in samples (inclusive).
        min_count, max_count: segments per mixed clip (inclusive).
        lengths: optional [B] valid samples per clip (the rest is padding); noise
            is only taken from, and only added to, valid samples.
        generator: CPU random generator for reproducible draws.
    Returns:
        [B, N] tensor, same dtype and device as ``wav``.
    """
    if wav.dim() != 2:
        raise MERTError(f"wav must be [B, N], got shape {list(wav.shape)}")
    if not (0 < min_samples <= max_samples and 0 <= min_count <= max_count):
        raise MERTError("mixture ranges must satisfy 0 < min_samples <= max_samples and "
                        f"0 <= min_count <= max_count, got [{min_samples}, {max_samples}], "
                        f"[{min_count}, {max_count}]")
    bsz, num = wav.shape
    out = wav.clone()
    if bsz < 2 or prob <= 0:
        return out  # a batch of one has no other clip to borrow noise from
    lens = [num] * bsz if lengths is None else [int(v) for v in lengths.tolist()]

    def randint(lo: int, hi: int) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    for i in range(bsz):
        if torch.rand((), generator=generator).item() >= prob:
            continue
        pool = torch.cat([wav[j, : lens[j]] for j in range(bsz) if j != i])
        for _ in range(randint(min_count, max_count)):
            dur = randint(min_samples, max_samples)
            if dur > lens[i] or dur > pool.numel():
                continue
            # The reference draws the source start as if every segment had the
            # maximum length; fall back to the actual length for short pools.
            src_hi = pool.numel() - max_samples if pool.numel() >= max_samples else pool.numel() - dur
            src = randint(0, src_hi)
            dst = randint(0, lens[i] - dur)
            out[i, dst: dst + dur] += pool[src: src + dur]
    return out
