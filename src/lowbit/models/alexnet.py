"""The DoReFa-style AlexNet that TTQ trains on ImageNet (§1.5)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lowbit.models._layers import activation, flat_features
from lowbit.models.registry import register

__all__ = ["AlexNet"]


class AlexNet(nn.Module):
    """conv0 96@12x12/4 VALID-ReLU; conv1 256@5x5 (2 groups)-BN-MP3/2-ReLU; conv2 384@3x3-BN-MP3/2-ReLU;
    conv3 384@3x3 (2 groups)-BN-ReLU; conv4 256@3x3 (2 groups)-BN-MP3/2 VALID-ReLU; fc0 4096-BN-ReLU;
    fc1 4096-BN-ReLU; fct classes (the only bias). BN momentum 0.1, eps 1e-4. No dropout.

    TF's SAME max-pools become ``MaxPool2d(3, 2, padding=1)`` (same output size; the padding sits
    on both sides instead of bottom/right). ``width`` scales every layer (1.0 = the paper's).
    ``act``: ``relu`` (TTQ, the default) or ``hardtanh`` (BNN: the binary activation quantizer at
    each quantized layer's input then sees the 1{|x|<=1}-gated value; after a ReLU every sign
    would be +1).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 224, 224),
        num_classes: int = 1000,
        width: float = 1.0,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

        def c(n: int) -> int:
            return max(2, int(round(n * width / 2)) * 2)  # even, for the 2-group convs

        def bn2(n: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(n, eps=1e-4, momentum=0.1)

        def bn1(n: int) -> nn.BatchNorm1d:
            return nn.BatchNorm1d(n, eps=1e-4, momentum=0.1)

        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(self.input_shape[0], c(96), 12, stride=4, bias=False),
                relu0=activation(act),
                conv1=nn.Conv2d(c(96), c(256), 5, padding=2, groups=2, bias=False),
                bn1=bn2(c(256)),
                pool1=nn.MaxPool2d(3, 2, padding=1),
                relu1=activation(act),
                conv2=nn.Conv2d(c(256), c(384), 3, padding=1, bias=False),
                bn2=bn2(c(384)),
                pool2=nn.MaxPool2d(3, 2, padding=1),
                relu2=activation(act),
                conv3=nn.Conv2d(c(384), c(384), 3, padding=1, groups=2, bias=False),
                bn3=bn2(c(384)),
                relu3=activation(act),
                conv4=nn.Conv2d(c(384), c(256), 3, padding=1, groups=2, bias=False),
                bn4=bn2(c(256)),
                pool4=nn.MaxPool2d(3, 2),
                relu4=activation(act),
            )
        )
        n_flat = flat_features(self.features, self.input_shape)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc0=nn.Linear(n_flat, c(4096), bias=False),
                bnfc0=bn1(c(4096)),
                relufc0=activation(act),
                fc1=nn.Linear(c(4096), c(4096), bias=False),
                bnfc1=bn1(c(4096)),
                relufc1=activation(act),
                fct=nn.Linear(c(4096), num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register(
    "alexnet",
    "DoReFa/TTQ ImageNet AlexNet (224x224, no dropout, BN; options width, act)",
    (3, 224, 224),
    1000,
)(AlexNet)
