"""The Trainer: any ``nn.Module``, any registered quantization method, the papers' protocol.

Order of operations (INTERFACES.md): quantize the model (``lowbit.quantize``, unless it already
holds quantized layers) -> parameter groups (``method.param_groups`` or one group) split by the
weight-decay rules -> optimizer -> ``method.wrap_optimizer`` -> every step ``method.after_step``
-> every epoch ``method.epoch_metrics`` into ``metrics.jsonl``.

Protocol: evaluate valid and test every epoch; the reported test error is the one at the epoch
with the best validation error (validation loss for character models), as the BNN and LAQ
scripts do. Checkpoints every epoch (atomic; see :mod:`lowbit.train.checkpoint`) hold the model,
optimizer, epoch, the best-so-far record and every RNG state, so ``fit(resume=True)`` after a
kill finishes with exactly the weights of an uninterrupted run (same seed, same machine).
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.data.core import DataSplits
from lowbit.train import distributed
from lowbit.train.checkpoint import (
    CheckpointError,
    latest,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from lowbit.train.config import TrainConfig, json_safe, lr_factor
from lowbit.train.losses import get as get_loss
from lowbit.train.metrics import MetricsLog, Progress, accuracy_counts, write_summary

__all__ = [
    "ShapeMismatchError",
    "Trainer",
    "TrainingDiverged",
    "check_compatible",
    "resolve_method",
]

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the global step, ``checkpoint`` the last good one."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class ShapeMismatchError(ValueError):
    """The model cannot take the dataset's samples or does not output its number of classes."""


def resolve_method(method: Any) -> Any:
    """``None`` for float training (``None`` or ``"fp"``), else a Method object: a registered name
    is looked up in :mod:`lowbit.methods` (unknown names list the valid ones); objects pass through."""
    if method is None or method == "fp":
        return None
    if not isinstance(method, str):
        return method
    import lowbit.methods as methods

    names = methods.available() if hasattr(methods, "available") else []
    if method not in names:
        valid = ", ".join(["fp", *[n for n in names if n != "fp"]])
        raise ValueError(f"unknown method {method!r}; valid: {valid}")
    return methods.get(method)


def _is_quantized(model: nn.Module) -> bool:
    return any(hasattr(m, "weight_quantizer") for m in model.modules())


@torch.no_grad()
def check_compatible(model: nn.Module, data: DataSplits, name: str | None = None) -> None:
    """Run two training samples through ``model`` (eval mode) and check the output shape.

    Raises :class:`ShapeMismatchError` naming both shapes when the model cannot take the
    dataset's input or does not produce one score per class.
    """
    name = name or type(model).__name__
    expects = getattr(model, "input_shape", None)
    x, y = data.train.x[:2], data.train.y[:2]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        out = model(x.to(device))
    except Exception as exc:
        raise ShapeMismatchError(
            f"model {name} (built for input shape {tuple(expects) if expects else '?'}) cannot take dataset {data.name}'s "
            f"input shape {data.input_shape}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        model.train(was)
    want = (*y.shape, data.num_classes)
    if tuple(out.shape) != want:
        raise ShapeMismatchError(
            f"model {name} outputs shape {tuple(out.shape[1:])} per batch of {tuple(x.shape)} but dataset {data.name} "
            f"(input shape {data.input_shape}, {data.num_classes} classes) needs {want[1:]}"
        )


def load_initial_weights(model: nn.Module, source: str | Path) -> None:
    """Load float weights for fine-tuning from a run directory (its best checkpoint, else the last)
    or a checkpoint file (a trainer checkpoint or a plain state dict), checked as any checkpoint."""
    p = Path(source)
    if p.is_dir():
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        path = latest(ckpt_dir, "best") or latest(ckpt_dir, "last")
        if path is None:
            raise CheckpointError(
                f"init_from={source}: no checkpoint found (checkpoints/manifest.json)"
            )
        p = path
    state = load_checkpoint(p)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("num_batches_tracked",))]:
        raise CheckpointError(
            f"init_from={source}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # noqa: NPY002 - user code may use the legacy global RNG
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    # RNG states are CPU byte tensors whatever device the run trains on (a checkpoint loaded
    # with map_location="cuda" would otherwise hand torch a CUDA tensor and fail).
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["generator"].cpu())
    n = state["numpy"]
    legacy = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(legacy)  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def refuse_used_run_dir(run_dir: Path) -> None:
    """A new run never trains into another run's directory: it would replace that run's
    checkpoints and config and append a second run to its ``metrics.jsonl``."""
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    has_checkpoints = (run_dir / "checkpoints" / "manifest.json").exists()
    if records or has_checkpoints:
        epochs = max((int(r.get("epoch", 0)) for r in records), default=0)
        raise ValueError(
            f"{run_dir} already holds a run ({epochs} epoch(s) logged"
            f"{', with checkpoints' if has_checkpoints else ''}): continue it with --resume "
            f"(Trainer.fit(resume=True)), train into another run directory, or delete it "
            f"first (rm -r {run_dir}) to start over"
        )


class Trainer:
    """Train ``model`` on ``data`` with ``method`` (``"fp"``, a registered name, or a Method object).

    ``run_dir`` (optional) receives ``config.json``, ``metrics.jsonl``, ``summary.json`` and
    ``checkpoints/``. ``run_info`` is stored in ``config.json`` (the CLI puts the model / data /
    method specs there so ``lowbit eval`` can rebuild the run). Under ``torchrun`` the model is
    wrapped in DDP and only rank 0 writes. ``quantize=False`` (or a model that already holds
    quantized layers) skips ``lowbit.quantize``: the method's hooks are still used.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        config: TrainConfig | None = None,
        *,
        method: Any = "fp",
        method_options: dict[str, Any] | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
        run_info: dict[str, Any] | None = None,
        model_name: str | None = None,
        quantize: bool = True,
    ) -> None:
        self.config = config or TrainConfig()
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = distributed.setup(cfg.device)
        device = cfg.device
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "--device cuda was asked for but torch.cuda.is_available() is False on this machine"
                )
            if self.dist.enabled and device == "cuda":
                device = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(device)
        self.data = data
        self.method_name = (
            method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
        )
        self.method = resolve_method(method)
        self.method_options = dict(method_options or {})
        if cfg.init_from:
            load_initial_weights(model, cfg.init_from)
        if self.method is not None and quantize and not _is_quantized(model):
            import lowbit

            model = lowbit.quantize(
                model,
                self.method_name if isinstance(method, str) else self.method,
                **self.method_options,
            )
        self.model = model.to(self.device)
        self.model_name = model_name or type(model).__name__
        check_compatible(self.model, data, self.model_name)
        if data.valid is None:
            self.select_on = None
        else:
            self.select_on = "valid_loss" if data.task == "sequence" else "valid_error"
        self.loss_fn = get_loss(cfg.loss)
        if data.task == "sequence" and cfg.loss != "cross_entropy":
            raise ValueError(f"character models train with cross_entropy, not {cfg.loss}")
        # Data on the accelerator when it is one: whole-tensor batches then never cross the bus.
        if self.device.type != "cpu":
            for split in ("train", "valid", "test"):
                ds = getattr(data, split)
                if ds is not None:
                    setattr(data, split, ds.to(self.device))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        if self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)  # different dropout masks per rank
        self.base_optimizer = self._build_optimizer()
        wrap = getattr(self.method, "wrap_optimizer", None) if self.method is not None else None
        self.optimizer = (
            wrap(self.model, self.base_optimizer) if wrap is not None else self.base_optimizer
        )
        self.ddp: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0
        self.step = 0
        self.elapsed = 0.0
        self.best: dict[str, Any] = {}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_info = dict(run_info or {})
        # progress=False (--no-progress): no live bar and no step lines, but still one summary
        # line per epoch; other DDP ranks print nothing
        self.progress = Progress(
            enabled=self.dist.is_main,
            live=None if progress else False,
            log_every=cfg.log_every if progress else float("inf"),
        )

    # ------------------------------------------------------------------ setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = None
        hook = getattr(self.method, "param_groups", None) if self.method is not None else None
        if hook is not None:
            groups = hook(self.model, cfg.lr)
        if not groups:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        rules = [(re.compile(r), v) for r, v in cfg.weight_decay_rules]

        def decay(p: torch.Tensor) -> float:
            name = names.get(id(p), "")
            for rule, value in rules:
                if rule.search(name):
                    return value
            return cfg.weight_decay if p.dim() > 1 else 0.0

        out = []
        for g in groups:
            by_wd: dict[float, list[torch.Tensor]] = {}
            fixed = g.get("weight_decay")  # a method's group may pin it (TTQ scales without decay)
            for p in g["params"]:
                by_wd.setdefault(fixed if fixed is not None else decay(p), []).append(p)
            extra = {k: v for k, v in g.items() if k != "params"}
            for wd, ps in by_wd.items():
                group = {**extra, "params": ps, "weight_decay": wd}
                group.setdefault("lr", cfg.lr)
                group["base_lr"] = group["lr"]
                out.append(group)
        if cfg.optimizer == "adam":
            fused = cfg.fused is not False  # None = on (see TrainConfig.fused)
            return torch.optim.Adam(out, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
        if cfg.optimizer == "adamax":
            return torch.optim.Adamax(out, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        if cfg.optimizer == "shift_adamax":
            # BNN's shift-based AdaMax (Algorithm 4): power-of-two (AP2) step sizes.
            from lowbit.methods.bnn import ShiftAdaMax

            return ShiftAdaMax(out, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        return torch.optim.SGD(out, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def _set_lr(self, epoch: float) -> float:
        f = lr_factor(self.config, epoch)
        for g in self.base_optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return self.config.lr * f

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: model, optimizer, counters, best record, RNG states."""
        opt = self.optimizer if hasattr(self.optimizer, "state_dict") else self.base_optimizer
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "best": dict(self.best),
            "rng": _rng_state(self.generator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}"
            )
        self.model.load_state_dict(state["model"])
        opt = self.optimizer if hasattr(self.optimizer, "load_state_dict") else self.base_optimizer
        opt.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.elapsed = (
            int(state["epoch"]),
            int(state["step"]),
            float(state["elapsed"]),
        )
        self.best = dict(state["best"])
        _set_rng_state(state["rng"], self.generator)
        if self.dist.enabled:
            torch.manual_seed(self.config.seed + self.dist.rank + 1000 * self.epoch)

    def resume(self) -> bool:
        """Load the run directory's latest good checkpoint; False when there is none yet."""
        if self.checkpoint_dir is None:
            raise ValueError("resume needs a run directory")
        path = latest(self.checkpoint_dir)
        if path is None:
            return False
        # Loaded on the CPU: load_state_dict copies weights onto the model's device and the
        # optimizer casts its state to its parameters' device; RNG states must stay on the CPU.
        self.load_state_dict(self._last_good_checkpoint(path))
        if self.dist.is_main and self.run_dir is not None:
            MetricsLog(self.run_dir / "metrics.jsonl").truncate_after(self.epoch)
        return True

    def _last_good_checkpoint(self, path: Path) -> dict[str, Any]:
        """The newest checkpoint that loads: the manifest's ``last`` one, else (truncated or
        corrupt, e.g. a disk filled up while writing it) the older ones it still keeps, newest
        first; training then repeats the lost epochs exactly."""
        assert self.checkpoint_dir is not None
        try:
            return load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            first = exc
        older = [
            self.checkpoint_dir / name
            for name in reversed(read_manifest(self.checkpoint_dir).get("history", []))
            if name != path.name and (self.checkpoint_dir / name).is_file()
        ]
        for candidate in older:
            try:
                state = load_checkpoint(candidate, map_location="cpu")
            except CheckpointError:
                continue
            if self.dist.is_main:
                print(
                    f"warning: {first}; resuming from the older {candidate.name} "
                    f"(epoch {int(state['epoch'])}) instead",
                    file=sys.stderr,
                    flush=True,
                )
            return state
        raise CheckpointError(
            f"{first}; no older intact checkpoint to fall back on: start the run again "
            "(without --resume, or in a new --run-dir)"
        ) from first

    # ------------------------------------------------------------------ loops
    @torch.no_grad()
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Mean loss, accuracy and error (in %) of the current model on ``split`` (all ranks)."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {split!r}: choose train, valid or test")
        ds = getattr(self.data, split)
        if ds is None:
            raise ValueError(f"dataset {self.data.name} has no {split} split")
        model = self.model
        was = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        bs = self.config.eval_batch_size
        for b, (x, y) in enumerate(ds.batches(bs)):
            if b % self.dist.world_size != self.dist.rank:
                continue
            x, y = x.to(self.device), y.to(self.device)
            out = model(x)
            n = y.numel()
            totals[0] += float(self.loss_fn(out, y)) * n
            c, t = accuracy_counts(out, y)
            totals[1] += c
            totals[2] += t
        model.train(was)
        distributed.all_reduce_sum(self.dist, totals)
        loss, correct, count = totals.tolist()
        acc = correct / max(count, 1)
        return {"loss": loss / max(count, 1), "acc": acc, "error": 100.0 * (1 - acc)}

    def _train_epoch(self, epoch: int, kill_at_step: int | None = None) -> dict[str, float]:
        cfg = self.config
        self.ddp.train()
        after_step = getattr(self.method, "after_step", None) if self.method is not None else None
        steps = self.data.train.num_batches(cfg.batch_size)
        self.progress.start_epoch(epoch + 1, cfg.epochs, steps)
        loss_sum, correct, count, samples = 0.0, 0, 0, 0
        t0 = time.perf_counter()
        batches = self.data.train.batches(
            cfg.batch_size,
            shuffle=True,
            generator=self.generator,
            transform=self.data.augment,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
        )
        cosine = cfg.schedule == "cosine"
        for i, (x, y) in enumerate(batches):
            if cosine:
                self._set_lr(epoch + i / steps)
            self.optimizer.zero_grad(set_to_none=True)
            out = self.ddp(x)
            loss = self.loss_fn(out, y)
            value = loss.detach().reshape(1).double()
            distributed.all_reduce_sum(self.dist, value)
            lv = float(value) / self.dist.world_size
            if not math.isfinite(lv):
                good = latest(self.checkpoint_dir) if self.checkpoint_dir is not None else None
                where = (
                    f"; the last good checkpoint is {good} (epoch {self.epoch})"
                    if good
                    else "; no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"loss is {lv} at step {self.step + 1} (epoch {epoch + 1}, batch {i + 1}){where}",
                    self.step + 1,
                    good,
                )
            loss.backward()
            if cfg.grad_clip_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
            self.optimizer.step()
            if after_step is not None:
                after_step(self.model)
            self.step += 1
            n = y.shape[0] * self.dist.world_size
            samples += n
            loss_sum += lv * n
            c, t = accuracy_counts(out.detach(), y)
            correct += c
            count += t
            if i % 10 == 0 or i == steps - 1:
                self.progress.update(i + 1, loss_sum / samples, correct / max(count, 1), samples)
            if kill_at_step is not None and self.step >= kill_at_step:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job, no cleanup
        secs = time.perf_counter() - t0
        # Training accuracy is the local rank's (cheap); the loss is the global mean.
        return {
            "train_loss": loss_sum / max(samples, 1),
            "train_acc": correct / max(count, 1),
            "epoch_seconds": secs,
            "samples_per_s": samples / max(secs, 1e-9),
        }

    def fit(
        self,
        resume: bool = False,
        stop_after_epochs: int | None = None,
        _kill_at_step: int | None = None,
    ) -> dict[str, Any]:
        """Train to ``config.epochs``; returns the run summary (also written to ``summary.json``).

        ``resume=True`` continues from the run directory's latest checkpoint. ``stop_after_epochs``
        ends this call after that many more epochs (the run stays resumable).
        """
        cfg = self.config
        main = self.dist.is_main
        if resume:
            if not self.resume() and main and self.run_dir is not None:
                # nothing to resume from: the epochs a killed run logged before its first
                # checkpoint are not this run's
                MetricsLog(self.run_dir / "metrics.jsonl").truncate_after(0)
        elif self.run_dir is not None and self.epoch == 0 and self.step == 0:
            refuse_used_run_dir(self.run_dir)
        if self.run_dir is not None and main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl")
            if self.run_dir is not None and main
            else None
        )
        status, epochs_this_call = "finished", 0
        wall0 = time.perf_counter()
        while self.epoch < cfg.epochs:
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                status = "stopped"
                break
            epoch = self.epoch
            lr = self._set_lr(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            try:
                record.update(self._train_epoch(epoch, _kill_at_step))
            except TrainingDiverged as exc:
                if main and self.run_dir is not None:
                    write_summary(
                        self.run_dir / "summary.json",
                        self._summary("diverged", error=str(exc), diverged_step=exc.step),
                    )
                raise
            self.epoch = epoch + 1
            self.elapsed += record["epoch_seconds"]
            splits = ["valid"] if self.data.valid is not None else []
            if cfg.eval_test:
                splits.append("test")
            for split in splits:
                for k, v in self.evaluate(split).items():
                    record[f"{split}_{k}"] = v
            hook = getattr(self.method, "epoch_metrics", None) if self.method is not None else None
            if hook is not None:
                for k, v in (hook(self.model) or {}).items():
                    record[f"method/{k}"] = float(v)
            record["step"] = self.step
            improved = self._update_best(record)
            if main and self.checkpoint_dir is not None:
                if improved:
                    save_checkpoint(
                        self.checkpoint_dir,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "epoch": self.epoch,
                            "model": self.model.state_dict(),
                            "record": _floats(record),
                        },
                        self.epoch,
                        kind="best",
                    )
                save_checkpoint(self.checkpoint_dir, self.state_dict(), self.epoch)
            if metrics is not None:
                metrics.append(record)
            distributed.barrier(self.dist)
            self.progress.end_epoch(record, cfg.epochs - self.epoch)
            epochs_this_call += 1
        summary = self._summary(status, wall_seconds=time.perf_counter() - wall0)
        if main and self.run_dir is not None:
            write_summary(self.run_dir / "summary.json", summary)
        return summary

    # ------------------------------------------------------------------ bookkeeping
    def _update_best(self, record: dict[str, Any]) -> bool:
        key = self.select_on
        value = (
            record[key] if key is not None else -float(record["epoch"])
        )  # no valid split: last epoch
        if not self.best or value < self.best["metric"]:
            self.best = {"epoch": record["epoch"], "metric": value, "record": _floats(record)}
            return True
        return False

    def _summary(self, status: str, **extra: Any) -> dict[str, Any]:
        rec = self.best.get("record", {})
        out: dict[str, Any] = {
            "status": status,
            "model": self.model_name,
            "dataset": self.data.name,
            "method": self.method_name,
            "epochs_done": self.epoch,
            "epochs": self.config.epochs,
            "steps": self.step,
            "train_seconds": round(self.elapsed, 2),
            "selection": f"best {self.select_on} epoch"
            if self.select_on
            else "last epoch (no validation split)",
            "best_epoch": self.best.get("epoch"),
        }
        for k in ("valid_error", "valid_loss", "test_error", "test_acc", "test_loss"):
            if k in rec:
                out[f"{k}_at_best" if k.startswith("test") else f"best_{k}"] = rec[k]
        if self.run_dir is not None:
            recs = MetricsLog(self.run_dir / "metrics.jsonl").read() if self.dist.is_main else []
            if recs:
                last = recs[-1]
                for k in ("test_error", "test_loss", "valid_error"):
                    if k in last:
                        out[f"final_{k}"] = last[k]
        out.update(extra)
        return out

    def _write_config(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / "config.json"
        info = {
            **self.run_info,
            "train": self.config.to_dict(),
            "method": self.run_info.get(
                "method", {"name": self.method_name, **self.method_options}
            ),
            "data": self.run_info.get("data", self._data_table()),
            "world_size": self.dist.world_size,
        }
        arch = getattr(self.model, "lowbit_architecture", None)
        if "model" not in info and isinstance(arch, dict) and arch.get("name"):
            # a lowbit.models model: enough for lowbit eval / pack / summary to rebuild it
            opts = {k: v for k, v in (arch.get("options") or {}).items() if v is not None}
            info["model"] = {"name": arch["name"], **opts}
        path.write_text(json.dumps(json_safe(info), indent=2) + "\n")

    def _data_table(self) -> dict[str, Any]:
        """The ``data.load`` call that built the splits (recorded by ``data.load``), else the
        name and the splits' info (hand-made splits)."""
        call = self.data.info.get("load")
        if isinstance(call, dict) and call.get("name") == self.data.name:
            return dict(call)
        return {
            "name": self.data.name,
            **{k: v for k, v in self.data.info.items() if k not in ("vocab", "load")},
        }


def _floats(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
