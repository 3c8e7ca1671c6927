"""The papers' reference networks, built by name.

>>> from lowbit import models
>>> models.available()
['mlp', 'mlp_laq', 'mlp_bnn', 'convnet', 'resnet_cifar', 'lenet5', 'alexnet', 'char_lstm']
>>> net = models.create("resnet_cifar", depth=20)                   # CIFAR-10 shapes by default
>>> net = models.create("mlp", input_shape=(1, 28, 28), num_classes=10, widths=(2048,) * 3)

Every model takes ``input_shape`` (one sample, without the batch dimension) and ``num_classes`` and
adapts its first and last layers to them; the values it was built for are kept as
``model.input_shape`` / ``model.num_classes``.
"""

from __future__ import annotations

from lowbit.models.registry import ModelSpec, available, create, describe, register

# Importing the modules registers their models (in this order in `available()`).
from lowbit.models import mlp as _mlp  # noqa: E402, F401  isort: skip
from lowbit.models import convnet as _convnet  # noqa: E402, F401  isort: skip
from lowbit.models import resnet as _resnet  # noqa: E402, F401  isort: skip
from lowbit.models import lenet as _lenet  # noqa: E402, F401  isort: skip
from lowbit.models import alexnet as _alexnet  # noqa: E402, F401  isort: skip
from lowbit.models import char_lstm as _char_lstm  # noqa: E402, F401  isort: skip
from lowbit.models.alexnet import AlexNet  # noqa: E402
from lowbit.models.char_lstm import CharLSTM  # noqa: E402
from lowbit.models.convnet import ConvNet  # noqa: E402
from lowbit.models.lenet import LeNet5  # noqa: E402
from lowbit.models.mlp import MLP  # noqa: E402
from lowbit.models.resnet import ResNetCifar  # noqa: E402

__all__ = [
    "MLP",
    "AlexNet",
    "CharLSTM",
    "ConvNet",
    "LeNet5",
    "ModelSpec",
    "ResNetCifar",
    "available",
    "create",
    "describe",
    "register",
]
