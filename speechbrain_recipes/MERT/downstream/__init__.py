"""Clip classification with a frozen MERT encoder under a learnable layer weighting."""
