"""Learnable weighting of a frozen encoder's hidden states (SUPERB/MARBLE style)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightedLayerSum(nn.Module):
    """``[L, B, T, D]`` -> ``[B, T, D]``: softmax-weighted sum over the L states.

    The weights start equal (zeros before the softmax). ``layer_norm`` normalises
    each state first, which matters for pre-LN encoders (MERT-v1-330M) whose
    intermediate states have very different scales.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.layer_norm = layer_norm

    def forward(self, states: Tensor) -> Tensor:
        if states.dim() != 4 or states.shape[0] != self.weights.numel():
            raise ValueError(f"expected [{self.weights.numel()}, B, T, D] hidden states, got {list(states.shape)}")
        if self.layer_norm:
            states = nn.functional.layer_norm(states, states.shape[-1:])
        w = torch.softmax(self.weights, dim=0).to(states.dtype)
        return torch.einsum("l,lbtd->btd", w, states)

    def layer_weights(self) -> Tensor:
        """The current softmax weights [L] (for logging)."""
        return torch.softmax(self.weights.detach(), dim=0)


def count_hidden_states(encoder) -> int:
    """How many states a ``MERTEncoder`` with ``output_all_hiddens`` returns (for the yaml)."""
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, (list, tuple)):
        return len(layers)
    if isinstance(layers, int):
        raise ValueError("the encoder returns a single layer (layers is an int); no weighting to learn")
    return encoder.config.num_hidden_states
