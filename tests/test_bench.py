"""The kernel benchmark's machinery on a tiny layer (no timing is asserted: speed lives in
`lowbit bench kernels`, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit import bench, models
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
    result = CliRunner().invoke(app, ["bench", "nothing"])
    assert result.exit_code == 2
    assert "use 'kernels' or 'model'" in result.output


def _tiny_packed() -> torch.nn.Module:
    torch.manual_seed(0)
    net = models.create("mlp", widths=(16,)).eval()
    return lowbit.pack(lowbit.quantize(net, "twn", keep=()))


def test_bench_model_times_packed_against_its_float_twin() -> None:
    packed = _tiny_packed()
    twin = bench.float_twin(packed)
    assert type(twin.net.fc0) is torch.nn.Linear and twin.net.fc0.out_features == 16
    lines: list[str] = []
    rows = bench.bench_model(
        packed, (1, 28, 28), batches=(4, 1), threads=(1,), reps=20, log=lines.append
    )
    assert [(r.batch, r.threads) for r in rows] == [(4, 1), (1, 1)]
    assert all(r.speedup == r.fp32_ms / r.lowbit_ms for r in rows)
    assert any("load average" in line for line in lines)


def _fake_run(tmp_path: Path, method: str) -> Path:
    """A `lowbit train`-style run directory on the synthetic dataset (untrained weights)."""
    from lowbit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    run = tmp_path / f"run-{method}"
    net = models.create("mlp", widths=[16]).eval()
    if method != "fp":
        net = lowbit.quantize(net, method, keep=())
    spec = {
        "model": {"name": "mlp", "widths": [16]},
        "data": {"name": "synthetic", "source": "/nowhere"},
        "method": {"name": method, "options": {"keep": []}},
    }
    run.mkdir()
    (run / "config.json").write_text(json.dumps(spec))
    save_checkpoint(run / "checkpoints", {"model": net.state_dict(), "epoch": 1}, 1, kind="best")
    return run


def test_cli_pack_run_and_bench_a_file(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m.lowbit"
    result = runner.invoke(app, ["pack", str(_fake_run(tmp_path, "ttq")), "-o", str(out), "--eval"])
    assert result.exit_code == 0, result.output
    assert "compression" in result.output and "packed: PackedLinear" in result.output
    assert out.exists()
    loaded = lowbit.load(out)  # a registry model: loads standalone
    assert type(loaded).__name__ == "MLP"
    result = runner.invoke(app, ["run", str(out), "--reps", "20", "--batch-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (
        info["dataset"] == "synthetic" and 0 <= info["accuracy"] <= 100 and info["throughput"] > 0
    )
    result = runner.invoke(app, ["bench", "model", str(out), "--threads", "1", "--reps", "20"])
    assert result.exit_code == 0, result.output
    assert "batch  256" in result.output


def test_cli_pack_float_run_needs_a_method(tmp_path: Path) -> None:
    runner = CliRunner()
    run = _fake_run(tmp_path, "fp")
    result = runner.invoke(app, ["pack", str(run), "-o", str(tmp_path / "x.lowbit")])
    assert result.exit_code == 2 and "pass --method" in result.output
    result = runner.invoke(
        app,
        ["pack", str(run), "-o", str(tmp_path / "x.lowbit"), "--method", "fgq", "--keep", "none"],
    )
    assert result.exit_code == 0, result.output
    assert "udfp8" in result.output or "dfp8" in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "nope.lowbit")])
    assert result.exit_code == 2 and "no such .lowbit file" in result.output
