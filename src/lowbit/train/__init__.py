"""Training: the :class:`Trainer`, its configuration, losses, checkpoints and DDP support.

>>> from lowbit import data, models
>>> from lowbit.train import Trainer, TrainConfig
>>> splits = data.load("mnist")
>>> net = models.create("mlp", input_shape=splits.input_shape, num_classes=splits.num_classes)
>>> summary = Trainer(net, splits, TrainConfig(epochs=1), run_dir="runs/mlp").fit()

See docs/training.md.
"""

from __future__ import annotations

from lowbit.train import losses
from lowbit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lowbit.train.config import TrainConfig, load_recipe, lr_factor
from lowbit.train.losses import cross_entropy, squared_hinge
from lowbit.train.trainer import (
    ShapeMismatchError,
    Trainer,
    TrainingDiverged,
    check_compatible,
    resolve_method,
)

__all__ = [
    "CheckpointError",
    "ShapeMismatchError",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "check_compatible",
    "cross_entropy",
    "load_checkpoint",
    "load_recipe",
    "losses",
    "lr_factor",
    "resolve_method",
    "save_checkpoint",
    "squared_hinge",
]
