"""``lowbit demo``: the whole library on embedded MNIST, offline, in minutes on two CPU cores.

1. a float MLP (recipe ``ttq-mnist-mlp-fp``);
2. FGQ post-training quantization of it: ternary weights in groups of N = 4 sharing one scale,
   8-bit dynamic fixed point activations (``lowbit.ptq.fgq``);
3. TTQ fine-tuned from it (``ttq-mnist-mlp``): ternary weights with learned Wp / Wn;
4. a BNN (``bnn-mnist-small``): binary weights *and* activations;
5. a loss-aware ternary model LAT2 (``lat2-mnist-small``) and 6. a 3-bit LAQ (``laq-mnist-small``);

then every model is packed (``lowbit.pack``), saved to a ``.lowbit`` file, loaded back and run on
the test set, and one table compares test error (simulated and packed), file size, compression
and speed against float PyTorch. A report (``report.md`` + PNG figures + ``results.json``) goes to
the run directory.

Budget: the recipes' settings with fewer epochs (:data:`DEMO_EPOCHS`; ``epochs=`` sets them all,
``full=True`` uses the recipes' own) and a wall-clock ``budget``: each training stage stops after
the epoch that crosses its share of the budget (at least one epoch always runs).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit import kernels

__all__ = ["DEMO_EPOCHS", "STAGES", "DemoConfig", "DemoResult", "kernel_self_check", "run_demo"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """One trained model of the demo: its label, the recipe it follows, demo epochs, budget weight."""

    key: str
    label: str
    recipe: str
    epochs: int
    weight: float
    init_from_float: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("fp", "float", "ttq-mnist-mlp-fp", 3, 1.0),
    Stage("ttq", "TTQ", "ttq-mnist-mlp", 2, 1.5, init_from_float=True),
    Stage("bnn", "BNN", "bnn-mnist-small", 3, 2.0),
    Stage("lat2", "LAT2", "lat2-mnist-small", 2, 3.0),
    Stage("laq", "LAQ 3-bit", "laq-mnist-small", 2, 3.0),
)
DEMO_EPOCHS = {s.key: s.epochs for s in STAGES}
TRAIN_SHARE = 0.8  # of the budget for training; the rest packs, evaluates, times and reports


@dataclass
class DemoConfig:
    """Knobs of the demo (all ``lowbit demo`` options)."""

    out: str | Path | None = None
    epochs: int | None = None
    full: bool = False
    budget: float = 540.0
    threads: int | None = None
    widths: tuple[int, ...] | None = None
    dataset: str = "mnist"
    data_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | Path | None = None
    train_samples: int | None = None
    test_samples: int | None = None
    fgq_group_size: int = 4
    fgq_act_bits: int = 8
    fgq_scale_bits: int | None = 8  # one byte per group scale (docs/methods/fgq.md)
    methods: tuple[str, ...] = ("fp", "fgq", "ttq", "bnn", "lat2", "laq")
    timing: bool = True
    reps: int = 20
    progress: bool = True
    plots: bool = True
    keep_checkpoints: bool = False


@dataclass
class DemoResult:
    out_dir: Path
    rows: list[Any]
    table: str
    report: Path
    seconds: float
    models: dict[str, torch.nn.Module]
    packed: dict[str, torch.nn.Module | None]
    splits: dict[str, Any]


def kernel_self_check(
    m: int = 64, n: int = 1024, k: int = 1000, seed: int = 0
) -> list[tuple[str, float]]:
    """Binary GEMM through every supported ISA path vs the int64 reference; returns (isa, ms)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    expected = kernels.binary_matmul_reference(np.where(a < 0, -1, 1), np.where(w < 0, -1, 1))
    timings = []
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            a_bits = kernels.pack_signs(torch.from_numpy(a))
            w_bits = kernels.pack_signs(torch.from_numpy(w))
            start = time.perf_counter()
            got = kernels.binary_gemm(a_bits, w_bits, k)
            elapsed = (time.perf_counter() - start) * 1e3
        if not np.array_equal(got.numpy(), expected):
            raise RuntimeError(f"binary GEMM on the {isa} path disagrees with the int64 reference")
        timings.append((isa, elapsed))
    return timings


def _stage_spec(stage: Stage, cfg: DemoConfig) -> dict[str, Any]:
    """The recipe's spec with the demo's budget applied."""
    from lowbit.train.config import load_recipe

    spec = load_recipe(stage.recipe)
    spec["recipe"].pop("init_from", None)
    train = spec["train"]
    if not cfg.full:
        train["epochs"] = cfg.epochs or stage.epochs
        # A step schedule whose milestones lie beyond the shortened run would never decay:
        # anneal per step instead (what makes a 1-3 epoch MNIST MLP converge).
        if train.get("schedule") == "step" and all(
            m >= train["epochs"] for m in train.get("milestones", [])
        ):
            train["schedule"] = "cosine"
            train.pop("milestones", None)
    elif cfg.epochs:
        train["epochs"] = cfg.epochs
    if cfg.widths:
        spec["model"]["widths"] = list(cfg.widths)
    if cfg.dataset != spec["data"].get("name"):
        spec["data"] = {"name": cfg.dataset, "preprocess": spec["data"].get("preprocess", "unit")}
    spec["data"].update(cfg.data_options)
    train["log_every"] = 15.0
    return spec


def _architecture(spec: dict[str, Any], splits: Any) -> dict[str, Any]:
    opts = {k: v for k, v in spec["model"].items() if k != "name"}
    opts.setdefault("input_shape", list(splits.input_shape))
    opts.setdefault("num_classes", int(splits.num_classes))
    return {"name": spec["model"]["name"], "options": opts}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run_demo(config: DemoConfig | None = None, log: Log | None = None) -> DemoResult:
    """Run the demo (see the module docstring); returns the rows, table, report path and models."""
    from lowbit.report import plots as P
    from lowbit.report import ttq_plots
    from lowbit.report.markdown import write_report
    from lowbit.report.results import environment, format_table, measure
    from lowbit.reproduce import (
        TrainedModel,
        load_splits,
        ptq_from,
        refuse_used_output,
        train_budgeted,
    )
    from lowbit.train.runs import build_model

    cfg = config or DemoConfig()
    say: Log = log or (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    refuse_used_output(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    feats = kernels.cpu_features()
    load0 = os.getloadavg()
    say(
        f"lowbit demo -> {out}\n  kernels: {feats['active']} path; torch threads {torch.get_num_threads()} "
        f"of {os.cpu_count()} CPUs; load average {load0[0]:.2f}; budget {cfg.budget:.0f} s"
        + (" (recipes' full epochs)" if cfg.full else "")
    )
    stages = [
        s
        for s in STAGES
        if s.key in cfg.methods
        or (s.key == "fp" and ("fgq" in cfg.methods or "ttq" in cfg.methods))
    ]
    total_weight = sum(s.weight for s in stages) or 1.0
    cache: dict[str, Any] = {}
    trained: dict[str, TrainedModel] = {}
    labels: dict[str, str] = {}
    done_weight = 0.0
    n_steps = len(stages) + (1 if "fgq" in cfg.methods else 0)
    step = 0
    for stage in stages:
        spec = _stage_spec(stage, cfg)
        splits = load_splits(spec["data"], cfg.data_dir, cfg.train_samples, cfg.test_samples, cache)
        done_weight += stage.weight
        deadline = (
            t_start + cfg.budget * TRAIN_SHARE * done_weight / total_weight
            if cfg.budget > 0
            else None
        )
        init = (
            trained["fp"].model.state_dict() if stage.init_from_float and "fp" in trained else None
        )
        step += 1
        m = spec["method"]
        say(
            f"[{step}/{n_steps}] {stage.label}: {spec['model']['name']} widths {spec['model'].get('widths')}, "
            f"method {m.get('name')}, {_count(spec['train']['epochs'], 'epoch')} on {len(splits.train)} "
            f"{splits.name} images{' (fine-tuned from the float model)' if init is not None else ''}"
        )
        result = train_budgeted(
            spec,
            splits,
            out / "runs" / stage.key,
            init_state=init,
            deadline=deadline,
            progress=cfg.progress,
            log=say,
        )
        trained[stage.key] = result
        labels[stage.key] = stage.label
        say(f"  done in {result.seconds:.1f} s ({_count(result.epochs_done, 'epoch')})")
        if stage.key == "fp" and "fgq" in cfg.methods:
            step += 1
            say(
                f"[{step}/{n_steps}] FGQ post-training: ternary groups of N={cfg.fgq_group_size}"
                + (f" with {cfg.fgq_scale_bits}-bit scales" if cfg.fgq_scale_bits else "")
                + f", {cfg.fgq_act_bits}-bit DFP activations, calibrated on 2048 training images"
            )
            fspec = copy.deepcopy(spec)
            fspec["method"] = {
                "name": "fgq",
                "group_size": cfg.fgq_group_size,
                "weight_bits": 2,
                "act_bits": cfg.fgq_act_bits,
                "scale_bits": cfg.fgq_scale_bits,
            }
            f = ptq_from(result.model, fspec, splits, out / "runs" / "fgq")
            trained["fgq"] = f
            labels["fgq"] = f"FGQ N={cfg.fgq_group_size}"
            say(f"  done in {f.seconds:.1f} s")
    order = [
        k for k in ("fp", "fgq", "ttq", "bnn", "lat2", "laq") if k in trained and k in cfg.methods
    ]
    say(
        f"Packing, saving, reloading and evaluating {len(order)} models on the test set, timing against float PyTorch ..."
    )
    rows = []
    packed: dict[str, torch.nn.Module | None] = {}
    for key in order:
        t = trained[key]
        float_model = build_model(t.spec["model"], t.splits).eval()
        row, p = measure(
            labels[key],
            key,
            t.model,
            float_model,
            t.splits.test,
            out / "models" / f"{key}.lowbit",
            architecture=_architecture(t.spec, t.splits),
            reps=cfg.reps,
            timing=cfg.timing,
            xnor=key == "bnn",  # binary weights and activations: the XNOR-popcount chain
        )
        row.train_seconds = round(t.seconds, 1)
        row.epochs = f"{t.epochs_done}/{t.epochs}" if t.epochs else "post-training"
        row.protocol_error = t.summary.get("test_error_at_best")
        row.run_dir = str(t.run_dir) if t.epochs else ""
        rows.append(row)
        packed[key] = p
    table = format_table(rows)
    (out / "table.txt").write_text(table + "\n")
    figs: list[Path] = []
    if cfg.plots:
        say("Drawing the report figures ...")
        curves = P.plot_training_curves(
            {labels[k]: trained[k].run_dir for k in order if trained[k].epochs},
            out / "plots" / "training_curves.png",
        )
        figs += [curves] if curves else []
        if "ttq" in trained:
            try:
                figs += ttq_plots.make_report(trained["ttq"].run_dir, out / "plots")
            except (ValueError, FileNotFoundError) as exc:
                say(f"  (TTQ plots skipped: {exc})")
        hist = P.plot_weight_histograms(
            {labels[k]: trained[k].model for k in order}, out / "plots" / "weight_histograms.png"
        )
        figs += [hist] if hist else []
        trade = P.plot_tradeoff(rows, out / "plots" / "tradeoff.png")
        figs += [trade] if trade else []
    if not cfg.keep_checkpoints:
        # The .lowbit files are the demo's models; per-epoch training checkpoints (with optimizer
        # state) would be most of the run directory's size.
        for key in order:
            ckpt = trained[key].run_dir / "checkpoints"
            if trained[key].epochs and ckpt.is_dir():
                shutil.rmtree(ckpt)
    seconds = time.perf_counter() - t_start
    load1 = os.getloadavg()
    facts = {
        "command": " ".join(["lowbit", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("lowbit")
        else "lowbit.demo.run_demo(...)",
        "wall time (s)": round(seconds, 1),
        "time budget (s)": cfg.budget,
        "epochs per model": ", ".join(
            f"{labels[k]} {r.epochs}" for k, r in zip(order, rows, strict=True)
        ),
        "train seconds": ", ".join(
            f"{labels[k]} {r.train_seconds}" for k, r in zip(order, rows, strict=True)
        ),
        "data": f"{cfg.dataset}: {len(trained[order[0]].splits.train)} train / {len(trained[order[0]].splits.test)} test images"
        if order
        else "-",
        "load average (start, end)": f"{load0[0]:.2f}, {load1[0]:.2f}",
        **environment(),
    }
    intro = (
        "Every model below was trained (or post-training quantized) in this run, packed with "
        "`lowbit.pack`, written to a `.lowbit` file, loaded back with `lowbit.load` and evaluated "
        "on the test set. Speeds are the packed models against float32 PyTorch running the same "
        f"architecture, same process, {torch.get_num_threads()} thread(s); on a shared machine they "
        "vary from run to run (load average in the facts below)."
    )
    checks = ["## Targets", ""]
    for r in rows:
        if r.method == "fp":
            continue
        size = "-" if r.layer_compression is None else f"{r.layer_compression:.1f}x"
        wsize = "-" if r.weight_compression is None else f"{r.weight_compression:.1f}x"
        # three decimals: a 1.003x must not read as "1.00x ... met"
        fast = "-" if r.speedup is None else f"{r.speedup:.3f}x"
        checks.append(
            f"- {r.name}: quantized layers {size} smaller than float32 with their fp32 biases, "
            f"{wsize} for the weight matrices and their scales alone (target >= 15x: "
            f"{'met' if (r.layer_compression or 0) >= 15 else 'not met'} / "
            f"{'met' if (r.weight_compression or 0) >= 15 else 'not met'}); packed throughput "
            f"{fast} float PyTorch (target > 1x: {'met' if (r.speedup or 0) > 1 else 'not met'})"
        )
    md, _ = write_report(
        out, "lowbit demo", rows, intro=intro, plots=figs, facts=facts, extra="\n".join(checks)
    )
    say("")
    say(table)
    say("")
    say(
        f"demo finished in {seconds:.1f} s (load average {load0[0]:.2f} at start, {load1[0]:.2f} at end); report: {md}"
    )
    return DemoResult(
        out,
        rows,
        table,
        md,
        seconds,
        {k: trained[k].model for k in order},
        packed,
        {k: trained[k].splits for k in order},
    )
