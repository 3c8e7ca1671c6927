"""The BinaryConnect / BNN / LAQ VGG-like net: 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lowbit.models._layers import activation, flat_features
from lowbit.models.registry import register

__all__ = ["ConvNet"]


class ConvNet(nn.Module):
    """Six 3x3 convolutions in pairs of ``K, 2K, 4K`` channels (``K = width``: 128 for CIFAR, 64 for
    SVHN), max-pool after each pair, two FC layers of ``fc`` units, a linear output.

    Every layer is followed by BatchNorm; the max-pool sits between the second conv of a pair and
    its BN (as the Theano BNN code, §2.8). ``bn_output`` (default on) puts BN on the logits for the
    squared hinge loss. ``act``: ``relu`` (LAQ) or ``hardtanh`` (BNN, whose quantizer binarizes it).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        width: int = 128,
        fc: int = 1024,
        act: str = "relu",
        bn_output: bool = True,
        bias: bool = True,
        bn_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        chans = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = self.input_shape[0]
        for i, c in enumerate(chans):
            feats[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1, bias=bias)
            if i % 2 == 1:
                feats[f"pool{i // 2}"] = nn.MaxPool2d(2)
            feats[f"bn{i}"] = nn.BatchNorm2d(c, eps=bn_eps)
            feats[f"act{i}"] = activation(act)
            c_in = c
        self.features = nn.Sequential(feats)
        n_flat = flat_features(self.features, self.input_shape)
        head: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for j in range(2):
            head[f"fc{j}"] = nn.Linear(n_flat if j == 0 else fc, fc, bias=bias)
            head[f"bnfc{j}"] = nn.BatchNorm1d(fc, eps=bn_eps)
            head[f"actfc{j}"] = activation(act)
        head["fc2"] = nn.Linear(fc, num_classes, bias=bias)
        if bn_output:
            head["bnout"] = nn.BatchNorm1d(num_classes, eps=bn_eps)
        self.classifier = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register(
    "convnet",
    "BinaryConnect/BNN/LAQ net 2xKC3-MP2-2x2KC3-MP2-2x4KC3-MP2-2x1024FC (width=K: 128 CIFAR, 64 SVHN)",
    (3, 32, 32),
)(ConvNet)
