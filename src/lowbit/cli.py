"""The ``lowbit`` command line (typer). ``lowbit --help`` lists every command.

Each command is a thin wrapper: argument parsing and printing here, the work in the library
modules, so everything the CLI does is also reachable from Python.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import typer

import lowbit

app = typer.Typer(
    name="lowbit",
    help="Train, convert and run binary, ternary and low-bit neural networks — truly smaller and faster on the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lowbit {lowbit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
        metavar="",
    ),
) -> None:
    """lowbit: TTQ, BNN/QNN, loss-aware (LAB/LAT/LAQ) and FGQ/DFP quantization with packed C++ kernels."""


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def error_text(exc: BaseException, max_lines: int = 12) -> str:
    """An exception's message for the terminal: all of it, up to ``max_lines`` lines (PyTorch's
    ``load_state_dict`` errors, for one, name the mismatched tensors on the lines after the
    first)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def _not_yet(what: str, issue: int) -> None:
    fail(
        f"`lowbit {what}` is not available in this version yet (tracked in issue #{issue}).", code=3
    )


@app.command("cpu")
def cpu_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.", metavar="")) -> None:
    """Show the CPU features and which kernel path (scalar/avx2/avx512) runs."""
    feats = lowbit.kernels.cpu_features()
    if as_json:
        typer.echo(json.dumps(feats, indent=2))
        return
    have = [f for f, ok in feats["flags"].items() if ok]
    typer.echo(
        f"kernel path : {feats['active']}"
        + (f" (forced by LOWBIT_ISA={feats['forced']})" if feats["forced"] else "")
    )
    typer.echo(f"supported   : {', '.join(feats['supported'])}")
    typer.echo(f"compiled    : {', '.join(feats['compiled'])}")
    typer.echo(f"threads     : {feats['threads']}")
    typer.echo(f"cpu flags   : {' '.join(have)}")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option(None, "--out", "-o", help="Run directory (default runs/demo-TIME)."),
    epochs: int = typer.Option(
        None,
        "--epochs",
        help="Epochs of every trained model (default: 2-3 each, see lowbit.demo.STAGES).",
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="The recipes' own epochs and schedules (longer, better models).",
        metavar="",
    ),
    budget: float = typer.Option(
        540.0,
        "--budget",
        help="Wall-clock seconds for the whole demo: training stops early past its share (0 = no limit).",
    ),
    threads: int = typer.Option(
        None, "--threads", help="torch / kernel threads (default: torch's default)."
    ),
    widths: str = typer.Option(
        None, "--widths", help="Hidden widths of every MLP, e.g. 256,256 (default: the recipes')."
    ),
    train_samples: int = typer.Option(
        None, "--train-samples", help="Use only the first N training images."
    ),
    methods: str = typer.Option(
        "fp,fgq,ttq,bnn,lat2,laq",
        "--methods",
        help="Comma list of models to build (fp is always trained when fgq or ttq need it).",
    ),
    data_dir: str = typer.Option(
        None, "--data-dir", help="Dataset directory (MNIST is embedded; not needed)."
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="No live progress bars (epoch lines only).", metavar=""
    ),
    keep_checkpoints: bool = typer.Option(
        False,
        "--keep-checkpoints",
        help="Keep the per-epoch training checkpoints (default: only the .lowbit models and metrics stay).",
        metavar="",
    ),
    check_kernels: bool = typer.Option(
        False,
        "--check-kernels",
        help="Only check the binary GEMM on every ISA path and exit.",
        metavar="",
    ),
) -> None:
    """Train float, FGQ, TTQ, BNN, LAT2 and 3-bit LAQ MLPs on embedded MNIST, pack them, and print
    one table (test error simulated/packed, file size, compression, speed vs float PyTorch);
    writes a Markdown + PNG report to the run directory."""
    from lowbit.demo import DemoConfig, kernel_self_check, run_demo

    if check_kernels:
        for isa, ms in kernel_self_check():
            typer.echo(f"  {isa:<7} binary GEMM bit-exact  {ms:7.3f} ms")
        return
    try:
        width_t = tuple(int(w) for w in widths.split(",") if w.strip()) if widths else None
    except ValueError:
        fail(f"--widths expects integers like 256,256, got {widths!r}")
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    valid = ("fp", "fgq", "ttq", "bnn", "lat2", "laq")
    bad = [m for m in chosen if m not in valid]
    if bad:
        fail(f"unknown --methods {', '.join(bad)}; valid: {', '.join(valid)}")
    if epochs is not None and epochs < 1:
        fail("--epochs must be at least 1")
    cfg = DemoConfig(
        out=out,
        epochs=epochs,
        full=full,
        budget=budget,
        threads=threads,
        widths=width_t,
        train_samples=train_samples,
        methods=chosen,
        data_dir=data_dir,
        progress=not no_progress,
        keep_checkpoints=keep_checkpoints,
    )
    try:
        run_demo(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(error_text(exc), code=1)


def _data_registry() -> dict[str, Any]:
    from lowbit.data import DATASETS

    return DATASETS


def _check_resume_flags(run_dir: str, stored: dict, **given: object) -> None:
    """``--resume --run-dir R`` continues R's stored model, data and method: a flag that says
    otherwise is an error, not silently ignored (train flags like --epochs may change)."""
    clashes = []
    method = given.pop("method")
    if method is not None and method != stored["method"].get("name"):
        clashes.append(f"--method {method} (the run's is {stored['method'].get('name')})")
    defaults: dict[str, Any] = {}
    spec = _data_registry().get(str(stored["data"].get("name")))
    if spec is not None:  # what an unstored data key meant: the dataset's default
        defaults = {"split": spec.default_split, "preprocess": spec.default_preprocess}
        defaults["augment"] = "none"
    for table, flag in (
        ("model", "-M"),
        ("data", "-D/--split/--preprocess/--augment"),
        ("method_opts", "-Q"),
    ):
        opts = given[table]
        have = stored["method" if table == "method_opts" else table]
        assert isinstance(opts, dict)
        for key, value in opts.items():
            if have.get(key, defaults.get(key) if table == "data" else None) != value:
                clashes.append(f"{flag} {key}={value!r} (the run's is {have.get(key)!r})")
    if clashes:
        raise ValueError(
            f"--resume continues {run_dir} with its stored model, data and method, but "
            + "; ".join(clashes)
            + ": drop those flags, or start a new run in another --run-dir"
        )


def _refuse_recipe_init(name: str, init: str) -> None:
    """A recipe that fine-tunes from another run (``[recipe] init_from``) cannot start from
    random weights by accident: say what to run instead."""
    from pathlib import Path

    if Path(init).exists():
        return  # a run directory or checkpoint: the caller starts from it
    raise ValueError(
        f"recipe {name} fine-tunes from {init} ([recipe] init_from): run `lowbit reproduce {name}` "
        f"(trains {init} first), or pass --set init_from=RUN_DIR with a finished run of {init}, "
        "or --set init_from= to start from random weights"
    )


def _keep_tuple(keep: str) -> tuple[str, ...]:
    """``--keep``: ``'first,last'``, globs, or ``'none'`` / ``''`` for no float layers."""
    if keep.strip().lower() in ("", "none"):
        return ()
    return tuple(k.strip() for k in keep.split(",") if k.strip())


@app.command("train")
def train_cmd(
    model: str = typer.Option(None, "--model", help="Model name (see `lowbit models`)."),
    dataset: str = typer.Option(None, "--dataset", help="Dataset name (see `lowbit datasets`)."),
    method: str = typer.Option(
        None, "--method", help="fp or any registered method (lowbit.methods.available())."
    ),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="Recipe NAME (lowbit/recipes/NAME.toml) or a .toml file; flags override it.",
    ),
    epochs: int = typer.Option(None, "--epochs", help="Number of epochs."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch size."),
    lr: float = typer.Option(None, "--lr", help="Base learning rate."),
    optimizer: str = typer.Option(None, "--optimizer", help="adam | sgd | adamax | shift_adamax."),
    schedule: str = typer.Option(
        None, "--schedule", help="constant | step | exp | cosine (the default without a recipe)."
    ),
    milestones: str = typer.Option(None, "--milestones", help="Step schedule epochs, e.g. 15,25."),
    gamma: float = typer.Option(
        None, "--gamma", help="LR factor per milestone (step) or per epoch (exp)."
    ),
    loss: str = typer.Option(
        None, "--loss", help="cross_entropy (alias ce) | squared_hinge (aliases hinge, l2svm)."
    ),
    weight_decay: float = typer.Option(
        None, "--weight-decay", help="L2 weight decay on weights (ndim >= 2)."
    ),
    seed: int = typer.Option(None, "--seed", help="Random seed (default 0)."),
    device: str = typer.Option(None, "--device", help="cpu (default), cuda, cuda:N."),
    threads: int = typer.Option(None, "--threads", help="torch intra-op threads."),
    split: str = typer.Option(
        None, "--split", help="Split scheme (paper, full, ...; see `lowbit datasets`)."
    ),
    preprocess: str = typer.Option(
        None, "--preprocess", help="unit | bnn | center | standardize | ttq | gcn_zca."
    ),
    augment: str = typer.Option(
        None,
        "--augment",
        help="none | flip | padcropflip (in-memory images); imagenet: rrcflip | ttq | flip | none.",
    ),
    data_dir: str = typer.Option(
        None, "--data-dir", help="Dataset directory (default $LOWBIT_DATA_DIR or ~/.cache/lowbit)."
    ),
    model_opt: list[str] = typer.Option(
        [],
        "--model-opt",
        "-M",
        help="Model option key=value (repeatable), e.g. -M widths=[2048,2048].",
    ),
    data_opt: list[str] = typer.Option(
        [], "--data-opt", "-D", help="Dataset option key=value (repeatable), e.g. -D seq_len=50."
    ),
    method_opt: list[str] = typer.Option(
        [], "--method-opt", "-Q", help="lowbit.quantize option key=value (repeatable)."
    ),
    train_opt: list[str] = typer.Option(
        [],
        "--set",
        help="Any TrainConfig field key=value (repeatable), e.g. --set grad_clip_norm=5.",
    ),
    run_dir: str = typer.Option(
        None, "--run-dir", help="Run directory (default runs/MODEL-DATASET-METHOD-TIME)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --run-dir from its last good checkpoint.",
        metavar="",
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="No live progress bar (epoch lines only).", metavar=""
    ),
) -> None:
    """Train a model with a quantization method (fp = float); checkpoints, metrics.jsonl and
    summary.json go to the run directory. `--resume` continues a killed run exactly."""
    import time as _time
    from pathlib import Path

    from lowbit.data import DataNotFoundError
    from lowbit.train import CheckpointError, ShapeMismatchError, TrainingDiverged
    from lowbit.train.runs import make_spec, parse_options, read_run_spec, train_spec

    try:
        train: dict[str, object] = parse_options(train_opt, "--set")
        flags = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": optimizer,
            "schedule": schedule,
            "gamma": gamma,
            "loss": loss,
            "weight_decay": weight_decay,
            "seed": seed,
            "device": device,
            "threads": threads,
        }
        if milestones is not None:
            try:
                flags["milestones"] = [int(m) for m in milestones.replace(" ", "").split(",") if m]
            except ValueError:
                raise ValueError(
                    f"--milestones expects epochs separated by commas, like 15,25; got {milestones!r}"
                ) from None
        train.update({k: v for k, v in flags.items() if v is not None})
        data_options = parse_options(data_opt, "--data-opt")
        if isinstance(data_options.get("path"), str):  # stored in config.json: make it absolute
            data_options["path"] = str(Path(data_options["path"]).expanduser().resolve())
        data_options.update(
            {
                k: v
                for k, v in (("split", split), ("preprocess", preprocess), ("augment", augment))
                if v is not None
            }
        )
        model_options = parse_options(model_opt, "--model-opt")
        method_options = parse_options(method_opt, "--method-opt")
        if resume and not recipe and not model and not dataset:
            # `--resume --run-dir R` alone continues R as it was stored
            if not run_dir:
                raise ValueError("--resume needs --run-dir R: the run directory to continue")
            if not (Path(run_dir) / "config.json").exists():
                raise ValueError(
                    f"{run_dir} is not a run directory (no config.json): nothing to resume; "
                    "drop --resume to start a new run there, or pass the directory of an existing run"
                )
            stored = read_run_spec(run_dir)
            spec = {
                t: dict(stored.get(t, {}))
                for t in ("recipe", "paper", "model", "data", "method", "train")
            }
            spec["recipe"].pop("path", None)
            _check_resume_flags(
                run_dir,
                spec,
                method=method,
                model=model_options,
                data=data_options,
                method_opts=method_options,
            )
            spec["train"].update(train)
        else:
            spec = make_spec(
                recipe,
                model=model,
                dataset=dataset,
                method=method,
                model_options=model_options,
                data_options=data_options,
                method_options=method_options,
                train=train,
            )
        init = spec["recipe"].get("init_from")
        if init and "init_from" not in spec["train"] and not resume:
            _refuse_recipe_init(str(spec["recipe"].get("name", recipe)), str(init))
            spec["train"]["init_from"] = str(init)  # a path that exists
        rank = os.environ.get("RANK", "0")
        if run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "pass --run-dir under torchrun: each process would otherwise name its own "
                "timestamped run directory"
            )
        if run_dir is None:
            stamp = _time.strftime("%Y%m%d-%H%M%S")
            run_dir = f"runs/{spec['model']['name']}-{spec['data']['name']}-{spec['method']['name']}-{stamp}"
        if data_dir is not None:
            # recorded with the run, so that lowbit eval / pack / summary find the files again
            spec["data"]["data_dir"] = str(Path(data_dir).expanduser().resolve())
        if rank == "0":  # under torchrun only rank 0 reports
            typer.echo(f"run directory: {run_dir}", err=True)
        summary = train_spec(
            spec, run_dir, resume=resume, progress=not no_progress, data_dir=data_dir
        )
    except TrainingDiverged as exc:
        fail(str(exc), code=1)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        DataNotFoundError,
        CheckpointError,
        ShapeMismatchError,
        RuntimeError,
    ) as exc:
        fail(error_text(exc))
    if rank != "0":
        return
    if summary.get("test_error_at_best") is not None:
        typer.echo(
            f"best epoch {summary['best_epoch']}: test error {summary['test_error_at_best']:.2f}% "
            f"(test accuracy {100 - summary['test_error_at_best']:.2f}%) — {summary['selection']}; run: {run_dir}"
        )
    elif summary.get("test_loss_at_best") is not None:
        typer.echo(
            f"best epoch {summary['best_epoch']}: test loss {summary['test_loss_at_best']:.4f} nats/char; run: {run_dir}"
        )


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(
        ...,
        help="A `lowbit train` run directory, a checkpoint file inside one, or a `lowbit ptq` "
        ".pt file.",
    ),
    which: str = typer.Option(
        "best",
        "--which",
        help="best (best-validation epoch) or last checkpoint of a run directory.",
    ),
    split: list[str] = typer.Option(
        [], "--split", help="Split(s) to evaluate (default: valid and test)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    data_dir: str = typer.Option(
        None, "--data-dir", help="Dataset directory (default: as the run)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON.", metavar=""),
) -> None:
    """Evaluate a run directory or checkpoint (loss, accuracy, error per split)."""
    from lowbit.data import DataNotFoundError
    from lowbit.ptq import is_quantized_file
    from lowbit.train import CheckpointError, ShapeMismatchError
    from lowbit.train.runs import evaluate_run

    try:
        if is_quantized_file(target):
            result = _evaluate_ptq_file(target, list(split) or ["valid", "test"], data_dir)
        else:
            result = evaluate_run(
                target, which=which, splits=list(split) or None, device=device, data_dir=data_dir
            )
    except (
        ValueError,
        FileNotFoundError,
        DataNotFoundError,
        CheckpointError,
        ShapeMismatchError,
        RuntimeError,
        KeyError,
    ) as exc:
        fail(error_text(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    when = "post-training quantized" if result["epoch"] is None else f"epoch {result['epoch']}"
    typer.echo(f"{result['checkpoint']} ({when})")
    for name, m in result.items():
        if isinstance(m, dict):
            typer.echo(
                f"  {name:<6} loss {m['loss']:.4f}  accuracy {100 * m['acc']:.2f}%  error {m['error']:.2f}%"
            )


def _evaluate_ptq_file(path: str, splits: list[str], data_dir: str | None) -> dict[str, Any]:
    """``lowbit eval`` of a ``lowbit ptq`` output: the splits of the data it was calibrated on,
    in the form :func:`lowbit.train.runs.evaluate_run` returns."""
    from lowbit import deploy

    net, info, data = deploy.quantized_from_source(path, data_dir=data_dir)
    if data is None:
        raise ValueError(f"{path} records no dataset to evaluate on")
    result: dict[str, Any] = {"checkpoint": path, "epoch": None}
    for name in splits:
        part = getattr(data, name, None)
        if part is None:
            raise ValueError(f"{info['data'].get('name')} has no {name!r} split")
        m = deploy.evaluate(net, part)
        result[name] = {"loss": m["loss"], "acc": m["accuracy"] / 100, "error": 100 - m["accuracy"]}
    return result


@app.command("datasets")
def datasets_cmd(
    data_dir: str = typer.Option(
        None, "--data-dir", help="Dataset directory (default $LOWBIT_DATA_DIR or ~/.cache/lowbit)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON.", metavar=""),
) -> None:
    """List datasets, whether they are available offline, and where their files go."""
    from lowbit import data as _data

    rows = _data.status(data_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"datasets (data dir: {data_dir or _data.default_data_dir()})")
    for col in (
        "name",
        "offline",
        "splits (default first)",
        "preprocess",
        "files / where",
        "description",
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        splits = [r["default_split"], *[s for s in r["splits"] if s != r["default_split"]]]
        table.add_row(
            r["name"],
            "yes" if r["available"] else "no",
            ", ".join(splits),
            r["default_preprocess"],
            r["where"],
            r["description"],
        )
    Console(width=max(120, Console().width)).print(table)


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON.", metavar=""),
) -> None:
    """List the reference models (name, task, default input shape and classes, description)."""
    from lowbit import models as _models

    rows = _models.describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=list))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="models (lowbit.models.create(name, input_shape=..., num_classes=..., **options))"
    )
    for col in ("name", "task", "default input", "classes", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["task"],
            "x".join(map(str, r["input_shape"])),
            str(r["num_classes"]),
            r["description"],
        )
    Console(width=max(120, Console().width)).print(table)


def _summary_of_file(path: Any, input_shape: str | None, no_macs: bool, as_json: bool) -> None:
    """``lowbit summary m.lowbit`` (packed bytes as stored) or ``lowbit summary ptq.pt`` (a
    ``lowbit ptq`` output): the loaded model's rows."""
    from lowbit import ptq
    from lowbit.saveload import LowbitFileError, load, read_manifest

    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".lowbit":
            meta = read_manifest(path).get("metadata") or {}
            net = load(path)
        else:
            net = ptq.load_quantized(path)
    except (FileNotFoundError, LowbitFileError, ValueError) as exc:
        fail(str(exc))
    shape = _shape_option(input_shape)
    if shape is None and not no_macs:
        stored = meta.get("input_shape") or getattr(net, "input_shape", None)
        shape = (1, *(int(d) for d in stored)) if stored else None
    result = lowbit.summary(net, None if no_macs else shape)
    if as_json:
        typer.echo(json.dumps({"model": str(path), **result.to_dict()}, indent=2))
    else:
        typer.echo(f"{path}")
        typer.echo(str(result))
        if shape is None and not no_macs:
            typer.echo(
                "(no MACs: the file stores no input shape; pass --input-shape with the batch, "
                "e.g. 1,3,32,32)"
            )


def _shape_option(input_shape: str | None) -> tuple[int, ...] | None:
    if not input_shape:
        return None
    try:
        return tuple(int(s) for s in input_shape.replace("x", ",").split(",") if s.strip())
    except ValueError:
        fail(f"--input-shape expects integers like 1,3,32,32, got {input_shape!r}")
    return None


def _summary_model_of_run(run_dir: str, model: str, method: str, options: bool) -> tuple[Any, str]:
    """The model of a ``lowbit train`` run directory, quantized as stored, with its best weights."""
    from lowbit.data import DataNotFoundError
    from lowbit.train import CheckpointError
    from lowbit.train.checkpoint import load_checkpoint
    from lowbit.train.runs import _locate, _method_parts, build_data, build_model, read_run_spec

    try:
        spec = read_run_spec(run_dir)
        stored, stored_opts = _method_parts(spec.get("method", {}))
        if spec["model"]["name"] != model:
            raise ValueError(
                f"{run_dir} is a run of model {spec['model']['name']!r}, not {model!r}"
            )
        if (method != "fp" and method != stored) or options:
            raise ValueError(
                f"{run_dir} stores its method ({stored}): drop --method/--option with a run directory"
            )
        data = build_data(spec["data"], None)  # the input shape and classes the model was built for
        net = build_model(spec["model"], data)
        if stored != "fp":
            lowbit.quantize(net, stored, **stored_opts)
        _, path = _locate(run_dir, "best")
        net.load_state_dict(load_checkpoint(path)["model"])
    except (ValueError, TypeError, FileNotFoundError, CheckpointError, DataNotFoundError) as exc:
        fail(f"cannot rebuild the model of {run_dir}: {error_text(exc)}")
    except KeyError as exc:
        fail(f"cannot rebuild the model of {run_dir}: its config.json has no {exc} table")
    return net, stored


@app.command("summary")
def summary_cmd(
    model: str = typer.Argument(
        ...,
        help="Reference model name (see `lowbit models`), a `lowbit train` run directory, a "
        ".lowbit file (packed or quantized) or a `lowbit ptq` .pt file.",
    ),
    method: str = typer.Option(
        "fp", "--method", "-m", help="Quantization method (lowbit.methods.available())."
    ),
    option: list[str] = typer.Option(
        [],
        "--option",
        "-o",
        help="Method option key=value (repeatable), e.g. -o granularity=channel.",
    ),
    keep: str = typer.Option(
        "first,last",
        "--keep",
        help="Layers kept float: 'first,last', globs, or 'none'.",
    ),
    state: str = typer.Option(
        None,
        "--state",
        help="State dict or training checkpoint (.pt) to load (weights_only), or a run directory "
        "(its model options, method and best checkpoint).",
    ),
    model_opt: list[str] = typer.Option(
        [],
        "--model-opt",
        "-M",
        help="Model option key=value (repeatable), e.g. -M widths=[2048,2048].",
    ),
    input_shape: str = typer.Option(
        None,
        "--input-shape",
        help="Input shape with batch, e.g. 1,1,28,28 (default: the model's, batch 1).",
    ),
    no_macs: bool = typer.Option(
        False, "--no-macs", help="Skip the forward trace (no MAC columns).", metavar=""
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON.", metavar=""),
) -> None:
    """Per-layer bits, packed bytes and MACs of a model."""
    import ast
    from pathlib import Path

    import torch

    try:
        from lowbit import models as _models
    except ImportError:  # pragma: no cover - the models package is part of lowbit
        _models = None  # type: ignore[assignment]
    from lowbit.ptq import is_quantized_file

    names = _models.available() if _models is not None else []
    source = Path(model)
    if model not in names and source.is_dir() and (source / "config.json").is_file():
        if state:
            fail("give the run directory once: as MODEL or as --state, not both")
        from lowbit.train.runs import read_run_spec

        stored = read_run_spec(model).get("model")
        if not isinstance(stored, dict) or not stored.get("name"):
            fail(
                f"{model}/config.json names no model (a Trainer run without run_info): pass the "
                "model name and the run as --state, e.g. lowbit summary mlp --state RUN"
            )
        assert isinstance(stored, dict)  # fail() exits
        state, model = model, str(stored["name"])
    if model not in names and (
        (source.is_file() and source.suffix == ".lowbit") or is_quantized_file(source)
    ):
        _summary_of_file(source, input_shape, no_macs, as_json)
        return
    if model not in names:
        hint = (
            " A state file holds no architecture: pass the model name and --state FILE."
            if Path(model).exists()
            else ""
        )
        fail(f"unknown model {model!r}; available: {', '.join(names) or '(none)'}.{hint}")
    options: dict[str, Any] = {}
    for item in option:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--option expects key=value, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key.strip()] = raw
    if state and Path(state).is_dir():  # a run: its model options, method and best weights
        net, method = _summary_model_of_run(state, model, method, bool(options))
        state_file = None
    else:
        state_file = state
        from lowbit.train.runs import parse_options

        try:
            net = _models.create(model, **parse_options(model_opt, "--model-opt"))
            if method != "fp" or options:
                lowbit.quantize(net, method, keep=_keep_tuple(keep), **options)
        except (ValueError, TypeError) as exc:
            fail(f"cannot build model {model!r} with method {method!r}: {exc}")
    if state_file:
        try:
            loaded = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report any load failure in one line
            fail(f"cannot load {state_file}: {type(exc).__name__}: {exc}")
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
            loaded = loaded["model"]  # a lowbit training checkpoint
        try:
            net.load_state_dict(loaded)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()
            fail(
                f"{state_file} does not fit model {model!r} quantized with {method!r} "
                f"({first[-1].strip() if first else type(exc).__name__}): pass the model options it "
                "was trained with (-M key=value), or the run directory itself as --state"
            )
    shape = _shape_option(input_shape)
    if (
        shape is None
        and not no_macs
        and (net_shape := getattr(net, "input_shape", None)) is not None
    ):
        shape = (1, *tuple(net_shape))
    try:
        result = lowbit.summary(net, None if no_macs else shape)
    except Exception as exc:  # noqa: BLE001 - the trace can fail on odd inputs; still show sizes
        try:  # token models take integer ids
            result = lowbit.summary(net, shape, input_dtype=torch.long)
        except Exception:  # noqa: BLE001
            typer.secho(
                f"warning: MAC trace failed ({type(exc).__name__}: {exc}); showing sizes only",
                err=True,
            )
            result = lowbit.summary(net)
    if as_json:
        typer.echo(json.dumps({"model": model, "method": method, **result.to_dict()}, indent=2))
    else:
        typer.echo(f"{model} ({method})")
        typer.echo(str(result))


@app.command("ptq")
def ptq_cmd(
    source: str = typer.Argument(
        ..., help="A `lowbit train` run directory or a checkpoint file of a float model."
    ),
    method: str = typer.Option("fgq", "--method", help="Post-training method (fgq)."),
    dataset: str = typer.Option(
        None, "--dataset", help="Calibration/evaluation dataset (default: the run's)."
    ),
    model: str = typer.Option(
        None, "--model", help="Architecture name when the checkpoint has no config.json."
    ),
    group_size: str = typer.Option(
        "4", "--group-size", "-n", help="N weights per alpha: an int, 'layer' or 'channel'."
    ),
    group_axis: str = typer.Option(
        "in", "--group-axis", help="'in' (N inputs of one output) or 'out' (N filters)."
    ),
    weight_bits: int = typer.Option(2, "--weight-bits", help="2 = ternary, 3..8 = k-bit groups."),
    act_bits: int = typer.Option(
        8,
        "--act-bits",
        help="DFP activation bits: 8 (the papers'), 4, ...; up to 8 they pack onto the integer "
        "kernels, wider ones stay simulated (the layer is kept). 0 keeps activations float.",
    ),
    rule: str = typer.Option(None, "--rule", help="exact | 0.7 (ternary), mse | max (k-bit)."),
    scale_bits: int = typer.Option(
        0,
        "--scale-bits",
        help="Group scales as fixed-point m·2^E (one E per row) with this many bits (2..8): "
        "a packed file stores each in one byte. 0 keeps float32 scales.",
    ),
    act_mode: str = typer.Option(
        "calibrated", "--act-mode", help="calibrated | dynamic exponents."
    ),
    calibration: str = typer.Option("max", "--calibration", help="max | percentile."),
    percentile: float = typer.Option(
        99.99, "--percentile", help="Percentile for --calibration percentile."
    ),
    calib_samples: int = typer.Option(
        2048, "--calib-samples", help="Training samples used to calibrate."
    ),
    keep: str = typer.Option(
        "first,last", "--keep", help="Layers kept float: 'first,last', globs, or 'none'."
    ),
    fold_bn: bool = typer.Option(
        True, "--fold-bn/--no-fold-bn", help="Fold BatchNorm before quantizing.", metavar=""
    ),
    out: str = typer.Option(
        None, "--out", "-o", help="Output file (default: next to the run, ptq-fgq-*.pt)."
    ),
    evaluate: bool = typer.Option(
        True, "--eval/--no-eval", help="Test accuracy before and after.", metavar=""
    ),
    data_dir: str = typer.Option(None, "--data-dir", help="Dataset directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.", metavar=""),
) -> None:
    """Post-training quantization (FGQ / DFP): ternary or k-bit weight groups + DFP activations.

    Example: lowbit ptq runs/mlp --group-size 4 --act-bits 8
    """
    import hashlib
    import time
    from pathlib import Path

    from lowbit import ptq

    if method != "fgq":
        fail(f"unknown post-training method {method!r}; available: fgq")
    if calib_samples < 1:
        fail(f"--calib-samples must be at least 1, got {calib_samples}")
    gs: int | str = int(group_size) if group_size.isdigit() else group_size
    if isinstance(gs, str) and gs not in ("layer", "channel"):
        fail(f"--group-size must be an int, 'layer' or 'channel', got {group_size!r}")
    keep_t = _keep_tuple(keep)
    try:
        run = ptq.float_run_info(source)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = dict(run["data"])
    if dataset is not None and dataset != table.get("name"):
        table = {"name": dataset}
    if not table.get("name"):
        fail("no dataset to calibrate on: pass --dataset NAME (see `lowbit datasets`)")
    ds_name = table["name"]
    try:
        splits = ptq.load_data(table, data_dir)
    except Exception as exc:  # DataNotFoundError and friends: one line
        fail(f"cannot load dataset {ds_name!r}: {exc}")
    try:
        net, info = ptq.load_float_model(
            source, model=model, input_shape=splits.input_shape, num_classes=splits.num_classes
        )
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        fail(str(exc))
    calib = splits.train.x[:calib_samples]
    result: dict = {
        "source": info["checkpoint"],
        "model": info["model"]["name"],
        "dataset": ds_name,
    }
    if evaluate:
        result["float_acc"] = ptq.accuracy(net, splits.test)
    t0 = time.perf_counter()
    try:
        ptq.fgq(
            net,
            calib,
            group_size=gs,
            weight_bits=weight_bits,
            act_bits=act_bits or None,
            group_axis=group_axis,
            rule=rule,
            scale_bits=scale_bits or None,
            act_mode=act_mode,
            act_calibration=calibration,
            percentile=percentile,
            keep=keep_t,
            fold_bn=fold_bn,
        )
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    result["ptq_seconds"] = round(time.perf_counter() - t0, 3)
    if evaluate:
        result["fgq_acc"] = ptq.accuracy(net, splits.test, saturation=True)
    rows = ptq.report(net)
    # Every option that changes the model is in the default file name, so that two different
    # quantizations of one run never overwrite each other.
    parts = [f"n{gs}", group_axis, f"w{weight_bits}", f"a{act_bits or 32}"]
    parts += [f"s{scale_bits}"] if scale_bits else []
    parts += [f"rule{rule}"] if rule else []
    parts += ["dynamic"] if act_mode != "calibrated" else []
    parts += [f"p{percentile:g}"] if calibration == "percentile" else []
    if keep_t != ("first", "last"):
        parts.append(
            "keep-none"
            if not keep_t
            else "keep-" + hashlib.sha1(",".join(keep_t).encode()).hexdigest()[:6]
        )
    parts += ["nofold"] if not fold_bn else []
    tag = "-".join(parts)
    if out is None:
        src = Path(info["checkpoint"])
        base = src.parent.parent if src.parent.name == "checkpoints" else src.parent
        out = str(base / f"ptq-fgq-{tag}.pt")
    ptq.save_quantized(
        net, out, {**info, "accuracy": {k: v for k, v in result.items() if k.endswith("_acc")}}
    )
    result["out"] = out
    result["layers"] = [r.as_dict() for r in rows]
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(
        f"FGQ {tag} of {info['model']['name']} ({result['source']}), calibrated on {len(calib)} {ds_name} samples"
    )
    typer.echo(ptq.format_report(rows))
    typer.echo(
        f"(saturated / underflow: share of input elements, measured on the {'test' if evaluate else 'calibration'} data)"
    )
    if evaluate:
        drop = result["float_acc"] - result["fgq_acc"]
        typer.echo(
            f"test accuracy: float {result['float_acc']:.2f}%  ->  fgq {result['fgq_acc']:.2f}%  ({-drop:+.2f} points)"
        )
    typer.echo(f"quantized in {result['ptq_seconds']:.2f} s; written to {out}")


@app.command("pack")
def pack_cmd(
    source: str = typer.Argument(
        ...,
        help="A `lowbit train` run directory, a checkpoint inside one, or a `lowbit ptq` .pt file.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="The .lowbit file to write."),
    method: str = typer.Option(
        None, "--method", help="For a float run: quantize with this method first (twn, fgq, ...)."
    ),
    keep: str = typer.Option(
        "first,last",
        "--keep",
        help="For --method: layers kept float ('first,last', globs, or 'none').",
    ),
    activations: str = typer.Option(
        "int8",
        "--activations",
        help="Inputs of float-activation layers: int8 (per token) or float (exact).",
    ),
    model_name: str = typer.Option(
        None,
        "--model",
        help="Architecture when the run's config.json names none (see `lowbit models`).",
    ),
    model_opt: list[str] = typer.Option(
        [],
        "--model-opt",
        "-M",
        help="Model option key=value (repeatable), e.g. -M widths=[512,512].",
    ),
    quantized: bool = typer.Option(
        False,
        "--quantized",
        help="Save the quantized (Quant*) model instead of packing it.",
        metavar="",
    ),
    xnor: bool = typer.Option(
        False,
        "--xnor",
        help="BNN runs: the fully binary XNOR-popcount model (lowbit.binary.pack_bnn): packed bits "
        "between binary layers, batch norm + sign folded into thresholds.",
        metavar="",
    ),
    evaluate: bool = typer.Option(
        False, "--eval", help="Also print test accuracy: simulated vs packed.", metavar=""
    ),
    data_dir: str = typer.Option(None, "--data-dir", help="Dataset directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.", metavar=""),
) -> None:
    """Pack a quantized model into a .lowbit file (prints its size and the compression vs float32).

    Example: lowbit pack runs/mlp-ttq -o mlp.lowbit; lowbit pack runs/mlp-fp --method twn --keep none -o mlp.lowbit;
    lowbit pack runs/mlp-bnn --xnor -o bnn.lowbit
    """
    from pathlib import Path

    from lowbit import deploy
    from lowbit.saveload import save
    from lowbit.train.runs import parse_options

    keep_t = _keep_tuple(keep)
    if xnor and quantized:
        fail("--xnor packs the model; --quantized saves it unpacked: pass one of them")
    if Path(out).is_dir():  # before any work
        fail(f"-o {out} is a directory: give a file path, e.g. {Path(out) / 'model.lowbit'}")
    try:
        model, info, splits = deploy.quantized_from_source(
            source,
            method=method,
            keep=keep_t,
            data_dir=data_dir,
            model=model_name,
            model_options=parse_options(model_opt, "--model-opt"),
        )
        if xnor:
            try:
                target = lowbit.pack(model, xnor=True)  # with its packing_report
            except ValueError as exc:
                if "no binary layer" not in str(exc):
                    raise
                raise ValueError(
                    f"--xnor packs binary networks (BNN runs) on the XNOR-popcount kernels, but no "
                    f"layer of {source} (method {info.get('method')}) is binary: pack it without --xnor"
                ) from None
        elif quantized:
            target = model
        else:
            from lowbit.pack import PackingWarning

            with warnings.catch_warnings():  # the report below lists the kept layers
                warnings.simplefilter("ignore", PackingWarning)
                target = lowbit.pack(model, activations=activations)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        fail(error_text(exc))
    result: dict = {"source": info["checkpoint"], "method": info.get("method")}
    sequence = getattr(splits, "task", None) == "sequence"
    if evaluate and splits is not None:
        sim = deploy.evaluate(model, splits.test, loss=sequence)
        packed = deploy.evaluate(target, splits.test, loss=sequence)
        result["simulated_acc"], result["packed_acc"] = sim["accuracy"], packed["accuracy"]
        if sequence:  # character LSTMs: cross-entropy in nats per character, the metric
            result["simulated_loss"], result["packed_loss"] = sim["loss"], packed["loss"]
    metadata: dict = {"data": info["data"], "source": info["checkpoint"]}
    input_shape = getattr(model, "input_shape", None)
    if xnor and input_shape is not None:
        metadata["input_shape"] = [int(d) for d in input_shape]
    try:
        saved = save(
            target,
            out,
            # pack_bnn returns a flat nn.Sequential of stages, stored as a module tree.
            architecture=None if xnor else info["architecture"],
            metadata=metadata,
        )
    except (ValueError, OSError) as exc:  # a directory, a read-only place, a full disk
        fail(f"cannot write {out}: {error_text(exc)}")
    result.update(saved)
    result["packing_report"] = getattr(target, "packing_report", None)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    for layer, line in (result["packing_report"] or {}).items():
        typer.echo(f"  {layer:<14} {line}")
    alone = (
        f"quantized layers alone: {saved['layer_bytes'] / 1024:.1f} KiB vs "
        f"{saved['layer_float32_bytes'] / 1024:.1f} KiB, {saved['layer_compression']:.1f}x"
        if saved["layer_bytes"]
        else "no quantized layer: every layer was kept float (see --keep)"
    )
    typer.echo(
        f"wrote {out}: {saved['bytes'] / 1024:.1f} KiB; float32 {saved['float32_bytes'] / 1024:.1f} KiB; "
        f"compression {saved['compression']:.1f}x ({alone})"
    )
    if "packed_loss" in result:
        typer.echo(
            f"test loss: simulated {result['simulated_loss']:.4f}  packed "
            f"{result['packed_loss']:.4f} nats/char (next-character accuracy "
            f"{result['simulated_acc']:.2f}% / {result['packed_acc']:.2f}%)"
        )
    elif "packed_acc" in result:
        typer.echo(
            f"test accuracy: simulated {result['simulated_acc']:.2f}%  packed {result['packed_acc']:.2f}%"
        )


@app.command("run")
def run_cmd(
    file: str = typer.Argument(..., help="A .lowbit file (lowbit pack / lowbit.save)."),
    dataset: str = typer.Option(
        None, "--dataset", help="Dataset to evaluate on (default: the one stored in the file)."
    ),
    split: str = typer.Option("test", "--split", help="Split to evaluate."),
    data_opt: list[str] = typer.Option(
        [],
        "--data-opt",
        "-D",
        help="Dataset option key=value (repeatable), e.g. -D path=other.npz (with --dataset arrays).",
    ),
    batch_size: int = typer.Option(
        256, "--batch-size", help="Batch size (throughput is measured at this size)."
    ),
    threads: int = typer.Option(
        None, "--threads", help="torch / kernel threads (default: torch's)."
    ),
    reps: int = typer.Option(30, "--reps", help="Timed forward passes (medians)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Dataset directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.", metavar=""),
) -> None:
    """Run a .lowbit model on a dataset: accuracy (character models: loss in nats/char),
    throughput (batch) and latency (batch 1)."""
    import os

    from lowbit import deploy
    from lowbit.saveload import LowbitFileError, load, read_manifest

    for name, value in (("--batch-size", batch_size), ("--reps", reps), ("--threads", threads)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, got {value}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        manifest = read_manifest(file)
        model = load(file)
    except (FileNotFoundError, LowbitFileError) as exc:
        fail(str(exc))
    table = dict((manifest.get("metadata") or {}).get("data") or {})
    if dataset is not None and dataset != table.get("name"):
        table = {"name": dataset}
    if not table.get("name"):
        fail("no dataset stored in the file: pass --dataset NAME (see `lowbit datasets`)")
    from lowbit.train.runs import build_data, parse_options

    try:
        table.update(parse_options(data_opt, "--data-opt"))
    except ValueError as exc:
        fail(str(exc))

    try:
        splits = build_data(table, data_dir)
    except Exception as exc:  # DataNotFoundError and friends: one line
        fail(f"cannot load dataset {table['name']!r}: {exc}")
    if split not in ("train", "valid", "test"):
        fail(f"unknown split {split!r}: choose train, valid or test")
    data = getattr(splits, split, None)
    if data is None:
        fail(f"dataset {table['name']!r} has no {split!r} split")
    assert data is not None  # fail() exits
    result = {
        "file": file,
        "bytes": os.path.getsize(file),
        "dataset": table["name"],
        "split": split,
    }
    sequence = getattr(splits, "task", None) == "sequence"
    try:
        metrics = deploy.evaluate(model, data, batch_size, loss=sequence)
    except (ValueError, TypeError, RuntimeError) as exc:
        fail(
            f"cannot run {file} on {table['name']!r} {split} (does the file's model take this "
            f"dataset? pass --dataset): {error_text(exc)}"
        )
    result["accuracy"] = metrics["accuracy"]
    if sequence:
        result["loss_nats_per_char"] = metrics["loss"]
    result.update(deploy.speed(model, data.x, batch_size, reps))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    where = f"{file} ({result['bytes'] / 1024:.1f} KiB) on {table['name']} {split}"
    if sequence:
        typer.echo(
            f"{where}: loss {result['loss_nats_per_char']:.4f} nats/char, next-character "
            f"accuracy {result['accuracy']:.2f}%"
        )
    else:
        typer.echo(f"{where}: accuracy {result['accuracy']:.2f}%")
    unit = f"sequences of {data.x.shape[1]} characters" if sequence else "samples"
    timed = int(result["batch_size"])
    short = f": the split has only these, not {batch_size}" if timed < batch_size else ""
    typer.echo(
        f"throughput {result['throughput']:.0f} {unit}/s (batch {timed}{short}, median "
        f"{result['batch_ms']:.2f} ms); latency {result['latency_ms']:.3f} ms (batch 1, median)"
    )


@app.command("bench")
def bench_cmd(
    what: str = typer.Argument(
        "kernels",
        help="What to benchmark: 'kernels' (4096x4096 layers) or 'model' (a packed model vs its fp32 twin).",
    ),
    file: str = typer.Argument(
        None,
        help="For 'model': a .lowbit file (default: a ternary int8 MNIST MLP 784-1024-1024-10).",
    ),
    threads: str = typer.Option(
        "1,2", help="Comma-separated thread counts (each case runs at each)."
    ),
    reps: int = typer.Option(30, help="Timed calls per case (median reported; at least 20)."),
    size: int = typer.Option(4096, help="Layer size N = K."),
    batch: int = typer.Option(
        None, help="Batch of the GEMM case (kernels, default 64) or of the large case (model, 256)."
    ),
    input_shape: str = typer.Option(
        None,
        "--input-shape",
        help="For 'model': one sample's shape, e.g. 3,32,32 (default: the file's stored shape).",
    ),
    variants: bool = typer.Option(
        True, help="Also time asymmetric / grouped ternary and the custom op.", metavar=""
    ),
    clock: str = typer.Option(
        "wall",
        help="'wall', or 'cpu' (calling thread's CPU time; steadier on a shared VM, --threads 1 only).",
    ),
    json_out: str = typer.Option("", "--json", help="Also write the rows to this JSON file."),
) -> None:
    """Benchmark the kernels (vs PyTorch fp32 and dynamic int8) or a packed model (vs its fp32 twin), same run.

    Examples: lowbit bench kernels; lowbit bench model; lowbit bench model m.lowbit --threads 1 --clock cpu
    """
    from lowbit import bench

    if what not in ("kernels", "model"):
        fail(f"unknown benchmark {what!r}: use 'kernels' or 'model'")
    try:
        counts = tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        fail(f"--threads must be comma-separated integers, got {threads!r}")
    try:  # before any output: a bad argument is one error line, not a table header and a line
        bench._check_timing_args(reps, clock, counts)
    except ValueError as exc:
        fail(str(exc))
    if what == "model":
        from lowbit.saveload import LowbitFileError, load, read_manifest

        shape = _shape_option(input_shape)
        try:
            if file:
                net = load(file)
                shape = shape or bench.stored_input_shape(read_manifest(file), net)
                if shape is None:
                    raise ValueError(
                        f"{file} stores no input shape: pass --input-shape, one sample's shape "
                        "such as 1,28,28 or 3,32,32"
                    )
            else:
                net = bench.default_mnist_model()
                shape = shape or (1, 28, 28)
            rows_m = bench.bench_model(
                net,
                shape,
                batches=(batch or 256, 1),
                threads=counts,
                reps=reps,
                log=typer.echo,
                clock=clock,
                target=not file,
            )
        except (FileNotFoundError, LowbitFileError, ValueError, RuntimeError, TypeError) as exc:
            fail(f"cannot benchmark {file or 'the default model'}: {error_text(exc)}")
        if json_out:
            with open(json_out, "w", encoding="utf-8") as f:
                json.dump([vars(r) for r in rows_m], f, indent=1)
        return
    try:
        rows = bench.bench_kernels(
            size=size,
            threads=counts,
            reps=reps,
            batch=64 if batch is None else batch,
            variants=variants,
            clock=clock,
            log=typer.echo,
        )
    except ValueError as exc:
        fail(str(exc))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(bench.rows_as_dicts(rows), f, indent=1)


@app.command("reproduce")
def reproduce_cmd(
    recipe: str = typer.Argument(None, help="Recipe NAME (see --list) or a .toml file."),
    list_: bool = typer.Option(
        False,
        "--list",
        help="List every recipe, the data it needs and whether it is here.",
        metavar="",
    ),
    out: str = typer.Option(
        None, "--out", "-o", help="Output directory (default runs/reproduce-NAME-TIME)."
    ),
    epochs: int = typer.Option(
        None,
        "--epochs",
        help="Override the recipe's training epochs (smoke runs; the paper number needs the recipe's).",
    ),
    threads: int = typer.Option(None, "--threads", help="torch / kernel threads."),
    train_samples: int = typer.Option(
        None, "--train-samples", help="Use only the first N training images."
    ),
    data_dir: str = typer.Option(
        None, "--data-dir", help="Dataset directory (default $LOWBIT_DATA_DIR or ~/.cache/lowbit)."
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="No live progress bars.", metavar=""
    ),
    as_json: bool = typer.Option(False, "--json", help="With --list: print JSON.", metavar=""),
) -> None:
    """Reproduce a paper table row from a recipe and report the paper's number beside the measured one."""
    from lowbit import reproduce as R

    if list_:
        rows = R.list_recipes(data_dir)
        if as_json:
            typer.echo(json.dumps(rows, indent=2, default=str))
            return
        typer.echo(R.format_recipe_list(rows))
        return
    if not recipe:
        fail("give a recipe NAME or .toml file, or --list to see them")
    if as_json:
        fail("--json goes with --list (a run writes its results to results.json in --out)")
    for flag, value in (("--threads", threads), ("--train-samples", train_samples)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from lowbit.data import DataNotFoundError
    from lowbit.train import TrainingDiverged

    try:
        result = R.reproduce(
            recipe,
            out,
            epochs=epochs,
            data_dir=data_dir,
            train_samples=train_samples,
            progress=not no_progress,
            log=typer.echo,
        )
    except TrainingDiverged as exc:
        fail(str(exc), code=1)
    except (ValueError, TypeError, FileNotFoundError, DataNotFoundError, RuntimeError) as exc:
        fail(error_text(exc))
    typer.echo(f"report: {result.report}  ({result.seconds:.1f} s)")


def main() -> None:
    try:
        app()
    except lowbit.kernels.KernelBuildError as exc:  # pragma: no cover
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
