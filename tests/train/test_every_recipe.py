"""Every shipped training recipe builds its model, quantizes it and takes training steps.

The real datasets are replaced by synthetic data of the same sample shape and class count, so a
recipe whose model, method options, overrides or train table do not fit together fails here and
not an hour into a user's run. (The accuracy of the recipes is in docs/results.md.)
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import data, methods
from lowbit.convert import quantized_layers
from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.reproduce import recipe_kind
from lowbit.train.config import RECIPE_DIR, load_recipe
from lowbit.train.runs import make_trainer

# sample shape and classes of each dataset a recipe may name
IMAGE = {
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
}
TEXT = {"stdlib", "text", "warpeace", "linux", "ptb_char"}


def _stand_in(name: str) -> DataSplits:
    if name in TEXT:
        g = torch.Generator().manual_seed(0)
        vocab, seq = 40, 12

        def part(n: int) -> ArrayDataset:
            ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
            return ArrayDataset(ids[:, :-1].clone(), ids[:, 1:].clone())

        return DataSplits(name, part(4), part(2), part(2), vocab, task="sequence")
    shape, classes = IMAGE[name]
    return data.synthetic.load(n_train=4, n_valid=2, n_test=2, shape=shape, classes=classes)


TRAIN_RECIPES = sorted(
    p.stem for p in RECIPE_DIR.glob("*.toml") if recipe_kind(load_recipe(str(p))) == "train"
)


def test_the_recipe_list_is_not_empty_and_covers_every_method() -> None:
    named = {load_recipe(n)["method"].get("name", "fp") for n in TRAIN_RECIPES}
    assert len(TRAIN_RECIPES) >= 40
    assert set(methods.available()) - {"fgq", "twn", "bwn"} <= named


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_recipe_trains_two_steps_on_stand_in_data(name: str) -> None:
    spec = load_recipe(name)
    dataset = spec["data"]["name"]
    assert dataset in IMAGE or dataset in TEXT, f"{name}: add {dataset!r} to this test"
    spec["train"].update(epochs=1, batch_size=2, eval_batch_size=2)
    trainer = make_trainer(spec, _stand_in(dataset), run_dir=None, progress=False)
    method = spec["method"].get("name", "fp")
    quantized = quantized_layers(trainer.model)
    if method == "fp":
        assert not quantized
    else:
        assert quantized, f"{name}: method {method} quantized no layer"
        keep = spec["method"].get("keep", ["first", "last"])
        if keep == []:  # every layer quantized
            n_layers = sum(
                isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LSTM))
                for m in trainer.model.modules()
            )
            assert len(quantized) == n_layers, f"{name}: keep = [] but a layer stayed float"
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert math.isfinite(summary["test_loss_at_best"])
