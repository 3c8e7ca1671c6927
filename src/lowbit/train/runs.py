"""Runs described by a spec (the tables of a recipe): build, train, resume and evaluate them.

A spec is a dict of tables — ``model`` (``name`` + options), ``data`` (``name``, ``split``,
``preprocess``, ``augment`` + options), ``method`` (``name`` + ``lowbit.quantize`` options),
``train`` (:class:`TrainConfig` fields), plus ``recipe`` and ``paper`` (informational). It is what
``lowbit train`` assembles from a recipe and its flags, and what ``config.json`` in a run
directory stores, so ``lowbit eval RUN`` and ``lowbit train --resume`` rebuild the same run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import data as data_mod
from lowbit import models
from lowbit.data.core import DataSplits
from lowbit.train.checkpoint import CheckpointError, latest, load_checkpoint
from lowbit.train.config import TrainConfig, load_recipe
from lowbit.train.trainer import ShapeMismatchError, Trainer, check_compatible, resolve_method

__all__ = ["build_data", "build_model", "evaluate_run", "make_spec", "read_run_spec", "train_spec"]

_DATA_KEYS = ("name", "split", "preprocess", "augment", "data_dir", "download")


def make_spec(
    recipe: str | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    method: str | None = None,
    model_options: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A spec from an optional recipe (name or .toml path) with explicit values on top."""
    spec: dict[str, Any] = (
        load_recipe(recipe)
        if recipe
        else {t: {} for t in ("recipe", "paper", "model", "data", "method", "train")}
    )
    if model:
        if spec["model"].get("name") not in (None, model):
            spec["model"] = {}
        spec["model"]["name"] = model
    if dataset:
        if spec["data"].get("name") not in (None, dataset):
            spec["data"] = {}
        spec["data"]["name"] = dataset
    if method:
        if spec["method"].get("name") not in (None, method):
            spec["method"] = {}
        spec["method"]["name"] = method
    spec["model"].update(model_options or {})
    spec["data"].update(data_options or {})
    spec["method"].update(method_options or {})
    spec["train"].update({k: v for k, v in (train or {}).items() if v is not None})
    if not recipe:
        # Without a recipe: Adam 1e-3, batch 100 and a per-step cosine decay, which is what makes a
        # one-epoch MNIST MLP land above 97% (a constant LR ends the epoch noisy).
        spec["train"].setdefault("schedule", "cosine")
    spec["method"].setdefault("name", "fp")
    missing = [t for t in ("model", "data") if "name" not in spec[t]]
    if recipe and spec["recipe"].get("kind") == "ptq":
        raise ValueError(
            f"recipe {recipe!r} is post-training quantization of another recipe's float run "
            f"(init_from = {spec['recipe'].get('init_from')!r}), not a training run: "
            f"run `lowbit reproduce {Path(str(recipe)).stem}`"
        )
    if missing:
        raise ValueError(
            f"no {' and no '.join(missing)} given: pass --{missing[0] if missing[0] == 'model' else 'dataset'} or a --recipe"
        )
    if spec["model"]["name"] not in models.available():
        raise ValueError(
            f"unknown model {spec['model']['name']!r}; valid: {', '.join(models.available())}"
        )
    if spec["data"]["name"] not in data_mod.available():
        raise ValueError(
            f"unknown dataset {spec['data']['name']!r}; valid: {', '.join(data_mod.available())}"
        )
    TrainConfig.from_dict(spec["train"])  # validate early
    return spec


def _without_data_dir(table: Any) -> Any:
    """A spec table without ``data_dir``: where the files sit is not what the run trains on."""
    return {k: v for k, v in table.items() if k != "data_dir"} if isinstance(table, dict) else table


def build_data(table: dict[str, Any], data_dir: str | Path | None = None) -> DataSplits:
    """Load the dataset a spec's ``data`` table names."""
    t = dict(table)
    name = t.pop("name")
    kw = {k: t.pop(k) for k in ("split", "preprocess", "augment", "download") if k in t}
    d = data_dir if data_dir is not None else t.pop("data_dir", None)
    t.pop("data_dir", None)
    return data_mod.load(name, data_dir=d, **kw, **t)


def build_model(table: dict[str, Any], data: DataSplits) -> nn.Module:
    """Create the model a spec's ``model`` table names, shaped for ``data`` unless the table fixes
    ``input_shape`` / ``num_classes`` itself."""
    t = dict(table)
    name = t.pop("name")
    input_shape = tuple(t.pop("input_shape", data.input_shape))
    num_classes = int(t.pop("num_classes", data.num_classes))
    try:
        return models.create(name, input_shape=input_shape, num_classes=num_classes, **t)
    except RuntimeError as exc:
        # a shape probe inside the model (e.g. a convolution larger than the image)
        raise ShapeMismatchError(
            f"model {name} cannot be built for dataset {data.name}'s input shape "
            f"{tuple(input_shape)}: {str(exc).splitlines()[0]} (pick a model made for this "
            "input size, or resize the data)"
        ) from exc


def _method_parts(table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of a method table: ``{"name", **options}`` (what runs store), or the
    ``{"name", "options": {...}}`` form Trainer runs wrote before session 6."""
    t = dict(table)
    name = t.pop("name", "fp")
    nested = t.pop("options", None)
    return name, {**(nested if isinstance(nested, dict) else {}), **t}


def read_run_spec(run_dir: str | Path) -> dict[str, Any]:
    """The spec stored in ``run_dir/config.json``."""
    p = Path(run_dir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    return json.loads(p.read_text())


def make_trainer(
    spec: dict[str, Any],
    splits: DataSplits,
    run_dir: str | Path | None,
    progress: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
) -> Trainer:
    """The Trainer for run ``spec`` on ``splits``: the model built after seeding (so runs are
    reproducible), ``init_state`` (float weights) loaded before the method quantizes it."""
    cfg = TrainConfig.from_dict(dict(spec["train"]))
    torch.manual_seed(cfg.seed)
    model = build_model(spec["model"], splits)
    if init_state is not None:
        model.load_state_dict(init_state)
    method, options = _method_parts(spec["method"])
    info = {k: spec.get(k, {}) for k in ("recipe", "paper", "model", "data", "method")}
    return Trainer(
        model,
        splits,
        cfg,
        method=method,
        method_options=options,
        run_dir=run_dir,
        progress=progress,
        run_info=info,
        model_name=spec["model"]["name"],
    )


def train_spec(
    spec: dict[str, Any],
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data_dir: str | Path | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Build and train the run ``spec`` describes in ``run_dir``; returns the summary.

    With ``resume`` and an existing ``config.json``, the stored model/data/method must match the
    spec (the ``train`` table may differ, e.g. more epochs).
    """
    run_dir = Path(run_dir)
    spec = copy.deepcopy(spec)
    if resume and (run_dir / "config.json").exists():
        stored = read_run_spec(run_dir)
        for table in ("model", "data", "method"):
            if _without_data_dir(stored.get(table)) != _without_data_dir(spec.get(table)):
                raise ValueError(
                    f"cannot resume {run_dir}: its {table} is {stored.get(table)} but this command asks for {spec.get(table)}"
                )
        if "fused" not in stored.get("train", {}):
            # written before TrainConfig.fused existed: it trained with Adam's per-tensor loop
            spec.setdefault("train", {})["fused"] = False
    trainer = make_trainer(spec, build_data(spec["data"], data_dir), run_dir, progress)
    try:
        return trainer.fit(resume=resume, stop_after_epochs=stop_after_epochs)
    finally:
        from lowbit.train import distributed

        distributed.teardown(trainer.dist)


def _locate(target: str | Path, which: str) -> tuple[Path, Path]:
    """(run_dir, checkpoint file) for a run directory or a checkpoint file."""
    target = Path(target)
    if target.is_dir():
        ckpt_dir = target / "checkpoints"
        path = latest(ckpt_dir, which) if ckpt_dir.is_dir() else None
        if path is None:
            raise CheckpointError(f"{target} has no {which} checkpoint (checkpoints/manifest.json)")
        return target, path
    if not target.exists():
        raise FileNotFoundError(f"{target} is neither a run directory nor a checkpoint file")
    if target.suffix == ".lowbit":
        raise ValueError(
            f"{target} is a packed model file: evaluate it with `lowbit run {target} --dataset NAME`"
        )
    if target.parent.name != "checkpoints":
        raise ValueError(
            f"{target} is not a checkpoint of a run: pass the run directory (the folder that holds "
            "config.json and checkpoints/) or a file inside its checkpoints/"
        )
    return target.parent.parent, target


@torch.no_grad()
def evaluate_run(
    target: str | Path,
    which: str = "best",
    splits: list[str] | None = None,
    device: str = "cpu",
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Rebuild a run's model, load its ``best`` (or ``last``) checkpoint and evaluate it.

    ``target`` is a run directory or a checkpoint file inside one (its ``config.json`` two levels
    up describes the model and data). Returns ``{"checkpoint", "epoch", split: {loss, acc, error}}``.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be best or last, got {which!r}")
    bad = [s for s in splits or [] if s not in ("train", "valid", "test")]
    if bad:
        raise ValueError(f"unknown split {bad[0]!r}: choose train, valid or test")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device} was asked for but torch.cuda.is_available() is False on this machine"
        )
    run_dir, path = _locate(target, which)
    spec = read_run_spec(run_dir)
    # read onto the CPU (a checkpoint written on a GPU loads anywhere), then moved with the model
    state = load_checkpoint(path, map_location="cpu")
    data = build_data(spec["data"], data_dir)
    model = build_model(spec["model"], data)
    method, options = _method_parts(spec.get("method", {}))
    if resolve_method(method) is not None:
        import lowbit

        model = lowbit.quantize(model, method, **options)
    model.load_state_dict(state["model"])
    model.to(device)
    check_compatible(model, data, spec["model"]["name"])
    cfg = TrainConfig.from_dict({**spec.get("train", {}), "device": device, "epochs": 1})
    # The model is already quantized and loaded: evaluation needs no method hooks.
    trainer = Trainer(model, data, cfg, method="fp", progress=False)
    out: dict[str, Any] = {"checkpoint": str(path), "epoch": int(state.get("epoch", 0))}
    for split in splits or [s for s in ("valid", "test") if getattr(data, s) is not None]:
        out[split] = trainer.evaluate(split)
    return out


def parse_value(raw: str) -> Any:
    """A command-line value: a Python or TOML literal (``[2048, 2048]``, ``true``, ``0.1``) or else
    the string itself."""
    import ast
    import tomllib

    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict with :func:`parse_value` values; bad items name the flag."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        value = parse_value(raw.strip())
        if isinstance(value, str) and value[:1] in "[({" and value:
            raise ValueError(
                f"{flag} {key.strip()}={raw.strip()}: not a valid list or table (unbalanced "
                "brackets?); write it like [2048, 2048]"
            )
        out[key.strip().replace("-", "_")] = value
    return out
