"""The work behind ``lowbit pack`` and ``lowbit run``: a quantized model from a run directory or
checkpoint, accuracy on a dataset, throughput and latency of a (packed) model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

__all__ = ["accuracy", "evaluate", "quantized_from_source", "speed"]

_NOT_DATA_OPTIONS = ("augment", "data_dir", "download")


def _data_table(recorded: dict[str, Any]) -> dict[str, Any]:
    """The run's data table entries that rebuild the same dataset: every loader option (corpus
    options set a character model's vocabulary; an arrays file's layout and validation cut
    matter), not train-time augmentation or where the files were, nor an old "source" entry
    that recorded a resolved path (MNIST's own ``source`` option is "embedded" or "idx")."""
    return {
        k: v
        for k, v in recorded.items()
        if k not in _NOT_DATA_OPTIONS and not (k == "source" and v not in ("embedded", "idx"))
    }


def quantized_from_source(
    source: str | Path,
    *,
    method: str | None = None,
    keep: tuple[str, ...] = ("first", "last"),
    method_options: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    calib_samples: int = 2048,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(quantized model, info, data splits)`` from a ``lowbit train`` run directory (its best
    checkpoint), a checkpoint inside one, or a ``lowbit ptq`` checkpoint.

    A run trained with a quantization method is rebuilt with it and loaded. A float (``fp``) run
    needs ``method``: ``"fgq"`` runs post-training FGQ/DFP (calibrated on ``calib_samples``
    training images), any other method quantizes the trained float weights as they are (e.g.
    ``"twn"``), keeping the ``keep`` layers float. ``model`` / ``model_options`` name the
    architecture when the run's config.json does not (runs made by calling ``Trainer`` directly).
    ``info`` holds the architecture
    (``{"name", "options"}`` for ``lowbit.save``) and the run's ``data`` table.
    """
    from lowbit import ptq
    from lowbit.convert import quantize
    from lowbit.train.checkpoint import load_checkpoint
    from lowbit.train.runs import _locate, build_data, build_model, read_run_spec

    source = Path(source)
    if source.is_file() and source.suffix == ".pt":
        payload = torch.load(source, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and payload.get("format") == ptq.PTQ_FORMAT:
            spec = payload["model_spec"]
            data_table = dict(payload.get("extra", {}).get("data", {}) or {})
            if not data_table and payload.get("extra", {}).get("dataset"):
                data_table = {"name": payload["extra"]["dataset"]}
            net = ptq.load_quantized(source)
            splits = build_data(data_table, data_dir) if data_table.get("name") else None
            return (
                net,
                {
                    "architecture": _arch(spec["name"], spec.get("options", {}), splits),
                    "data": data_table,
                    "checkpoint": str(source.resolve()),
                },
                splits,
            )
    run_dir, ckpt = _locate(source, "best")
    spec = read_run_spec(run_dir)
    # config.json records where the data came from ("source": a resolved path); load by name.
    data_table = _data_table(spec["data"])
    # where the run's files were (lowbit train --data-dir), unless the caller says otherwise
    splits = build_data(data_table, data_dir or spec["data"].get("data_dir"))
    # Model tables come as {"name", **options} (lowbit train) or {"name", "options": {...}}.
    name, opts = ptq._model_spec(spec)
    if model is not None:
        name, opts = model, {}
    opts.update(model_options or {})
    if name is None:
        raise ValueError(
            f"{run_dir}/config.json names no model: pass --model NAME (and -M key=value options)"
        )
    net = build_model({"name": name, **opts}, splits)
    state = load_checkpoint(ckpt)
    table = spec.get("method", {})
    trained = table.get("name", "fp")
    # {"name", **options} (lowbit train) or {"name", "options": {...}} (Trainer's run_info).
    options = (
        dict(table["options"])
        if isinstance(table.get("options"), dict)
        else {k: v for k, v in table.items() if k != "name"}
    )
    if trained != "fp":
        if method not in (None, "fp", trained):
            raise ValueError(
                f"{run_dir} was trained with {trained}: it packs as {trained}, not {method} "
                "(--method quantizes float runs); drop --method, or pass the float run"
            )
        net = quantize(net, trained, **options)
        net.load_state_dict(state["model"])
        used = trained
    else:
        net.load_state_dict(state["model"])
        if method is None or method == "fp":
            raise ValueError(
                f"{run_dir} holds a float model: pass --method (e.g. twn for ternary weights, "
                "fgq for post-training FGQ/DFP) to quantize it before packing"
            )
        net.eval()
        if method == "fgq":
            calib = splits.train.x[:calib_samples]
            net = ptq.fgq(net, calib, keep=keep, **(method_options or {}))
        else:
            net = quantize(net, method, keep=keep, **(method_options or {}))
        used = method
    net.eval()
    info = {
        "architecture": _arch(name, opts, splits),
        "data": data_table,
        "checkpoint": str(Path(ckpt).resolve()),
        "method": used,
    }
    return net, info, splits


def _arch(name: str, options: dict[str, Any], splits: Any) -> dict[str, Any]:
    opts = dict(options)
    if splits is not None:
        opts.setdefault("input_shape", list(splits.input_shape))
        opts.setdefault("num_classes", int(splits.num_classes))
    return {"name": name, "options": opts}


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: Any, batch_size: int = 256, *, loss: bool = True
) -> dict[str, float]:
    """``{"accuracy": top-1 %, "loss": mean softmax cross-entropy in nats}`` on an
    ``ArrayDataset``. Sequence outputs ``(B, T, C)`` with targets ``(B, T)`` (the char-LSTMs)
    count every position, so ``loss`` is nats per character, the papers' metric."""
    model.eval()
    correct = total = 0
    nats = 0.0
    for x, y in data.batches(batch_size):
        out = model(x)
        logits = out.reshape(-1, out.shape[-1]).float()
        target = y.reshape(-1)
        correct += int((logits.argmax(1) == target).sum())
        if loss:
            nats += float(TF.cross_entropy(logits, target, reduction="sum").double())
        total += int(target.numel())
    result = {"accuracy": 100.0 * correct / max(total, 1)}
    if loss:
        result["loss"] = nats / max(total, 1)
    return result


def accuracy(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on an ``ArrayDataset`` (every position of a sequence output)."""
    return evaluate(model, data, batch_size, loss=False)["accuracy"]


@torch.inference_mode()
def speed(
    model: nn.Module, sample: torch.Tensor, batch_size: int = 256, reps: int = 30
) -> dict[str, float]:
    """Median batch time -> throughput (samples/s) and median batch-1 latency (ms)."""
    model.eval()
    xb = sample[:batch_size]
    x1 = sample[:1]
    for _ in range(3):
        model(xb)
        model(x1)
    tb, t1 = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(xb)
        tb.append(time.perf_counter() - t0)
    for _ in range(max(reps, 50)):
        t0 = time.perf_counter()
        model(x1)
        t1.append(time.perf_counter() - t0)
    batch_s = statistics.median(tb)
    return {
        "batch_size": float(xb.shape[0]),
        "batch_ms": 1e3 * batch_s,
        "throughput": xb.shape[0] / batch_s,
        "latency_ms": 1e3 * statistics.median(t1),
    }
