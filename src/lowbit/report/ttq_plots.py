"""The TTQ paper's figures, drawn from a run directory (arXiv 1612.01064, Figs. 2-4).

* :func:`plot_scales` — ``Wp`` and ``Wn`` of every ternary layer over training (paper Fig. 3:
  the learned scaling factors per layer over epochs).
* :func:`plot_sparsity` — per layer, the shares of negative / zero / positive ternary weights
  over training (paper Fig. 3's "percentage of ternary weights" panels, stacked).
* :func:`plot_histograms` — the final latent weight distribution of every ternary layer with the
  thresholds ``±Delta`` marked and the learned ``Wp``, ``Wn`` in the title (paper Figs. 2 and 4).

Inputs are what the Trainer writes: ``metrics.jsonl`` (one record per epoch; TTQ's
:meth:`~lowbit.methods.ttq.TTQMethod.epoch_metrics` adds ``method/ttq/<layer>/<stat>`` keys with
``stat`` in ``wp, wn, sparsity, pos, neg, delta``), ``config.json`` (method options) and the
checkpoints. :func:`make_report` draws all three into ``<run>/plots/``::

    python -m lowbit.report.ttq_plots runs/ttq-mnist-mlp
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PREFIX",
    "layer_series",
    "latent_weights",
    "make_report",
    "plot_histograms",
    "plot_scales",
    "plot_sparsity",
    "read_metrics",
]

PREFIX = "method/ttq/"

Series = dict[str, dict[str, list[tuple[int, float]]]]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (a half-written last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lowbit run directory?")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def layer_series(records: Sequence[Mapping[str, Any]]) -> Series:
    """``{layer: {stat: [(epoch, value), ...]}}`` from the ``method/ttq/<layer>/<stat>`` keys."""
    series: Series = defaultdict(lambda: defaultdict(list))
    for i, rec in enumerate(records):
        epoch = int(rec.get("epoch", i + 1))
        for key, value in rec.items():
            if not key.startswith(PREFIX):
                continue
            layer, _, stat = key[len(PREFIX) :].rpartition("/")
            series[layer][stat].append((epoch, float(value)))
    return {layer: dict(stats) for layer, stats in series.items()}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return math.ceil(n / cols), cols


def _figure(plt: Any, n: int) -> tuple[Any, Any]:
    rows, cols = _grid(n)
    # Fixed margins in inches (tight_layout is slow with many panels).
    width, height = 3.4 * cols + 0.4, 2.5 * rows + 0.6
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.15 / width,
        bottom=0.45 / height,
        top=1 - 0.75 / height,
        hspace=0.8,
        wspace=0.35,
    )
    return fig, axes


def _finish(plt: Any, fig: Any, title: str, path: str | Path) -> Path:
    fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _need(series: Series) -> None:
    if not series:
        raise ValueError(
            "no TTQ metrics (keys 'method/ttq/<layer>/<stat>') in these records: "
            "was the run trained with method 'ttq'?"
        )


def plot_scales(series: Series, path: str | Path, title: str = "TTQ scaling factors") -> Path:
    """One panel per layer: ``Wp`` (solid) and ``Wn`` (dashed) against the epoch."""
    _need(series)
    plt = _pyplot()
    fig, axes = _figure(plt, len(series))
    for ax, (layer, stats) in zip(axes.flat, series.items(), strict=False):
        for stat, style in (("wp", "-"), ("wn", "--")):
            if stat in stats:
                xs, ys = zip(*stats[stat], strict=True)
                ax.plot(xs, ys, style, label={"wp": "Wp", "wn": "Wn"}[stat])
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _finish(plt, fig, title, path)


def plot_sparsity(
    series: Series, path: str | Path, title: str = "TTQ ternary weight shares"
) -> Path:
    """One panel per layer: stacked shares of -Wn / 0 / +Wp weights against the epoch."""
    _need(series)
    plt = _pyplot()
    fig, axes = _figure(plt, len(series))
    for ax, (layer, stats) in zip(axes.flat, series.items(), strict=False):
        if not all(k in stats for k in ("neg", "sparsity", "pos")):
            ax.axis("off")
            continue
        xs = [e for e, _ in stats["neg"]]
        neg = [v for _, v in stats["neg"]]
        zero = [v for _, v in stats["sparsity"]]
        pos = [v for _, v in stats["pos"]]
        if len(xs) == 1:  # one epoch: a stack plot of one point draws nothing, bars do
            bottoms = [0.0, neg[0], neg[0] + zero[0]]
            for value, bottom, label in zip(
                (neg[0], zero[0], pos[0]), bottoms, ("negative", "zero", "positive"), strict=True
            ):
                ax.bar(xs, [value], bottom=[bottom], width=0.5, label=label, alpha=0.85)
        else:
            ax.stackplot(xs, neg, zero, pos, labels=["negative", "zero", "positive"], alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_title(f"{layer} (sparsity {zero[-1]:.0%})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    return _finish(plt, fig, title, path)


def latent_weights(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, float, float]]:
    """``{layer: (latent weight, Wp, Wn)}`` for every TTQ layer of a (quantized) state dict.

    A TTQ layer is recognised by its ``<layer>.weight_quantizer.wp`` / ``.wn`` entries next to
    ``<layer>.weight`` (per-unit scales are averaged for the plot).
    """
    out = {}
    for key, wp in state_dict.items():
        if not key.endswith(".weight_quantizer.wp"):
            continue
        layer = key[: -len(".weight_quantizer.wp")]
        w = state_dict.get(f"{layer}.weight")
        wn = state_dict.get(f"{layer}.weight_quantizer.wn")
        if w is None or wn is None:
            continue
        out[layer] = (w.detach().float().cpu(), float(wp.float().mean()), float(wn.float().mean()))
    return out


def plot_histograms(
    weights: Mapping[str, tuple[torch.Tensor, float, float]],
    path: str | Path,
    t: float = 0.05,
    sparsity: float | None = None,
    title: str = "TTQ latent weights (final)",
) -> Path:
    """One panel per layer: histogram of the latent weights with ``±Delta`` dotted; the title
    gives the learned ``Wp``, ``Wn`` and the share of weights that quantize to 0."""
    if not weights:
        raise ValueError("no TTQ layers (keys '<layer>.weight_quantizer.wp') in this state dict")
    from lowbit.methods.ttq import ttq_threshold

    plt = _pyplot()
    fig, axes = _figure(plt, len(weights))
    for ax, (layer, (w, wp, wn)) in zip(axes.flat, weights.items(), strict=False):
        delta = float(ttq_threshold(w, t, sparsity).reshape(()))
        ax.hist(w.reshape(-1).numpy(), bins=100, color="0.55")
        for x in (-delta, delta):
            ax.axvline(x, color="k", linestyle=":", linewidth=1)
        zeros = float((w.abs() <= delta).float().mean())
        ax.set_title(f"{layer}: Wp={wp:.3g} Wn={wn:.3g} zeros {zeros:.0%}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(weights) :]:
        ax.axis("off")
    return _finish(plt, fig, title, path)


def _method_options(run_dir: Path) -> dict[str, Any]:
    cfg = run_dir / "config.json"
    if not cfg.exists():
        return {}
    from lowbit.train.runs import _method_parts

    method = json.loads(cfg.read_text()).get("method", {})
    return _method_parts(method)[1] if isinstance(method, dict) else {}


def _final_state(run_dir: Path) -> Mapping[str, torch.Tensor] | None:
    from lowbit.train.checkpoint import latest, load_checkpoint

    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return None
    path = latest(ckpt, kind="last") or latest(ckpt, kind="best")
    if path is None:
        return None
    state = load_checkpoint(path)
    return state.get("model", state)


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw ``ttq_scales.png``, ``ttq_sparsity.png`` and (with a checkpoint) ``ttq_histograms.png``
    into ``out_dir`` (default ``<run_dir>/plots``); returns the written paths."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    series = layer_series(read_metrics(run))
    paths = [
        plot_scales(series, out / "ttq_scales.png"),
        plot_sparsity(series, out / "ttq_sparsity.png"),
    ]
    state = _final_state(run)
    if state is not None:
        opts = _method_options(run)
        t = float(opts.get("t", 0.05) or 0.05)
        sparsity = opts.get("sparsity")
        paths.append(
            plot_histograms(
                latent_weights(state),
                out / "ttq_histograms.png",
                t=t,
                sparsity=None if sparsity is None else float(sparsity),
            )
        )
    return paths


if __name__ == "__main__":  # pragma: no cover - thin command-line wrapper
    if len(sys.argv) not in (2, 3):
        print("usage: python -m lowbit.report.ttq_plots RUN_DIR [OUT_DIR]", file=sys.stderr)
        raise SystemExit(2)
    for p in make_report(*sys.argv[1:]):
        print(p)
