"""Building blocks of the MERT encoder.

Each module has one job; attribute names mirror the Hugging Face HuBERT
state-dict keys (``feature_extractor.conv_layers.0.conv.weight``, ...) so that a
released checkpoint loads with ``load_state_dict`` and no renaming.

Shapes use B = batch, N = samples, C = conv channels, T = frames, D = hidden size.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MERTConfig


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> optional GroupNorm(C, C) -> exact GELU.

    GroupNorm with one group per channel normalises each channel over the whole
    time axis, so its output depends on padding (see README, "Padding").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 bias: bool, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.GroupNorm(out_channels, out_channels, affine=True) if group_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, N] -> [B, C_out, N']"""
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)


class ConvFeatureExtractor(nn.Module):
    """Seven strided convolutions: waveform [B, N] -> features [B, C, T] (hop 320)."""

    def __init__(self, config: MERTConfig):
        super().__init__()
        layers = []
        in_ch = 1
        for i, (dim, k, s) in enumerate(zip(config.conv_dim, config.conv_kernel, config.conv_stride)):
            layers.append(ConvLayer(in_ch, dim, k, s, config.conv_bias, group_norm=(i == 0)))
            in_ch = dim
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, waveform: Tensor) -> Tensor:
        """[B, N] -> [B, C, T]"""
        x = waveform.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    """LayerNorm(C) -> Linear(C, D) -> dropout: [B, T, C] -> [B, T, D]."""

    def __init__(self, config: MERTConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: Tensor) -> Tensor:
        return self.dropout(self.projection(self.layer_norm(features)))


class WeightNormConv1d(nn.Conv1d):
    """Conv1d whose weight is ``g * v / ||v||`` with the norm over dims (0, 1).

    This is ``torch.nn.utils.weight_norm(conv, dim=2)`` as fairseq and HF use it
    for the positional convolution, written out so that the parameters carry
    the hub's names (``weight_g`` [1, 1, K], ``weight_v`` [D, D/G, K]) and the
    module exports to ONNX without parametrisation hooks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        w = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(w.clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(w, dim=(0, 1), keepdim=True))

    def effective_weight(self) -> Tensor:
        norm = torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class ConvPositionalEmbedding(nn.Module):
    """Grouped, weight-normed Conv1d(D, D, K, pad K/2) -> drop last frame if K even -> GELU.

    [B, T, D] -> [B, T, D]; the caller adds the result to its input.
    """

    def __init__(self, config: MERTConfig):
        super().__init__()
        k = config.num_conv_pos_embeddings
        self.conv = WeightNormConv1d(config.hidden_size, config.hidden_size, kernel_size=k,
                                     padding=k // 2, groups=config.num_conv_pos_embedding_groups)
        self.remove_last = k % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.remove_last:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Separate q/k/v/out projections with bias (HF key names). [B, T, D] -> [B, T, D].
    ``attn_mask`` is a boolean [B, 1, 1, T] mask, True where a key may be attended.
    """

    def __init__(self, config: MERTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        # Opt-in PB-relax guard for fp16 training (0 = off). See relax_attention().
        self.relax_alpha = 0.0

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        b, t, d = x.shape
        # One GEMM for q, k and v: same numbers as three, less overhead.
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, w, bias).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        p = self.dropout if self.training else 0.0
        if self.relax_alpha > 0:
            out = relax_attention(q, k, v, attn_mask, self.relax_alpha, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


def relax_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alpha: float,
                    dropout_p: float = 0.0) -> Tensor:
    """PB-relax attention (CogView): an fp16 overflow guard, mathematically plain attention.

    The scores are computed as ``((q / (alpha*sqrt(d))) k^T)``, i.e. scaled down
    *before* the matmul so fp16 cannot overflow inside it, then the row-wise
    maximum is subtracted and the result scaled back by ``alpha`` before the
    softmax. MERT's released code intended this (``attention_relax``) but its
    version divides only after the matmul and crashes (``torch.max`` returns a
    namedtuple); this is the corrected form. [B, H, T, hd] -> [B, H, T, hd].
    """
    scale = 1.0 / (alpha * math.sqrt(q.shape[-1]))
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    scores = (scores - scores.amax(dim=-1, keepdim=True).detach()) * alpha
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


class FeedForward(nn.Module):
    """Linear(D, F) -> GELU -> dropout -> Linear(F, D) -> dropout: [B, T, D] -> [B, T, D]."""

    def __init__(self, config: MERTConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """One transformer block, post-LN (MERT-v1-95M, v0) or pre-LN (MERT-v1-330M).

    post-LN: ``x = LN1(x + drop(MHA(x)))``; ``x = LN2(x + FFN(x))``
    pre-LN:  ``x = x + drop(MHA(LN1(x)))``; ``x = x + FFN(LN2(x))``
    [B, T, D] -> [B, T, D].
    """

    def __init__(self, config: MERTConfig):
        super().__init__()
        self.pre_ln = config.do_stable_layer_norm
        self.attention = SelfAttention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), attn_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    """Positional conv + LN placement + L layers; returns the L+1 hidden states.

    ``hidden_states[0]`` is the encoder input after the positional conv (and,
    for post-LN, after the encoder LayerNorm); ``hidden_states[i]`` is the output
    of layer i. In the pre-LN case only the last state is layer-normed, exactly
    as ``transformers.HubertEncoderStableLayerNorm``.
    """

    def __init__(self, config: MERTConfig):
        super().__init__()
        self.pre_ln = config.do_stable_layer_norm
        self.layerdrop = config.layerdrop
        self.pos_conv_embed = ConvPositionalEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, frame_mask: Optional[Tensor] = None,
                num_layers: Optional[int] = None) -> List[Tensor]:
        """x [B, T, D], frame_mask [B, T] (True = valid) -> list of [B, T, D].

        ``num_layers`` stops after that many layers (fewer states, less compute).
        """
        attn_mask = None
        if frame_mask is not None:
            x = x.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
            attn_mask = frame_mask[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = self.dropout(x)
        n = len(self.layers) if num_layers is None else num_layers
        states = [x]
        for i, layer in enumerate(self.layers[:n]):
            if not (self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop):
                x = layer(x, attn_mask)
            if self.pre_ln and i == len(self.layers) - 1:
                x = self.layer_norm(x)
            states.append(x)
        return states
