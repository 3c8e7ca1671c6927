"""CIFAR ResNet-20/32/44/56, the pre-activation variant TTQ trains (§1.5).

Mirrors tensorpack's ``cifar10-resnet.py``: ``conv0`` 3x3x16 + BN-ReLU; three stages of ``n``
pre-activation blocks (BN-ReLU-conv-BN-ReLU-conv; the first block takes conv0's activated
output as is) with 16/32/64 channels; down-sampling blocks use stride 2 and an option-A
shortcut (2x2 average pool, then zero channels padded half before, half after); ``bnlast`` BN-ReLU,
global average pool, ``linear`` to the classes. Conv init normal(0, sqrt(2 / (9 C_out))), no conv biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.registry import register

__all__ = ["PreActBlock", "ResNetCifar"]


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (9 * c_out)))
    return conv


class PreActBlock(nn.Module):
    """One pre-activation residual block with an option-A shortcut when it down-samples."""

    def __init__(self, c_in: int, increase_dim: bool = False, first: bool = False) -> None:
        super().__init__()
        c_out = 2 * c_in if increase_dim else c_in
        self.increase_dim = increase_dim
        self.pad = c_in // 2
        self.bn1 = None if first else nn.BatchNorm2d(c_in)
        self.conv1 = _conv(c_in, c_out, 2 if increase_dim else 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = x if self.bn1 is None else F.relu(self.bn1(x))
        c2 = self.conv2(F.relu(self.bn2(self.conv1(b1))))
        shortcut = x
        if self.increase_dim:
            shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, self.pad, self.pad))
        return c2 + shortcut


class ResNetCifar(nn.Module):
    """Pre-activation ResNet for 32x32 images; ``depth = 6n + 2`` (20, 32, 44, 56, 110)."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        depth: int = 20,
        width: int = 16,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"resnet_cifar depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.depth = depth
        self.conv0 = _conv(self.input_shape[0], width)
        self.bn0 = nn.BatchNorm2d(width)
        self.res1 = nn.Sequential(*[PreActBlock(width, first=(k == 0)) for k in range(n)])
        self.res2 = nn.Sequential(
            *[PreActBlock(width * (2 if k else 1), increase_dim=(k == 0)) for k in range(n)]
        )
        self.res3 = nn.Sequential(
            *[PreActBlock(width * (4 if k else 2), increase_dim=(k == 0)) for k in range(n)]
        )
        self.bnlast = nn.BatchNorm2d(4 * width)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv0(x)))
        x = self.res3(self.res2(self.res1(x)))
        x = F.relu(self.bnlast(x))
        return self.linear(x.mean(dim=(2, 3)))


register(
    "resnet_cifar",
    "pre-activation CIFAR ResNet, option-A shortcuts (depth 20/32/44/56), as TTQ",
    (3, 32, 32),
)(ResNetCifar)
