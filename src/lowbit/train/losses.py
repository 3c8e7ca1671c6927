"""Losses the papers train with: softmax cross-entropy and the squared hinge ("L2-SVM") loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "cross_entropy", "get", "squared_hinge"]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy in nats. ``output`` (N, C) or (N, T, C) for sequences."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def squared_hinge(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((max(0, 1 - y * output))^2)`` over all N x C entries, ``y = +1`` for the target class
    and ``-1`` elsewhere — the BNN / LAQ loss on a BN-normalised output layer (§2.8, §3.7)."""
    out = output.reshape(-1, output.shape[-1])
    y = F.one_hot(target.reshape(-1), out.shape[-1]).to(out.dtype) * 2 - 1
    return torch.clamp(1 - y * out, min=0).pow(2).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "squared_hinge": squared_hinge,
}


def get(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called ``name``; unknown names list the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]
