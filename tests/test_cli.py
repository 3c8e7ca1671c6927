"""The `lowbit` command: --version, --help, `cpu`, and one-line setup errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit

LOWBIT = shutil.which("lowbit") or str(Path(sys.executable).with_name("lowbit"))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOWBIT, *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_help_lists_every_command() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for command in (
        "train",
        "eval",
        "ptq",
        "pack",
        "run",
        "summary",
        "bench",
        "reproduce",
        "demo",
        "datasets",
        "models",
    ):
        assert command in result.stdout, f"`lowbit --help` does not list {command}"


def test_cpu_reports_the_active_path() -> None:
    result = _run("cpu", "--json")
    assert result.returncode == 0, result.stderr
    assert f'"active": "{lowbit.kernels.active_isa()}"' in result.stdout


@pytest.mark.parametrize("value", ["avx9", "neon"])
def test_bad_isa_is_one_clear_line(value: str) -> None:
    result = _run("cpu", env={"LOWBIT_ISA": value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: LOWBIT_ISA='{value}' is not a kernel path")
