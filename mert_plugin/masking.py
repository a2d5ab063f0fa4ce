"""Span masking for masked prediction (fairseq ``compute_mask_indices``, static mode).

MERT masks the student's frames as HuBERT does (MERT_SPEC.md §5.3): each clip
gets ``num_mask = int(mask_prob * T / mask_length + U[0, 1))`` spans (at least
``min_masks``) of ``mask_length`` frames whose starts are drawn *without
replacement* from ``T - mask_length`` positions. Spans may overlap, so with
``mask_prob = 0.8`` and ``mask_length = 5`` about 58 % of the frames of a 5 s
clip end up masked (the often quoted ``1 - exp(-0.8) ~ 55 %`` ignores that the
starts are distinct), not 80 %.

As in the reference (which passes an all-False padding mask to fairseq), every
clip draws its own span count from its own valid length; with
``require_same_masks`` (fairseq's default, on in MERT) every clip is then
trimmed to the batch's smallest masked count by un-masking random frames, so
about 54 % of the frames of a 5 s batch of 16 are masked, not 58 %.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .errors import MERTError


def compute_span_mask(
    shape: Tuple[int, int],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 2,
    frame_mask: Optional[Tensor] = None,
    require_same_masks: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Draw span masks.

    Args:
        shape: (B, T) frames.
        mask_prob: expected fraction of frames that *start* a span, times ``mask_length``.
        mask_length: frames per span.
        min_masks: at least this many spans per clip.
        frame_mask: optional [B, T] bool, True at valid (non-padded) frames; spans
            are drawn inside each clip's valid prefix only.
        require_same_masks: trim every clip to the smallest masked-frame count of
            the batch by un-masking random frames (fairseq's ``require_same_masks``).
        generator: CPU random generator (``torch.Generator``) for reproducible masks.
        device: device of the returned mask.
    Returns:
        [B, T] bool, True = masked.
    """
    bsz, total = int(shape[0]), int(shape[1])
    if mask_length < 1:
        raise MERTError(f"mask_length must be >= 1, got {mask_length}")
    if not 0.0 <= mask_prob <= 1.0:
        raise MERTError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if frame_mask is not None:
        if tuple(frame_mask.shape) != (bsz, total):
            raise MERTError(f"frame_mask must be [B, T] = {[bsz, total]}, got {list(frame_mask.shape)}")
        sizes = frame_mask.bool().sum(-1).tolist()
    else:
        sizes = [total] * bsz

    def span_count(size: int) -> int:
        return max(min_masks, int(mask_prob * size / mask_length + torch.rand((), generator=generator).item()))

    mask = torch.zeros(bsz, total, dtype=torch.bool)
    for i, size in enumerate(sizes):
        if size <= 0:
            continue
        count = span_count(size)
        # Starts leave room for one full span before the end; a clip too short for
        # `count` such starts draws from `count + 1` positions instead (fairseq's
        # fallback), and spans are clipped at the clip's end.
        room = size - mask_length
        if room <= count:
            room = count + 1
        starts = torch.randperm(room, generator=generator)[:count]
        frames = (starts[:, None] + torch.arange(mask_length)[None, :]).flatten()
        mask[i, frames[frames < size]] = True
    if require_same_masks and bsz > 1:
        counts = mask.sum(-1)
        keep = int(counts.min())
        for i in range(bsz):
            if counts[i] > keep:
                idx = mask[i].nonzero()[:, 0]
                drop = idx[torch.randperm(idx.numel(), generator=generator)[: int(counts[i]) - keep]]
                mask[i, drop] = False
    return mask.to(device) if device is not None else mask
