"""Report figures (matplotlib, Agg backend, PNG): training curves of several runs, weight
histograms with the quantization levels, and the size / accuracy / speed trade-off."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.report.results import ModelRow

__all__ = ["plot_tradeoff", "plot_training_curves", "plot_weight_histograms", "read_metrics"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``<run_dir>/metrics.jsonl`` ([] when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_training_curves(runs: Mapping[str, str | Path], path: str | Path) -> Path | None:
    """Two panels: training loss and validation/test error per epoch, one line per run."""
    series = {name: read_metrics(d) for name, d in runs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ylabel = "test error (%)"
    for name, recs in series.items():
        ep = [r["epoch"] for r in recs]
        (line,) = ax1.plot(ep, [r.get("train_loss", math.nan) for r in recs], "o-", label=name)
        key = next((k for k in ("test_error", "valid_error", "test_loss") if k in recs[0]), "")
        ax2.plot(ep, [r.get(key, math.nan) for r in recs], "o-", color=line.get_color(), label=name)
        ylabel = "test loss (nats/char)" if key == "test_loss" else "test error (%)"
    ax1.set(xlabel="epoch", ylabel="training loss (own loss function)", title="training loss")
    ax2.set(xlabel="epoch", ylabel=ylabel, title="test metric (simulated model)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _middle_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    from lowbit.nn import QuantModule

    layers: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if isinstance(m, QuantModule) and isinstance(getattr(m, "weight", None), torch.Tensor):
            layers.append((n, m))  # type: ignore[arg-type]
    if not layers:
        layers = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    return layers[len(layers) // 2] if layers else None


def plot_weight_histograms(models: Mapping[str, nn.Module], path: str | Path) -> Path | None:
    """One panel per model: the latent (float) weights of a middle layer, and the quantized
    levels it uses drawn as vertical lines with the share of weights on each level."""
    panels = []
    for name, model in models.items():
        picked = _middle_layer(model)
        if picked is None:
            continue
        lname, layer = picked
        w = torch.as_tensor(layer.weight).detach().float().reshape(-1)
        levels: list[tuple[float, float]] = []
        distinct = 0
        export = getattr(layer, "quantized_weight", None)
        if callable(export):
            with torch.no_grad():
                wq = export().dequantize().reshape(-1).float()
            vals, counts = torch.unique(wq, return_counts=True)
            distinct = int(vals.numel())
            if vals.numel() <= 16:
                levels = [
                    (float(v), float(c) / wq.numel()) for v, c in zip(vals, counts, strict=True)
                ]
        panels.append((name, lname, w, levels, distinct))
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, lname, w, levels, distinct) in zip(axes.flat, panels, strict=False):
        ax.hist(w.numpy(), bins=120, color="0.6")
        for v, share in levels:
            ax.axvline(v, color="C3", linewidth=1)
            ax.annotate(
                f"{share:.0%}",
                (v, 1),
                xycoords=("data", "axes fraction"),
                fontsize=6,
                ha="center",
                va="bottom",
                color="C3",
            )
        extra = f", {len(levels)} levels" if levels else ""
        if distinct > 16:
            extra = f", {distinct:,} distinct values: per-group scales"
        ax.set_title(f"{name}: {lname} ({w.numel():,} weights{extra})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("latent weights (grey) and the quantized levels used (red, share of weights)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_tradeoff(rows: Sequence[ModelRow], path: str | Path) -> Path | None:
    """Test error against file size (left) and against batch-256 throughput (right)."""
    pts = [r for r in rows if r.file_bytes]
    if not pts:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(pts):
        err = r.packed_error if r.packed_error is not None else r.sim_error
        color = f"C{i % 10}"
        kib = (r.file_bytes or 0) / 1024
        ax1.scatter([kib], [err], color=color, s=40)
        ax1.annotate(
            r.name,
            (kib, err),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
        if r.throughput:
            ax2.scatter([r.throughput], [err], color=color, s=40)
            ax2.annotate(
                r.name, (r.throughput, err), fontsize=8, xytext=(4, 3), textcoords="offset points"
            )
    ax1.set(
        xscale="log",
        xlabel="model file size (KiB, log)",
        ylabel="test error (%), packed",
        title="size vs error",
    )
    ax2.set(
        xscale="log",
        xlabel="samples/s at batch 256 (log)",
        ylabel="test error (%), packed",
        title="speed vs error",
    )
    from matplotlib.ticker import FuncFormatter

    def leads_in(lo: float, hi: float, leads: tuple[float, ...]) -> int:
        if lo <= 0:
            return 0
        n = 0
        for e in range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1):
            n += sum(lo <= lead * 10**e <= hi for lead in leads)
        return n

    def formatter(leads: tuple[float, ...]) -> FuncFormatter:
        def short(value: float, _pos: int) -> str:
            # Label 1, 2 and 5 times powers of ten only (every digit on a narrow axis), compactly:
            # the default log-axis labels ("2x10^2 3x10^2 ...") overlap.
            if value <= 0:
                return ""
            lead = value / 10 ** math.floor(math.log10(value) + 1e-9)
            if round(lead, 6) not in leads:
                return ""
            return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"

        return FuncFormatter(short)

    for ax in (ax1, ax2):
        lo, hi = ax.get_xlim()
        leads: tuple[float, ...] = (1.0, 2.0, 5.0)
        if leads_in(lo, hi, leads) < 2:  # a narrow range: label every digit
            leads = tuple(float(d) for d in range(1, 10))
        ax.xaxis.set_major_formatter(formatter(leads))
        ax.xaxis.set_minor_formatter(formatter(leads))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
