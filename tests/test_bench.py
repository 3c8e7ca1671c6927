"""The kernel benchmark's machinery on a tiny layer (no timing is asserted: speed lives in
`lowbit bench kernels`, not in tests)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lowbit import bench
from lowbit.cli import app


def test_bench_kernels_runs_every_case() -> None:
    lines: list[str] = []
    rows = bench.bench_kernels(
        size=64, threads=(1,), reps=20, batch=3, cold_bytes=1 << 16, log=lines.append
    )
    cases = [r.case for r in rows]
    assert cases[:3] == ["ternary b1 hot", "ternary b1 cold", "ternary b3"]
    assert any("(int4)" in c for c in cases) and any("(float)" in c for c in cases)
    assert all(r.lowbit_ms > 0 and r.vs_int8 == r.int8_ms / r.lowbit_ms for r in rows)
    assert any("load average" in line for line in lines)


def test_bench_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        bench.bench_kernels(size=64, reps=5)
    with pytest.raises(ValueError, match="threads=\\(1,\\)"):
        bench.bench_kernels(size=64, threads=(2,), clock="cpu")


def test_cli_bench_reports_unknown_targets() -> None:
    result = CliRunner().invoke(app, ["bench", "model"])
    assert result.exit_code == 2
    assert "only 'kernels'" in result.output
