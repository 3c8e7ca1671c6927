"""``lowbit reproduce RECIPE``: run a paper-table recipe and report the paper's number beside the
measured one; ``lowbit reproduce --list``: every recipe, the data it needs, whether it is here.

Two kinds of recipe (``[recipe] kind``):

* ``"train"`` (the default): the :class:`~lowbit.train.Trainer` trains ``[model]`` on ``[data]``
  with ``[method]`` and ``[train]``. ``[recipe] init_from = "<recipe or run dir>"`` fine-tunes from
  a float model: a recipe name is reproduced first (into ``<out>/<that recipe>``), a run
  directory is used as it is.
* ``"ptq"``: post-training quantization of the float model ``[recipe] init_from`` names (a recipe,
  trained first, or a run directory). ``[method] name = "fgq"`` and the other ``[method]`` keys
  are :func:`lowbit.ptq.fgq` options (``group_size``, ``weight_bits``, ``act_bits``, ``keep``, ...)
  plus ``calib_samples`` (training images used to calibrate, default 2048). Example::

      [recipe]
      name = "fgq-mnist-mlp-n4"
      kind = "ptq"
      init_from = "fgq-mnist-mlp-fp"
      [paper]
      metric = "test_error_percent"
      value = 1.9
      source = "..."
      [method]
      name = "fgq"
      group_size = 4
      act_bits = 8

Afterwards the final model is measured like the demo's (:func:`lowbit.report.results.measure`:
simulated and packed test error, ``.lowbit`` file size, compression, speed against float
PyTorch) and ``report.md`` / ``results.json`` / plots are written into the output directory.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data.core import DataSplits

__all__ = [
    "ReproduceResult",
    "TrainedModel",
    "format_recipe_list",
    "list_recipes",
    "recipe_kind",
    "reproduce",
    "train_budgeted",
]

Log = Callable[[str], None]


@dataclass
class TrainedModel:
    """A model trained (or post-training quantized) from a spec, with its run's facts."""

    model: nn.Module
    spec: dict[str, Any]
    splits: DataSplits
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    epochs_done: int = 0
    epochs: int = 0
    seconds: float = 0.0


def recipe_kind(spec: dict[str, Any]) -> str:
    """``"train"`` or ``"ptq"`` (``[recipe] kind``)."""
    kind = str(spec.get("recipe", {}).get("kind", "train"))
    if kind not in ("train", "ptq"):
        raise ValueError(
            f"recipe {spec['recipe'].get('name')}: kind must be 'train' or 'ptq', got {kind!r}"
        )
    return kind


def _method_parts(table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    t = dict(table)
    return str(t.pop("name", "fp")), t


def load_splits(
    table: dict[str, Any],
    data_dir: str | Path | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    cache: dict[str, DataSplits] | None = None,
) -> DataSplits:
    """The dataset of a spec's ``data`` table, optionally cut to the first samples of each split."""
    for what, n in (("train_samples", train_samples), ("test_samples", test_samples)):
        if n is not None and int(n) < 1:
            raise ValueError(f"{what} must be at least 1 (or None for the whole split), got {n}")
    from lowbit.train.runs import build_data

    key = repr(sorted(table.items())) + repr((train_samples, test_samples, str(data_dir)))
    if cache is not None and key in cache:
        return cache[key]
    splits = build_data(table, data_dir)
    if train_samples:
        splits.train = splits.train.subset(0, train_samples)
        if splits.valid is not None:
            splits.valid = splits.valid.subset(
                0, max(1, min(len(splits.valid), test_samples or len(splits.valid)))
            )
    if test_samples:
        splits.test = splits.test.subset(0, test_samples)
    if cache is not None:
        cache[key] = splits
    return splits


def train_budgeted(
    spec: dict[str, Any],
    splits: DataSplits,
    run_dir: str | Path,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    deadline: float | None = None,
    progress: bool = True,
    log: Log = print,
) -> TrainedModel:
    """Train ``spec`` on ``splits`` with the Trainer, one epoch per call so that a wall-clock
    ``deadline`` (``time.perf_counter()`` value) can end it early (at least one epoch runs; the run
    directory stays resumable). ``init_state``: float weights loaded before quantizing."""
    from lowbit.train.runs import make_trainer

    t0 = time.perf_counter()
    trainer = make_trainer(spec, splits, run_dir, progress, init_state)
    cfg = trainer.config
    summary: dict[str, Any] = {}
    while trainer.epoch < cfg.epochs:
        summary = trainer.fit(stop_after_epochs=1)
        if deadline is not None and trainer.epoch < cfg.epochs and time.perf_counter() > deadline:
            log(
                f"  time budget: stopping after {trainer.epoch}/{cfg.epochs} epochs "
                "(raise --budget or lower --epochs to change this)"
            )
            break
    trainer.model.eval()
    return TrainedModel(
        trainer.model,
        spec,
        splits,
        Path(run_dir),
        summary,
        trainer.epoch,
        cfg.epochs,
        time.perf_counter() - t0,
    )


def ptq_from(
    float_model: nn.Module, spec: dict[str, Any], splits: DataSplits, run_dir: str | Path
) -> TrainedModel:
    """Post-training quantization (``[method]`` = ``lowbit.ptq.fgq`` options) of a float model."""
    from lowbit import ptq

    t0 = time.perf_counter()
    name, options = _method_parts(spec["method"])
    if name != "fgq":
        raise ValueError(f"post-training recipes support method 'fgq' only, got {name!r}")
    calib = int(options.pop("calib_samples", 2048))
    if "keep" in options and isinstance(options["keep"], list):
        options["keep"] = tuple(options["keep"])
    net = ptq.fgq(copy.deepcopy(float_model).eval(), splits.train.x[:calib], **options)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return TrainedModel(net, spec, splits, Path(run_dir), {}, 0, 0, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# --list


def list_recipes(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every installed recipe: name, kind, model, dataset, method, epochs, paper number, and
    whether its data (and that of the float recipe it starts from) is present offline."""
    from lowbit import data as data_mod
    from lowbit.train.config import RECIPE_DIR, load_recipe

    present = {r["name"]: (r["available"], r["where"]) for r in data_mod.status(data_dir)}
    rows: list[dict[str, Any]] = []
    for path in sorted(RECIPE_DIR.glob("*.toml")):
        try:
            spec = load_recipe(str(path))
        except (ValueError, OSError) as exc:
            rows.append({"name": path.stem, "error": str(exc)})
            continue
        ds = spec["data"].get("name", "")
        init = spec["recipe"].get("init_from", "")
        if not ds and init and (RECIPE_DIR / f"{init}.toml").exists():
            ds = load_recipe(init)["data"].get("name", "")
        ok, where = present.get(ds, (False, f"no loader for dataset {ds!r} in lowbit.data"))
        paper = spec.get("paper", {})
        rows.append(
            {
                "name": spec["recipe"]["name"],
                "kind": recipe_kind(spec),
                "model": spec["model"].get("name", ""),
                "dataset": ds,
                "method": spec["method"].get("name", "fp"),
                "epochs": spec["train"].get("epochs"),
                "init_from": spec["recipe"].get("init_from", ""),
                "paper_value": paper.get("value"),
                "paper_metric": paper.get("metric", ""),
                "paper_source": paper.get("source", ""),
                "data_available": bool(ok),
                "data_where": where,
                "description": spec["recipe"].get("description", ""),
            }
        )
    return rows


def format_recipe_list(rows: list[dict[str, Any]]) -> str:
    """``lowbit reproduce --list`` as plain aligned text, then where each missing dataset goes."""
    header = ["name", "kind", "method", "model", "data", "here", "epochs", "paper", "starts from"]
    cells = []
    missing: dict[str, str] = {}
    for r in rows:
        if "error" in r:
            cells.append([r["name"], "error", r["error"], "", "", "", "", "", ""])
            continue
        metric = {"test_error_percent": "% err"}.get(r["paper_metric"], r["paper_metric"])
        paper = "-" if r["paper_value"] is None else f"{r['paper_value']:g} {metric}".strip()
        if not r["data_available"]:
            missing[r["dataset"]] = r["data_where"]
        cells.append(
            [
                r["name"],
                r["kind"],
                r["method"],
                r["model"],
                r["dataset"],
                "yes" if r["data_available"] else "no",
                str(r["epochs"] if r["epochs"] is not None else "-"),
                paper,
                r["init_from"] or "-",
            ]
        )
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *cells]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if missing:
        lines += ["", "data not present offline (put the files there, or run with network access):"]
        lines += [f"  {name}: {where}" for name, where in sorted(missing.items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# reproduce


@dataclass
class ReproduceResult:
    out_dir: Path
    rows: list[Any]
    report: Path
    trained: TrainedModel
    seconds: float


def _resolve_init(
    spec: dict[str, Any], out_dir: Path, overrides: dict[str, Any], log: Log, depth: int
) -> tuple[dict[str, torch.Tensor] | None, nn.Module | None, list[Any], dict[str, Any]]:
    """Float weights to start from: ``[recipe] init_from`` (or ``[train] init_from``) as a recipe
    name (reproduced first, into ``out_dir/<name>``) or a run directory / checkpoint."""
    from lowbit.train.config import RECIPE_DIR

    source = spec["recipe"].get("init_from") or spec["train"].pop("init_from", None)
    spec["train"].pop("init_from", None)
    if not source:
        return None, None, [], {}
    if (RECIPE_DIR / f"{source}.toml").exists() or str(source).endswith(".toml"):
        if depth > 3:
            raise ValueError(f"init_from chain too deep at {source!r}")
        log(f"init_from = {source!r}: reproducing that recipe first")
        sub = reproduce(
            str(source), out_dir / Path(str(source)).stem, log=log, _depth=depth + 1, **overrides
        )
        model = sub.trained.model
        return model.state_dict(), model, sub.rows, sub.trained.spec
    from lowbit.ptq import load_float_model

    net, info = load_float_model(source)
    base = {
        "model": {"name": info["model"]["name"], **info["model"]["options"]},
        "data": info["data"],
    }
    return net.state_dict(), net, [], base


def refuse_used_output(out: Path, flag: str) -> None:
    """Reports and runs never go into a folder that already holds something: its training runs
    would be refused (or mixed) half-way, and its report overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "is not empty"
        raise ValueError(
            f"{out} {what}: choose another output folder ({flag} DIR), or delete it first "
            f"(rm -r {out}) to run again from scratch"
        )


def reproduce(
    recipe: str,
    out_dir: str | Path | None = None,
    *,
    epochs: int | None = None,
    data_dir: str | Path | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    progress: bool = True,
    timing: bool = True,
    log: Log = print,
    _depth: int = 0,
) -> ReproduceResult:
    """Run ``recipe`` (a name or a ``.toml`` path) and write the paper-vs-measured report.

    ``epochs`` overrides ``[train] epochs`` (of this recipe and of the one it starts from);
    ``train_samples`` / ``test_samples`` cut the splits (smoke runs).
    """
    from lowbit.train.config import load_recipe

    t0 = time.perf_counter()
    spec = load_recipe(recipe)
    kind = recipe_kind(spec)
    name = spec["recipe"]["name"]
    out = (
        Path(out_dir)
        if out_dir is not None
        else Path("runs") / f"reproduce-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    recipe_epochs = spec["train"].get("epochs")
    if _depth == 0:
        refuse_used_output(out, "-o")
    created = not out.exists()
    try:
        return _reproduce_into(
            spec, kind, name, out, recipe_epochs, t0, epochs, data_dir, train_samples,
            test_samples, progress, timing, log, _depth,
        )  # fmt: skip
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder
        raise


def _reproduce_into(
    spec: dict[str, Any],
    kind: str,
    name: str,
    out: Path,
    recipe_epochs: Any,
    t0: float,
    epochs: int | None,
    data_dir: str | Path | None,
    train_samples: int | None,
    test_samples: int | None,
    progress: bool,
    timing: bool,
    log: Log,
    _depth: int,
) -> ReproduceResult:
    """The body of :func:`reproduce` once the output folder is chosen."""
    from lowbit.report import plots as P
    from lowbit.report import ttq_plots
    from lowbit.report.markdown import write_report
    from lowbit.report.results import environment, format_table, measure
    from lowbit.train.runs import build_model

    if epochs is not None:
        spec["train"]["epochs"] = int(epochs)
        ms = [m for m in spec["train"].get("milestones", []) if m < epochs]
        spec["train"]["milestones"] = ms
    overrides = {
        "epochs": epochs,
        "data_dir": data_dir,
        "train_samples": train_samples,
        "test_samples": test_samples,
        "progress": progress,
        "timing": timing,
    }
    init_state, init_model, earlier, base = _resolve_init(spec, out, overrides, log, _depth)
    for table in ("model", "data"):
        if not spec[table].get("name"):
            if not base.get(table, {}).get("name"):
                raise ValueError(
                    f"recipe {name}: no [{table}] name (and no init_from model to take it from)"
                )
            spec[table] = dict(base[table])
    splits = load_splits(spec["data"], data_dir, train_samples, test_samples)
    out.mkdir(parents=True, exist_ok=True)
    log(f"reproduce {name} ({kind}): {spec['recipe'].get('description', '')}")
    if epochs is not None and kind != "ptq":
        log(f"  --epochs {epochs}: {epochs} of the recipe's {recipe_epochs} epochs (a smoke run)")
    if train_samples is not None:
        log(f"  --train-samples {train_samples}: the first {train_samples} training samples only")
    if kind == "ptq":
        if init_model is None:
            raise ValueError(
                f"ptq recipe {name}: [recipe] init_from must name the float model (a recipe or run dir)"
            )
        trained = ptq_from(init_model, spec, splits, out / "run")
    else:
        trained = train_budgeted(
            spec, splits, out / "run", init_state=init_state, progress=progress, log=log
        )
    float_model = build_model(spec["model"], splits).eval()
    if splits.task == "classification":
        log("packing, saving, reloading, evaluating and timing the model ...")
    paper = spec.get("paper", {})
    rows = []
    if splits.task == "classification":
        arch = {
            "name": spec["model"]["name"],
            "options": {k: v for k, v in spec["model"].items() if k != "name"},
        }
        arch["options"].setdefault("input_shape", list(splits.input_shape))
        arch["options"].setdefault("num_classes", int(splits.num_classes))
        row, _ = measure(
            name,
            spec["method"].get("name", "fp"),
            trained.model,
            float_model,
            splits.test,
            out / "models" / f"{name}.lowbit",
            architecture=arch,
            timing=timing,
            xnor=spec["method"].get("name") == "bnn",
        )
    else:
        from lowbit.report.results import ModelRow

        row = ModelRow(name, spec["method"].get("name", "fp"), "-", "-", "-", float("nan"))
        row.packed_note = "n/a: packed evaluation covers classification models only"
    row.paper_value = paper.get("value")
    row.paper_metric = str(paper.get("metric", ""))
    row.paper_source = str(paper.get("source", ""))
    row.protocol_error = trained.summary.get("test_error_at_best")
    row.train_seconds = trained.seconds
    row.epochs = f"{trained.epochs_done}/{trained.epochs}" if trained.epochs else "post-training"
    row.run_dir = str(trained.run_dir)
    rows = [*earlier, row]
    figs = []
    if kind == "train":
        runs = {r.name: r.run_dir for r in rows if r.run_dir}
        fig = P.plot_training_curves(runs, out / "plots" / "training_curves.png")
        figs += [fig] if fig else []
    if spec["method"].get("name") == "ttq" and kind == "train":
        try:
            figs += ttq_plots.make_report(trained.run_dir, out / "plots")
        except (ValueError, FileNotFoundError) as exc:
            log(f"  (TTQ plots skipped: {exc})")
    fig = P.plot_weight_histograms({name: trained.model}, out / "plots" / "weight_histograms.png")
    figs += [fig] if fig else []
    seconds = time.perf_counter() - t0
    verdict = ""
    measured = row.protocol_error
    how = "best-validation epoch"
    unit = "%"
    if splits.task != "classification":
        measured = trained.summary.get("test_loss_at_best")
        how, unit = "test loss at the best-validation epoch", ""
        row.protocol_error = measured
    elif measured is None:
        measured = row.packed_error if row.packed_error is not None else row.sim_error
        how = "packed model" if row.packed_error is not None else "simulated model"
    if row.paper_value is not None and measured is not None and measured == measured:
        verdict = (
            f"Measured {measured:.2f}{unit} ({how}) against the paper's {row.paper_value:g}{unit} "
            f"({measured - row.paper_value:+.2f} points; "
            + (
                f"{trained.epochs_done} of the recipe's {recipe_epochs} epochs"
                if trained.epochs
                else "post-training"
            )
            + (f"; first {train_samples} training samples only" if train_samples else "")
            + ")."
        )
    elif row.paper_value is None:
        verdict = "This recipe carries no paper number" + (
            f"; its [paper] source says: {row.paper_source.rstrip('.')}."
            if row.paper_source
            else "."
        )
        cut = (
            [f"{trained.epochs_done} of the recipe's {recipe_epochs} epochs"]
            if (trained.epochs and recipe_epochs and trained.epochs_done != recipe_epochs)
            else []
        )
        cut += [f"first {train_samples} training samples only"] if train_samples else []
        if cut:  # a smoke run says so even without a number to compare with
            verdict += f" Measured on a cut-down run: {'; '.join(cut)}."
    facts = {
        "recipe": f"{name} ({spec['recipe'].get('path')})",
        "paper source": row.paper_source or "-",
        "epochs": row.epochs,
        "train/test samples": f"{len(splits.train)}/{len(splits.test)}",
        "wall time (s)": round(seconds, 1),
        **{k: v for k, v in environment().items()},
    }
    md, _ = write_report(
        out, f"lowbit reproduce {name}", rows, intro=verdict, plots=figs, facts=facts, paper=True
    )
    log(format_table(rows, paper=True))
    if verdict:
        log(verdict)
    return ReproduceResult(out, rows, md, trained, seconds)
