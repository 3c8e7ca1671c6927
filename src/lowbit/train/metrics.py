"""Run metrics: ``metrics.jsonl`` (one JSON object per epoch), ``summary.json`` and live progress."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.train.checkpoint import atomic_write_bytes

__all__ = ["MetricsLog", "Progress", "write_summary"]


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines past the checkpoint's epoch are dropped so
    the file matches an uninterrupted run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with ``epoch <= epoch``."""
        if not self.path.exists():
            return
        keep = [line for line in self.read() if line.get("epoch", 0) <= epoch]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (flushed and fsynced: a killed run keeps every finished epoch)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """All records (a half-written last line, if any, is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Live per-epoch progress: a rich bar with loss, accuracy, samples/s and ETA on a terminal;
    on a pipe or file (nohup) a plain line every ``log_every`` seconds. Always prints one summary
    line per epoch. Silent when ``enabled`` is False (non-zero DDP ranks)."""

    def __init__(
        self,
        enabled: bool = True,
        live: bool | None = None,
        log_every: float = 30.0,
        stream: Any = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self.log_every = log_every
        self._bar: Any = None
        self._task: Any = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.t0 = self._last = time.perf_counter()
        if not self.live:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}  {task.fields[rate]:,.0f} samples/s"
            ),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, loss=float("nan"), acc=0.0, rate=0.0)

    def update(self, step: int, loss: float, acc: float, samples: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = samples / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, acc=acc, rate=rate)
        elif now - self._last >= self.log_every:
            self._last = now
            eta = (now - self.t0) / max(step, 1) * (self.steps - step)
            print(
                f"  epoch {self.epoch}/{self.epochs} step {step}/{self.steps} loss {loss:.4f} acc {acc:.2%} {rate:,.0f} samples/s ETA {_fmt_time(eta)}",
                file=self.stream,
                flush=True,
            )

    def end_epoch(self, record: dict[str, Any], remaining_epochs: int) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if not self.enabled:
            return
        secs = record.get("epoch_seconds", 0.0)
        parts = [f"epoch {record['epoch']}/{self.epochs}", f"loss {record['train_loss']:.4f}"]
        for split in ("train", "valid", "test"):
            if f"{split}_acc" in record:
                parts.append(f"{split} acc {record[f'{split}_acc']:.2%}")
            elif f"{split}_loss" in record and split != "train":
                parts.append(f"{split} loss {record[f'{split}_loss']:.4f}")
        parts.append(f"{record.get('samples_per_s', 0):,.0f} samples/s")
        parts.append(f"{secs:.1f}s")
        parts.append(f"ETA {_fmt_time(secs * remaining_epochs)}")
        print("  ".join(parts), file=self.stream, flush=True)


def accuracy_counts(output: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of argmax predictions; sequences count every position."""
    pred = output.reshape(-1, output.shape[-1]).argmax(dim=1)
    t = target.reshape(-1)
    return int((pred == t).sum()), int(t.numel())
