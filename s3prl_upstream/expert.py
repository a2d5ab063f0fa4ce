"""s3prl ``UpstreamExpert`` for MERT.

s3prl hands an upstream a list of unpadded 16 kHz waveforms and expects, for
each feature key, a list of ``[B, T, D]`` tensors plus an integer
``get_downsample_rates(key)`` in 16 kHz samples per frame. MERT-v1 runs at
24 kHz with a 320-sample hop (75 Hz = 213.33 samples at 16 kHz), so this
expert:

1. resamples each clip 16 kHz -> model rate with ``torchaudio.functional.resample``
   (the resampler of the official MERT examples and of s3prl's passt upstream;
   differentiable, runs on the clip's device). MERT-v0 is 16 kHz: no resampling.
2. runs :class:`mert_plugin.MERTModel` once per group of equal-length clips, so
   no clip is ever padded: conv 0's GroupNorm normalises over the whole
   (padded) signal, so a padded batch would change the shorter clips' features.
3. reports ``int`` 213 and fits each clip's output to ``ceil(n / 213)`` frames
   (``len(range(0, n, 213))``, what ``s3prl.nn.S3PRLUpstream`` expects) by
   repeating its last frame; the model yields 1-2 frames fewer. The batch is
   zero-padded to the longest clip, i.e. exactly ``len(range(0, max_len, 213))``
   frames, which keeps the runner's Featurizer (``round(n / 213)``, tolerance
   < 5 frames) and ``S3PRLUpstream`` within tolerance at any clip length.
   Cost: frame ``k`` sits at ``k / 75`` s, s3prl assumes ``k * 213 / 16000`` s,
   a 0.16 % drift (7 frames at 60 s) that only frame-level tasks can notice.

This file has the layout of ``s3prl/upstream/<name>/expert.py`` and can be
copied into a fork of s3prl unchanged (it only needs ``mert_plugin``).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from mert_plugin import MERTConfig, MERTModel
from mert_plugin.errors import CheckpointError, ConfigError, MERTError

S3PRL_SAMPLE_RATE = 16000


class UpstreamExpert(nn.Module):
    """MERT as an s3prl upstream.

    Args:
        ckpt: checkpoint to load with :meth:`MERTModel.from_pretrained` (an HF
            folder, a hub id already in the local HF cache, a fairseq ``.pt``
            or a SpeechBrain recipe ``CKPT+...`` folder); or, with
            ``model_config``, a weights file (``.safetensors`` or a torch state dict).
        model_config: optional ``config.json`` (s3prl's ``-g``) describing the
            geometry of the weights in ``ckpt``.
        expected_preset: if set (``"mert-v1-95m"``, ...), refuse checkpoints of
            another geometry with a clear error.
        feature_grad_mult: gradient scale into the conv stem when fine-tuning
            (``-f``); 0 freezes it, as s3prl's hubert/wav2vec2 upstreams and
            fairseq's fine-tuning recipes do.
        normalize_wav: scale each clip to zero mean and unit variance at the
            model rate, as the HF processor of MERT-v0 does (``do_normalize``);
            the MERT-v1 processors do not.

    ``forward(wavs)``: list of B 1-D float tensors at 16 kHz (any lengths) ->
    ``{"hidden_states": [L+1 x [B, T, D]], "last_hidden_state": [B, T, D],
    "hidden_state_{i}": [B, T, D]}`` with ``T = ceil(max_len / downsample_rate)``.
    """

    def __init__(self, ckpt: Optional[str] = None, model_config: Optional[str] = None,
                 expected_preset: Optional[str] = None, feature_grad_mult: float = 0.0,
                 normalize_wav: bool = False):
        super().__init__()
        self.model = load_model(ckpt, model_config)
        if expected_preset is not None:
            check_geometry(self.model.config, expected_preset, source=ckpt)
        # A constant number of hidden states in train and eval mode (s3prl's
        # weighted sum needs it); dropout stays as configured for fine-tuning.
        self.model.encoder.layerdrop = 0.0
        self.model.feature_grad_mult = float(feature_grad_mult)
        self.normalize_wav = bool(normalize_wav)
        self.sample_rate = self.model.sample_rate
        self.downsample_rate = round(self.model.hop_length * S3PRL_SAMPLE_RATE / self.sample_rate)
        self._resample = self.sample_rate != S3PRL_SAMPLE_RATE
        if self._resample:
            from mert_plugin.compat import ensure_torchaudio_importable

            ensure_torchaudio_importable()
            import torchaudio.functional as AF

            self._resample_fn = AF.resample

    def get_downsample_rates(self, key: str) -> int:
        """Input samples at 16 kHz per output frame, for every key (213 for MERT-v1, 320 for v0)."""
        return self.downsample_rate

    def num_output_frames(self, num_samples: int) -> int:
        """Frames returned for a clip of ``num_samples`` at 16 kHz: ``len(range(0, n, rate))``."""
        return math.ceil(num_samples / self.downsample_rate)

    def forward(self, wavs: Sequence[Tensor]) -> Dict[str, object]:
        wavs = self._check_wavs(wavs)
        num_states = self.model.config.num_hidden_states
        per_clip: List[List[Optional[Tensor]]] = [[None] * len(wavs) for _ in range(num_states)]
        for length, idx in _group_by_length(wavs).items():
            group = torch.stack([wavs[i] for i in idx])  # [g, n] at 16 kHz
            states = self.model(self._to_model_rate(group)).hidden_states  # L+1 x [g, T, D]
            frames = self.num_output_frames(length)
            for layer, state in enumerate(states):
                fitted = _fit_frames(state, frames)
                for j, i in enumerate(idx):
                    per_clip[layer][i] = fitted[j]
        hidden_states = [pad_sequence(clips, batch_first=True) for clips in per_clip]
        out: Dict[str, object] = {"hidden_states": hidden_states, "last_hidden_state": hidden_states[-1]}
        for i, state in enumerate(hidden_states):
            out[f"hidden_state_{i}"] = state
        return out

    # ---------------------------------------------------------------- helpers
    def _to_model_rate(self, wav: Tensor) -> Tensor:
        """[g, n] at 16 kHz -> [g, N] at the model rate (optionally normalised), at least one frame long."""
        if self._resample:
            wav = self._resample_fn(wav, S3PRL_SAMPLE_RATE, self.sample_rate)
        if self.normalize_wav:  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm, per clip
            mean = wav.mean(dim=-1, keepdim=True)
            wav = (wav - mean) / torch.sqrt(wav.var(dim=-1, unbiased=False, keepdim=True) + 1e-7)
        short = self.model.config.receptive_field - wav.shape[-1]
        if short > 0:
            # Shorter than one frame (< 16.7 ms): zero-pad to one frame, as
            # S3PRLUpstream pads clips under 0.05 s, instead of failing the batch.
            wav = nn.functional.pad(wav, (0, short))
        return wav

    def _check_wavs(self, wavs: Sequence[Tensor]) -> List[Tensor]:
        if isinstance(wavs, Tensor) or not isinstance(wavs, (list, tuple)):
            shape = list(wavs.shape) if isinstance(wavs, Tensor) else type(wavs).__name__
            raise MERTError(f"the MERT upstream takes a list of 1-D waveforms at 16 kHz (s3prl's upstream "
                            f"interface), got {shape}")
        if not wavs:
            raise MERTError("the MERT upstream got an empty list of waveforms")
        dtype = next(self.model.parameters()).dtype
        out = []
        for i, wav in enumerate(wavs):
            if not isinstance(wav, Tensor) or wav.dim() != 1:
                what = list(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
                raise MERTError(f"waveform {i}: expected a 1-D tensor of 16 kHz samples, got {what}")
            if wav.numel() == 0:
                raise MERTError(f"waveform {i}: contains no samples")
            if not wav.is_floating_point():
                raise MERTError(f"waveform {i}: expected float samples, got {wav.dtype}")
            if not torch.isfinite(wav).all():
                raise MERTError(f"waveform {i}: contains NaN or infinite samples")
            out.append(wav.to(dtype))
        return out


# -------------------------------------------------------------------- loading
def load_model(ckpt: Optional[str], model_config: Optional[str] = None) -> MERTModel:
    """Build the MERT model for ``ckpt`` (and optional s3prl ``-g`` config file)."""
    if model_config is None:
        if not ckpt:
            raise CheckpointError("no checkpoint given: pass -k <HF folder | fairseq .pt | SpeechBrain CKPT folder>")
        return MERTModel.from_pretrained(ckpt)
    from mert_plugin.checkpoint import _load_state_file

    config = MERTConfig.from_json_file(model_config)
    if not ckpt:
        raise CheckpointError(f"-g {model_config} describes the geometry only; pass the weights with -k "
                              f"(a .safetensors file or a torch state dict)")
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"{ckpt}: with -g, -k must be a weights file (.safetensors, .bin, .pt, .ckpt)")
    model = MERTModel(config)
    try:
        model.load_state_dict(_load_state_file(ckpt, "cpu"))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt}: weights do not match {model_config} ({first})") from None
    return model.eval()


_GEOMETRY = ("sample_rate", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "do_stable_layer_norm")


def check_geometry(config: MERTConfig, preset: str, source: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` unless ``config`` has the geometry of ``preset``."""
    want = MERTConfig.from_preset(preset)
    diff = [f"{k} {getattr(config, k)} (expected {getattr(want, k)})" for k in _GEOMETRY
            if getattr(config, k) != getattr(want, k)]
    if diff:
        raise ConfigError(f"{source or 'checkpoint'}: not a {preset} checkpoint: {', '.join(diff)}; "
                          f"use the 'mert' upstream for checkpoints of any geometry")


# ------------------------------------------------------------------ batching
def _group_by_length(wavs: Sequence[Tensor]) -> "OrderedDict[int, List[int]]":
    """Clip indices grouped by length (first-seen order): each group runs unpadded."""
    groups: "OrderedDict[int, List[int]]" = OrderedDict()
    for i, wav in enumerate(wavs):
        groups.setdefault(int(wav.shape[0]), []).append(i)
    return groups


def _fit_frames(x: Tensor, frames: int) -> Tensor:
    """[B, T, D] -> [B, frames, D]: trim, or repeat the last frame (as S3PRLUpstream does)."""
    t = x.shape[1]
    if t >= frames:
        return x[:, :frames]
    return torch.cat([x, x[:, -1:].expand(-1, frames - t, -1)], dim=1)
