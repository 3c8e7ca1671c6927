"""LeNet-5 for 28x28 (or 32x32) digits."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.models._layers import activation, flat_features
from lowbit.models.registry import register

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """``conv1 (6@5x5) - pool - conv2 (16@5x5) - pool - fc 120 - fc 84 - fc classes`` (LeCun et al.
    1998) with ReLU and max-pool. 28x28 inputs are zero-padded by 2 in conv1 (the classic 32x32
    geometry). ``channels=(20, 50), fc=(500,)`` gives the Caffe "LeNet" many quantization papers use.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (6, 16),
        fc: Sequence[int] = (120, 84),
        batchnorm: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        pad = 2 if self.input_shape[-1] == 28 else 0
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = self.input_shape[0]
        for i, c in enumerate(channels):
            feats[f"conv{i + 1}"] = nn.Conv2d(
                c_in, c, 5, padding=pad if i == 0 else 0, bias=not batchnorm
            )
            if batchnorm:
                feats[f"bn{i + 1}"] = nn.BatchNorm2d(c)
            feats[f"act{i + 1}"] = activation(act)
            feats[f"pool{i + 1}"] = nn.MaxPool2d(2)
            c_in = c
        self.features = nn.Sequential(feats)
        n_in = flat_features(self.features, self.input_shape)
        head: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for j, w in enumerate(fc):
            head[f"fc{j + 1}"] = nn.Linear(n_in, w, bias=not batchnorm)
            if batchnorm:
                head[f"bnfc{j + 1}"] = nn.BatchNorm1d(w)
            head[f"actfc{j + 1}"] = activation(act)
            n_in = w
        head[f"fc{len(fc) + 1}"] = nn.Linear(n_in, num_classes)
        self.classifier = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register(
    "lenet5", "LeNet-5: 6C5-MP2-16C5-MP2-120-84 (options: channels, fc, batchnorm)", (1, 28, 28)
)(LeNet5)
