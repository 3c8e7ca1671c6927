"""The kernel benchmark's machinery on a tiny layer (no timing is asserted: speed lives in
`lowbit bench kernels`, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit import bench, kernels, models
from lowbit.cli import app


def test_bench_kernels_runs_every_case() -> None:
    lines: list[str] = []
    rows = bench.bench_kernels(
        size=64,
        threads=(1,),
        reps=20,
        batch=3,
        cold_bytes=1 << 16,
        log=lines.append,
        conv_channels=16,
        conv_hw=6,
        conv_batches=(1, 2),
    )
    cases = [r.case for r in rows]
    assert cases[:3] == ["ternary b1 hot", "ternary b1 cold", "ternary b3"]
    assert any("(int4)" in c for c in cases) and any("(float)" in c for c in cases)
    assert "ternary b3 hot (fgq4)" in cases  # FGQ N=4 after a ReLU, 8-bit group scales
    # the variant computes what it says: its output against the float scales it was built from
    layer = bench._Ternary(32, 64, seed=1, variant="fgq4")
    x = torch.rand(5, 64) * 4
    scale = torch.from_numpy(layer.kernel._np[1].copy())
    ref = kernels.LinearKernel(
        layer.tiles, scale, out_features=32, group_size=4, act="udfp", exponent=-4
    )(x)
    assert torch.equal(layer(x), ref)
    assert [c for c in cases if c.startswith("binary")] == [
        "binary b1 bits->bits",
        "binary b1 float->float",
        "binary b1 (bare C++ plan call)",
        "binary b3 bits->bits",
        "binary b3 float->float",
        "binary b3 (bare C++ plan call)",
        "binary conv 16->16 3x3 6x6 b1",
        "binary conv 16->16 3x3 6x6 b2",
    ]
    for r in rows:
        assert r.lowbit_ms > 0 and r.int8_ms is not None
        assert r.vs_int8 == r.int8_ms / r.lowbit_ms and r.vs_fp32 == r.fp32_ms / r.lowbit_ms
    assert any("load average" in line for line in lines)
    assert sum(line.startswith("binary") for line in lines) == 8  # printed as they finish


def test_binary_rows_are_held_to_the_issue_targets() -> None:
    """Issue #10: batch 1 >= 10x int8, batch 64 >= 20x fp32, the 128->128 conv >= 10x fp32."""
    assert bench.target_of("binary b1 bits->bits") == (None, 10.0)
    assert bench.target_of("binary b1 float->float") == (None, 10.0)
    assert bench.target_of("binary b64 bits->bits") == (20.0, None)
    assert bench.target_of("binary b1 (bare C++ plan call)") == (None, None)
    assert bench.target_of("binary b16 bits->bits") == (None, None)  # whole words only
    assert bench.target_of("binary conv 128->128 3x3 32x32 b8") == (10.0, None)
    assert bench.target_of("binary conv 16->16 3x3 6x6 b1") == (None, None)
    assert bench.target_of("ternary b1 hot") == (30.0, 3.0)
    assert bench.target_of("ternary b1 hot (int4)") == (None, None)
    met = bench.Row("binary b1 bits->bits", 1, 4.0, 0.4, 0.03)
    assert met.target == ">=10x int8 ok"
    missed = bench.Row("binary b64 bits->bits", 1, 30.0, 5.0, 2.0)
    assert missed.target == ">=20x fp32 MISSED"
    no_int8 = bench.Row("binary conv 128->128 3x3 32x32 b1", 1, 3.0, None, 0.2)
    assert no_int8.vs_int8 is None and no_int8.target == ">=10x fp32 ok"
    line = bench.format_row(no_int8)
    assert line.count("—") == 2 and "15.0x" in line
    assert json.loads(json.dumps(bench.rows_as_dicts([no_int8])))[0]["int8_ms"] is None


def test_binary_cases_compute_the_binary_layer() -> None:
    """The timed calls compute what their rows claim, checked against float64 PyTorch on ±1
    values (threshold 0: a bit is set where the dot product is negative)."""
    from lowbit import binary as B

    case = bench.BinaryLinearCase(70, 100, 3, seed=4)
    calls = case.calls()
    w, x = B.signs(case.weight).double(), B.signs(case.x).double()
    d = torch.nn.functional.linear(x, w)
    y = calls["float->float"]()
    assert isinstance(y, torch.Tensor) and torch.equal(y.double(), d)
    bits = calls["bits->bits"]()
    assert isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8
    assert torch.equal(B.unpack_bits(bits, 70), B.signs(d))
    calls["plan call"]()
    assert torch.equal(torch.from_numpy(case._plan_args[2]), bits)
    torch.testing.assert_close(calls["fp32"](), case.x @ case.weight.T)
    q8 = calls["int8"]()
    assert isinstance(q8, torch.Tensor) and q8.shape == (3, 70)

    conv = bench.BinaryConvCase(16, 6, 2, seed=5)
    calls = conv.calls()
    d = torch.nn.functional.conv2d(
        B.signs(conv.x).double(), B.signs(conv.weight).double(), padding=1
    )
    bits = calls["bits->bits"]()
    assert isinstance(bits, torch.Tensor) and bits.shape[:3] == (2, 6, 6)
    assert torch.equal(B.unpack_bits(bits, 16), B.signs(d).permute(0, 2, 3, 1))
    q = calls["int8"]()
    assert isinstance(q, torch.Tensor) and q.is_quantized and q.shape == (2, 16, 6, 6)


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


def test_bench_model_runs_a_packed_char_lstm_against_pytorchs_lstm() -> None:
    torch.manual_seed(0)
    net = models.create("char_lstm", input_shape=(5,), num_classes=12, hidden=16)
    packed = lowbit.pack(lowbit.quantize(net, "lat", keep=("last",)).eval(), strict=True)
    twin = bench.float_twin(packed)
    assert type(twin.lstm) is torch.nn.LSTM
    assert (twin.lstm.input_size, twin.lstm.hidden_size, twin.lstm.batch_first) == (12, 16, True)
    x = bench._model_input(packed, 3, (5,))
    assert x.dtype == torch.int64 and x.shape == (3, 5) and int(x.max()) < 12
    lines: list[str] = []
    rows = bench.bench_model(packed, (5,), batches=(3,), threads=(1,), reps=20, log=lines.append)
    assert [(r.batch, r.threads) for r in rows] == [(3, 1)]


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
    # the throughput line names the batch it timed, not the one asked for
    result = runner.invoke(app, ["run", str(out), "--reps", "20", "--batch-size", "100000"])
    assert result.exit_code == 0, result.output
    timed = len(lowbit.data.load("synthetic").test)
    assert f"(batch {timed}: the split has only these, not 100000, median" in result.output


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
    # --method is for float runs: a TTQ run packs as TTQ, and says so instead of ignoring it
    ttq = _fake_run(tmp_path, "ttq")
    result = runner.invoke(
        app, ["pack", str(ttq), "-o", str(tmp_path / "t.lowbit"), "--method", "twn"]
    )
    assert (
        result.exit_code == 2 and "was trained with ttq: it packs as ttq, not twn" in result.output
    )
    assert not (tmp_path / "t.lowbit").exists()
    result = runner.invoke(app, ["pack", str(ttq), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory: give a file path" in result.output
    # the file records where it came from as an absolute path
    from lowbit.saveload import read_manifest

    result = runner.invoke(app, ["pack", str(ttq), "-o", str(tmp_path / "t.lowbit")])
    assert result.exit_code == 0, result.output
    source = read_manifest(tmp_path / "t.lowbit")["metadata"]["source"]
    assert Path(source).is_absolute() and Path(source).is_file()


def _packed_bnns() -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    """A packed BNN MLP (bit-plane first layer) and ConvNet, untrained (as `lowbit pack --xnor`)."""
    from lowbit import binary as B
    from lowbit.models.convnet import ConvNet
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    mlp = lowbit.quantize(
        MLP(widths=(96, 130, 70), act="hardtanh", bn_output=True),
        "bnn",
        keep=("last",),
        overrides={"net.fc0": {"activations": "uint8"}},
    ).eval()
    conv = lowbit.quantize(
        ConvNet(input_shape=(3, 12, 12), width=8, fc=40, act="hardtanh"),
        "bnn",
        keep=(),
        overrides={"features.conv0": {"activations": "float"}},
    ).eval()
    return [(B.pack_bnn(mlp), (1, 28, 28)), (B.pack_bnn(conv), (3, 12, 12))]


def test_float_twin_of_packed_bnns_has_no_packed_module() -> None:
    from lowbit import binary as B
    from lowbit.nn import QuantConv2d, QuantLinear
    from lowbit.pack import PackedConv2d, PackedLinear

    packed_types = (
        B.PackedBinaryLinear,
        B.PackedBitplaneLinear,
        B.PackedBinaryConv2d,
        B.BinaryMaxPool2d,
        B.FlattenBits,
        PackedLinear,
        PackedConv2d,
        QuantLinear,
        QuantConv2d,
    )
    seen: set[type] = set()
    for packed, shape in _packed_bnns():
        seen |= {type(m) for m in packed.modules()}
        twin = bench.float_twin(packed)
        assert not any(isinstance(m, packed_types) for m in twin.modules())
        assert any(isinstance(m, B.PackedBinaryLinear) for m in packed.modules())  # untouched
        x = torch.randn(5, *shape)
        with torch.no_grad():
            assert twin(x).shape == packed(x).shape == (5, 10)
        # Same layer shapes, in fp32.
        for a, b in zip(packed.children(), twin.children(), strict=True):
            if isinstance(a, (B.PackedBinaryLinear, B.PackedBitplaneLinear)):
                assert type(b) is torch.nn.Linear
                assert (b.in_features, b.out_features) == (a.in_features, a.out_features)
            elif isinstance(a, B.PackedBinaryConv2d):
                assert type(b) is torch.nn.Conv2d
                assert (b.in_channels, b.out_channels, b.kernel_size, b.padding) == (
                    a.in_channels,
                    a.out_channels,
                    a.kernel_size,
                    a.padding,
                )
            elif isinstance(a, B.BinaryMaxPool2d):
                assert type(b) is torch.nn.MaxPool2d and b.kernel_size == a.kernel_size
            elif isinstance(a, B.FlattenBits):
                assert type(b) is torch.nn.Flatten
    # Every kind of XNOR stage was covered by the two models.
    assert {
        B.PackedBinaryLinear,
        B.PackedBitplaneLinear,
        B.PackedBinaryConv2d,
        B.BinaryMaxPool2d,
        B.FlattenBits,
    } <= seen


def test_cli_bench_model_reads_the_input_shape_of_an_xnor_file(tmp_path: Path) -> None:
    packed, shape = _packed_bnns()[1]  # a 3x12x12 ConvNet: the (1, 28, 28) default would fail
    out = tmp_path / "bnn.lowbit"
    lowbit.save(packed, out, metadata={"input_shape": list(shape)})
    from lowbit.saveload import read_manifest

    assert bench.stored_input_shape(read_manifest(out), lowbit.load(out)) == shape
    result = CliRunner().invoke(app, ["bench", "model", str(out), "--threads", "1", "--reps", "20"])
    assert result.exit_code == 0, result.output
    assert "input (3, 12, 12)" in result.output and "batch  256" in result.output


@pytest.mark.parametrize(
    "isa", [i for i in ("scalar", "avx2", "avx512") if i in lowbit.kernels.available_isas()]
)
def test_target_note_names_the_path_the_targets_do_not_assume(isa: str) -> None:
    with lowbit.kernels.use_isa(isa):
        note = bench.target_note()
    if isa == "avx512":
        assert note is None
    else:
        assert note is not None and f"runs the {isa} path" in note and "AVX-512" in note


def test_bench_arguments_and_targets_say_what_they_apply_to(tmp_path: Path) -> None:
    # a file without a stored input shape: --input-shape, or a clear error (not MNIST assumed)
    packed, shape = _packed_bnns()[1]
    out = tmp_path / "noshape.lowbit"
    lowbit.save(packed, out)
    res = CliRunner().invoke(app, ["bench", "model", str(out), "--threads", "1", "--reps", "20"])
    assert res.exit_code == 2 and "stores no input shape: pass --input-shape" in res.output
    res = CliRunner().invoke(
        app,
        ["bench", "model", str(out), "--threads", "1", "--reps", "20", "--input-shape", "3,12,12",
         "--batch", "8"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "input (3, 12, 12)" in res.output and "batch    8" in res.output
    assert "MISSED" not in res.output and ">=5x" not in res.output  # the MNIST-model target only
    for bad in (["--size", "0"], ["--batch", "0"], ["--batch", "-3"]):
        res = CliRunner().invoke(app, ["bench", "kernels", "--threads", "1", "--reps", "20", *bad])
        assert res.exit_code == 2 and "must be at least" in res.output, res.output
    # a small layer is held to no 4096x4096 target
    rows = bench.bench_kernels(
        size=64, threads=(1,), reps=20, batch=64, variants=False, binary=False, log=lambda s: None
    )
    assert all(r.target == "" for r in rows)
    # variants=False (--no-variants): the three plain ternary rows, no "(variant)" rows
    assert [r.case for r in rows] == ["ternary b1 hot", "ternary b1 cold", "ternary b64"]
    assert bench.Row("ternary b64", 1, 10.0, 2.0, 1.0).target  # the 4096 default still is
