"""The ``lowbit`` command line (typer). ``lowbit --help`` lists every command.

Each command is a thin wrapper: argument parsing and printing here, the work in the library
modules, so everything the CLI does is also reachable from Python.
"""

from __future__ import annotations

import json
import sys

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
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """lowbit: TTQ, BNN/QNN, loss-aware (LAB/LAT/LAQ) and FGQ/DFP quantization with packed C++ kernels."""


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _not_yet(what: str, issue: int) -> None:
    fail(f"`lowbit {what}` is not available in this version yet (tracked in issue #{issue}).", code=3)


@app.command("cpu")
def cpu_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the CPU features and which kernel path (scalar/avx2/avx512) runs."""
    feats = lowbit.kernels.cpu_features()
    if as_json:
        typer.echo(json.dumps(feats, indent=2))
        return
    have = [f for f, ok in feats["flags"].items() if ok]
    typer.echo(f"kernel path : {feats['active']}" + (f" (forced by LOWBIT_ISA={feats['forced']})" if feats["forced"] else ""))
    typer.echo(f"supported   : {', '.join(feats['supported'])}")
    typer.echo(f"compiled    : {', '.join(feats['compiled'])}")
    typer.echo(f"threads     : {feats['threads']}")
    typer.echo(f"cpu flags   : {' '.join(have)}")


@app.command("demo")
def demo_cmd() -> None:
    """Run the end-to-end demo on embedded MNIST (see `lowbit demo --help`)."""
    from lowbit.demo import run_demo

    run_demo()


@app.command("train")
def train_cmd() -> None:
    """Train a model with a quantization method."""
    _not_yet("train", 3)


@app.command("eval")
def eval_cmd() -> None:
    """Evaluate a run directory or checkpoint."""
    _not_yet("eval", 3)


@app.command("datasets")
def datasets_cmd() -> None:
    """List datasets and whether they are available offline."""
    _not_yet("datasets", 3)


@app.command("models")
def models_cmd() -> None:
    """List the reference models."""
    _not_yet("models", 3)


@app.command("summary")
def summary_cmd(
    model: str = typer.Argument(..., help="Reference model name (see `lowbit models`)."),
    method: str = typer.Option("fp", "--method", "-m", help="Quantization method (lowbit.methods.available())."),
    option: list[str] = typer.Option([], "--option", "-o", help="Method option key=value (repeatable), e.g. -o granularity=channel."),
    keep: str = typer.Option("first,last", "--keep", help="Layers kept float: comma list of first/last/globs ('' for none)."),
    state: str = typer.Option(None, "--state", help="State dict or training checkpoint (.pt) to load, weights_only."),
    input_shape: str = typer.Option(None, "--input-shape", help="Input shape with batch, e.g. 1,1,28,28 (default: the model's, batch 1)."),
    no_macs: bool = typer.Option(False, "--no-macs", help="Skip the forward trace (no MAC columns)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per-layer bits, packed bytes and MACs of a model."""
    import ast
    from pathlib import Path

    import torch

    try:
        from lowbit import models as _models
    except ImportError:  # pragma: no cover - the models package is part of lowbit
        _models = None  # type: ignore[assignment]
    names = _models.available() if _models is not None else []
    if model not in names:
        hint = " A state file holds no architecture: pass the model name and --state FILE." if Path(model).exists() else ""
        fail(f"unknown model {model!r}; available: {', '.join(names) or '(none)'}.{hint}")
    options: dict[str, object] = {}
    for item in option:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--option expects key=value, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key.strip()] = raw
    net = _models.create(model)
    try:
        if method != "fp" or options:
            lowbit.quantize(net, method, keep=tuple(k for k in keep.split(",") if k), **options)
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    if state:
        try:
            loaded = torch.load(state, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report any load failure in one line
            fail(f"cannot load {state}: {type(exc).__name__}: {exc}")
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
            loaded = loaded["model"]  # a lowbit training checkpoint
        try:
            net.load_state_dict(loaded)
        except (RuntimeError, TypeError, AttributeError) as exc:
            fail(f"{state} does not fit model {model!r} quantized with {method!r}: {exc}")
    shape: tuple[int, ...] | None = None
    if input_shape:
        try:
            shape = tuple(int(s) for s in input_shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            fail(f"--input-shape expects integers like 1,3,32,32, got {input_shape!r}")
    elif not no_macs and getattr(net, "input_shape", None) is not None:
        shape = (1, *tuple(net.input_shape))
    try:
        result = lowbit.summary(net, None if no_macs else shape)
    except Exception as exc:  # noqa: BLE001 - the trace can fail on odd inputs; still show sizes
        try:  # token models take integer ids
            result = lowbit.summary(net, shape, input_dtype=torch.long)
        except Exception:  # noqa: BLE001
            typer.secho(f"warning: MAC trace failed ({type(exc).__name__}: {exc}); showing sizes only", err=True)
            result = lowbit.summary(net)
    if as_json:
        typer.echo(json.dumps({"model": model, "method": method, **result.to_dict()}, indent=2))
    else:
        typer.echo(f"{model} ({method})")
        typer.echo(str(result))


@app.command("ptq")
def ptq_cmd() -> None:
    """Post-training quantization (FGQ / DFP)."""
    _not_yet("ptq", 8)


@app.command("pack")
def pack_cmd() -> None:
    """Pack a quantized model into a .lowbit file."""
    _not_yet("pack", 9)


@app.command("run")
def run_cmd() -> None:
    """Run a packed model on a dataset or file."""
    _not_yet("run", 9)


@app.command("bench")
def bench_cmd(
    what: str = typer.Argument("kernels", help="What to benchmark: 'kernels' (4096x4096 layers)."),
    threads: str = typer.Option("1,2", help="Comma-separated thread counts (each case runs at each)."),
    reps: int = typer.Option(30, help="Timed calls per case (median reported; at least 20)."),
    size: int = typer.Option(4096, help="Layer size N = K."),
    batch: int = typer.Option(64, help="Batch of the GEMM case."),
    variants: bool = typer.Option(True, help="Also time asymmetric / grouped ternary and the custom op."),
    json_out: str = typer.Option("", "--json", help="Also write the rows to this JSON file."),
) -> None:
    """Benchmark the kernels against PyTorch fp32 F.linear and PyTorch dynamic int8, same run."""
    from lowbit import bench

    if what != "kernels":
        fail(f"unknown benchmark {what!r}: only 'kernels' exists so far (model benchmarks come with lowbit.pack)")
    try:
        counts = tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        fail(f"--threads must be comma-separated integers, got {threads!r}")
    typer.echo(bench.HEADER)
    rows = bench.bench_kernels(size=size, threads=counts, reps=reps, batch=batch, variants=variants, log=typer.echo)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(bench.rows_as_dicts(rows), f, indent=1)


@app.command("reproduce")
def reproduce_cmd() -> None:
    """Reproduce a paper table row from a recipe."""
    _not_yet("reproduce", 11)


def main() -> None:
    try:
        app()
    except lowbit.kernels.KernelBuildError as exc:  # pragma: no cover
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
