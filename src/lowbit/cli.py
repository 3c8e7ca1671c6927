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
def summary_cmd() -> None:
    """Per-layer bits, packed bytes and MACs of a model."""
    _not_yet("summary", 4)


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
def bench_cmd() -> None:
    """Benchmark the kernels against PyTorch fp32 and int8."""
    _not_yet("bench", 9)


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
