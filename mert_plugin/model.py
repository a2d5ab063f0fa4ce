"""The MERT encoder: conv feature extractor + projection + transformer.

``MERTModel(config)(waveform)`` returns the same ``last_hidden_state`` and
``hidden_states`` as ``transformers.HubertModel`` with MERT weights (checked to
1e-5 by the tests), without importing ``transformers``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .components import ConvFeatureExtractor, FeatureProjection, TransformerEncoder
from .config import MERTConfig
from .errors import MERTError


@dataclass
class MERTOutput:
    """Encoder outputs.

    last_hidden_state: [B, T, D]
    hidden_states: tuple of L+1 tensors [B, T, D] (HF semantics; see TransformerEncoder)
    frame_mask: [B, T] bool, True for frames computed from real (non-padded) audio; None without padding
    conv_features: [B, T, C] raw conv features before the projection (for the feature penalty)
    """

    last_hidden_state: Tensor
    hidden_states: Tuple[Tensor, ...]
    frame_mask: Optional[Tensor] = None
    conv_features: Optional[Tensor] = None


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class MERTModel(nn.Module):
    """MERT / HuBERT encoder over raw mono audio at ``config.sample_rate``.

    Example::

        model = MERTModel.from_pretrained("path/to/MERT-v1-95M").eval()
        out = model(wav)                      # wav: [B, N] float at 24 kHz
        out.hidden_states[6]                  # [B, T, 768], T = 75 frames/s
    """

    def __init__(self, config: MERTConfig):
        super().__init__()
        self.config = config.validate()
        self.feature_extractor = ConvFeatureExtractor(config)
        self.feature_projection = FeatureProjection(config)
        if config.mask_time_prob > 0:
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        else:
            self.register_parameter("masked_spec_embed", None)
        self.encoder = TransformerEncoder(config)
        # Gradient scale into the conv stem during pretraining (fairseq feature_grad_mult).
        self.feature_grad_mult = 1.0

    # -------------------------------------------------------------- properties
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    def num_frames(self, num_samples: int) -> int:
        return self.config.num_frames(num_samples)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        waveform: Tensor,
        padding_mask: Optional[Tensor] = None,
        mask_time_indices: Optional[Tensor] = None,
        num_layers: Optional[int] = None,
    ) -> MERTOutput:
        """Encode audio.

        Args:
            waveform: [B, N] (or [N]) mono float audio at ``self.sample_rate``.
            padding_mask: optional [B, N] bool, True at padded samples (fairseq
                convention). Padded frames are zeroed before the encoder and
                excluded as attention keys; note that the GroupNorm of conv 0
                still sees the padding (same as the reference).
            mask_time_indices: optional [B, T] bool; those frames are replaced by
                the learned mask embedding (pretraining).
            num_layers: run only the first ``num_layers`` transformer layers.
        Returns:
            :class:`MERTOutput`.
        """
        waveform = self._check_waveform(waveform)
        features = self.feature_extractor(waveform).transpose(1, 2)  # [B, T, C]
        if self.training and self.feature_grad_mult != 1.0:
            features = _GradMultiply.apply(features, self.feature_grad_mult)
        frame_mask = None
        if padding_mask is not None:
            frame_mask = self._frame_mask(padding_mask, waveform.shape, features.shape[1])
        hidden = self.feature_projection(features)
        if mask_time_indices is not None:
            if self.masked_spec_embed is None:
                raise MERTError("this model has no mask embedding (config.mask_time_prob == 0)")
            if mask_time_indices.shape != hidden.shape[:2]:
                raise MERTError(f"mask_time_indices must be [B, T] = {list(hidden.shape[:2])}, "
                                f"got {list(mask_time_indices.shape)}")
            hidden = torch.where(mask_time_indices.unsqueeze(-1), self.masked_spec_embed.to(hidden.dtype), hidden)
        if num_layers is not None and not 0 <= num_layers <= self.config.num_hidden_layers:
            raise MERTError(f"num_layers must be in [0, {self.config.num_hidden_layers}], got {num_layers}")
        states = self.encoder(hidden, frame_mask, num_layers)
        return MERTOutput(states[-1], tuple(states), frame_mask, features)

    def _check_waveform(self, waveform: Tensor) -> Tensor:
        if not isinstance(waveform, Tensor):
            raise MERTError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
        if waveform.dim() == 1:
            waveform = waveform.unsqueeze(0)
        if waveform.dim() != 2:
            raise MERTError(f"waveform must be [batch, samples] (mono), got shape {list(waveform.shape)}")
        if not waveform.is_floating_point():
            raise MERTError(f"waveform must be floating point, got {waveform.dtype}")
        rf = self.config.receptive_field
        if waveform.shape[1] < rf:
            raise MERTError(f"waveform has {waveform.shape[1]} samples; at least {rf} "
                            f"({rf / self.sample_rate * 1000:.1f} ms at {self.sample_rate} Hz) are needed")
        return waveform

    def _frame_mask(self, padding_mask: Tensor, wav_shape, num_frames: int) -> Tensor:
        if padding_mask.shape != wav_shape:
            raise MERTError(f"padding_mask must match the waveform shape {list(wav_shape)}, "
                            f"got {list(padding_mask.shape)}")
        lengths = (~padding_mask.bool()).sum(-1)
        out_len = conv_output_lengths(lengths, self.config)
        return torch.arange(num_frames, device=lengths.device)[None, :] < out_len[:, None]

    # ----------------------------------------------------------- initialisation
    def reset_parameters(self) -> None:
        """Initialise for pretraining from scratch, as fairseq's wav2vec2/HuBERT/MERT."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv1d) and name.startswith("feature_extractor"):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        conv = self.encoder.pos_conv_embed.conv
        std = math.sqrt(4.0 / (conv.kernel_size[0] * self.config.hidden_size))
        with torch.no_grad():
            conv.weight_v.normal_(0.0, std)
            conv.weight_g.copy_(torch.linalg.vector_norm(conv.weight_v, dim=(0, 1), keepdim=True))
            nn.init.zeros_(conv.bias)
            if self.masked_spec_embed is not None:
                self.masked_spec_embed.uniform_()

    # ------------------------------------------------------------------- I/O
    @classmethod
    def from_pretrained(cls, path_or_id: str, strict_config: bool = True, map_location="cpu", *,
                        revision: Optional[str] = None, cache_dir: Optional[str] = None,
                        local_files_only: bool = False, token=None, force_download: bool = False) -> "MERTModel":
        """Load a local HF folder, a hub id (``m-a-p/MERT-v1-95M``: downloaded through
        ``huggingface_hub`` when online, read from the HF cache otherwise or with
        ``HF_HUB_OFFLINE=1``; ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
        ``force_download`` as in ``transformers``), a fairseq ``.pt`` checkpoint or a
        SpeechBrain recipe checkpoint folder. See :func:`mert_plugin.checkpoint.load_checkpoint`."""
        from .checkpoint import load_checkpoint

        config, state = load_checkpoint(path_or_id, strict_config=strict_config, map_location=map_location,
                                        revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                        token=token, force_download=force_download)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def from_preset(cls, name: str, seed: Optional[int] = None) -> "MERTModel":
        """A randomly initialised model of a preset geometry (``mert-tiny``, ``mert-v1-95m``, ...)."""
        return cls.from_config(MERTConfig.from_preset(name), seed)

    @classmethod
    def from_config(cls, config: MERTConfig, seed: Optional[int] = None) -> "MERTModel":
        """A randomly initialised model of ``config``'s geometry; with ``seed``, the same weights as
        :meth:`from_preset` with that seed for the preset of the same geometry."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.reset_parameters()
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts HF (``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``) key names."""
        from .checkpoint import normalise_state_dict

        return super().load_state_dict(normalise_state_dict(state_dict, self), strict=strict, assign=assign)

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        """Write ``config.json`` + ``model.safetensors`` loadable by plain
        ``transformers.HubertModel.from_pretrained`` (no remote code)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, safe_serialization=safe_serialization)


def conv_output_lengths(lengths: Tensor, config: MERTConfig) -> Tensor:
    """Frames produced by ``lengths`` samples (the conv length formula), elementwise."""
    out = lengths
    for k, s in zip(config.conv_kernel, config.conv_stride):
        out = torch.div(out - k, s, rounding_mode="floor") + 1
    return out.clamp(min=0)
