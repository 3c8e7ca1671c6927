"""Multi-layer perceptrons: the BNN/QNN 3x4096 and LAQ 3x2048 MNIST nets and a fast default."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.models._layers import activation
from lowbit.models.registry import register

__all__ = ["MLP"]


class MLP(nn.Module):
    """``input -> [dropout_in] -> n x [Linear(width) -> BN -> act -> dropout] -> Linear(classes) [-> BN]``.

    Layers are named ``fc0..fcN`` / ``bn0..bnN`` so ``lowbit.quantize``'s first/last rules and
    state dicts read naturally. ``bn_output`` adds a BatchNorm on the logits: the "L2-SVM" output
    that BNN and LAQ train with the squared hinge loss (§2.8, §3.7).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        widths: Sequence[int] = (1024, 1024),
        batchnorm: bool = True,
        bn_output: bool = False,
        act: str = "relu",
        dropout_in: float = 0.0,
        dropout: float = 0.0,
        bias: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        if dropout_in:
            layers["drop_in"] = nn.Dropout(dropout_in)
        fan_in = math.prod(self.input_shape)
        for i, w in enumerate(widths):
            layers[f"fc{i}"] = nn.Linear(fan_in, w, bias=bias)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm1d(w, eps=bn_eps, momentum=bn_momentum)
            layers[f"act{i}"] = activation(act)
            if dropout:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            fan_in = w
        n = len(widths)
        layers[f"fc{n}"] = nn.Linear(fan_in, num_classes, bias=bias)
        if bn_output:
            layers[f"bn{n}"] = nn.BatchNorm1d(num_classes, eps=bn_eps, momentum=bn_momentum)
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register(
    "mlp",
    "MLP, default 2x1024 BN-ReLU (options: widths, batchnorm, bn_output, act, dropout_in, dropout)",
    (1, 28, 28),
)(MLP)
register(
    "mlp_laq",
    "LAQ/LAB MNIST net: 3x2048 FC-BN-ReLU, FC-BN output for squared hinge (§3.7)",
    (1, 28, 28),
    widths=(2048, 2048, 2048),
    bn_output=True,
    bn_eps=1e-4,
)(MLP)
register(
    "mlp_bnn",
    "BNN/QNN MNIST net: dropout 0.2, 3x4096 FC-BN-hardtanh-dropout 0.5, FC-BN output (§2.8)",
    (1, 28, 28),
    widths=(4096, 4096, 4096),
    bn_output=True,
    act="hardtanh",
    dropout_in=0.2,
    dropout=0.5,
    bn_eps=1e-4,
)(MLP)
