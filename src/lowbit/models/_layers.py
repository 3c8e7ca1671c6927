"""Small helpers shared by the reference models."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["activation", "flat_features"]


def activation(name: str) -> nn.Module:
    """``relu`` (LAQ, TTQ), ``hardtanh`` (BNN: the 1{|x|<=1} gate before the sign) or ``identity``."""
    if name == "relu":
        return nn.ReLU()
    if name == "hardtanh":
        return nn.Hardtanh()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; valid: relu, hardtanh, identity")


@torch.no_grad()
def flat_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features ``features`` produces for one sample of ``input_shape`` (a dry run)."""
    was = features.training
    features.eval()
    try:
        out = features(torch.zeros(1, *input_shape))
    finally:
        features.train(was)
    return math.prod(out.shape[1:])
