"""lowbit.report: table formatting, the honest "n/a" row for a model that cannot be packed, and
the figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import models
from lowbit.binary import PackedBinaryLinear
from lowbit.data import synthetic
from lowbit.pack import PackedLinear
from lowbit.report import plots
from lowbit.report.results import ModelRow, float_bytes, format_table, markdown_table, measure


def _row(**kw: object) -> ModelRow:
    base = dict(
        name="TTQ",
        method="ttq",
        weights="ternary",
        acts="fp32 -> int8",
        float_layers="fc2",
        sim_error=2.0,
    )
    base.update(kw)
    return ModelRow(**base)  # type: ignore[arg-type]


def test_speedups_are_ratios_against_float() -> None:
    r = _row(throughput=3000.0, float_throughput=1000.0, latency_ms=0.5, float_latency_ms=2.0)
    assert r.speedup == pytest.approx(3.0)
    assert r.latency_speedup == pytest.approx(4.0)
    assert _row().speedup is None
    d = r.to_dict()
    assert d["speedup"] == pytest.approx(3.0) and d["latency_speedup"] == pytest.approx(4.0)


def test_tables_show_numbers_and_na_reasons() -> None:
    rows = [
        _row(
            packed_error=2.25,
            agreement=99.5,
            file_bytes=20480,
            float_bytes=409600,
            compression=20.0,
            layer_compression=15.2,
        ),
        _row(name="QNN", method="qnn", packed_note="n/a: its log4 inputs have no packed kernel"),
    ]
    text = format_table(rows)
    first, second = text.splitlines()[2:4]
    assert "2.25%" in first and "20.0 KiB" in first and "20.0x" in first and "15.2x" in first
    assert "n/a" in second
    assert "its log4 inputs have no packed kernel" in text  # full reason in the notes
    md = markdown_table(rows, paper=True)
    assert md.splitlines()[0].count("|") == md.splitlines()[2].count("|")
    assert "| paper | protocol err |" in md


def test_unpackable_model_is_reported_not_hidden(tmp_path: Path) -> None:
    torch.manual_seed(0)
    splits = synthetic.load(64, 0, 64, shape=(1, 8, 8))
    net = models.create("mlp", input_shape=(1, 8, 8), widths=(16,))
    q = lowbit.quantize(net, "qnn", keep=(), activations="log4").eval()
    row, packed = measure(
        "QNN log",
        "qnn",
        q,
        models.create("mlp", input_shape=(1, 8, 8), widths=(16,)),
        splits.test,
        tmp_path / "q.lowbit",
        timing=False,
    )
    assert packed is None
    assert row.packed_error is None and row.packed_note.startswith("n/a:")
    assert row.sim_error == pytest.approx(
        100.0 * float((q(splits.test.x).argmax(1) != splits.test.y).double().mean())
    )
    assert "n/a" in format_table([row])


def test_float_bytes_counts_float_state_only() -> None:
    net = models.create("mlp", input_shape=(1, 4, 4), widths=(8,))
    expected = 4 * sum(t.numel() for t in net.state_dict().values() if t.dtype == torch.float32)
    assert float_bytes(net) == expected  # num_batches_tracked (int64) is not weight storage


def test_figures_are_written(tmp_path: Path) -> None:
    net = models.create("mlp", input_shape=(1, 8, 8), widths=(16, 16))
    q = lowbit.quantize(
        models.create("mlp", input_shape=(1, 8, 8), widths=(16, 16)), "twn", keep=()
    )
    p = plots.plot_weight_histograms({"float": net, "TWN": q}, tmp_path / "h.png")
    assert p is not None and p.read_bytes()[:4] == b"\x89PNG"
    rows = [
        _row(file_bytes=1000, throughput=10.0),
        _row(name="fp", method="fp", file_bytes=16000, throughput=5.0),
    ]
    t = plots.plot_tradeoff(rows, tmp_path / "t.png")
    assert t is not None and t.is_file()
    assert plots.plot_training_curves({"none": tmp_path / "missing"}, tmp_path / "c.png") is None
    assert plots.plot_tradeoff([_row()], tmp_path / "x.png") is None


def test_xnor_rows_fall_back_to_per_layer_packing_and_say_so(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    splits = synthetic.load(64, 0, 64, shape=(1, 8, 8))
    net = models.create("mlp_bnn", input_shape=(1, 8, 8), widths=(16, 16))
    q = lowbit.quantize(net, "bnn").eval()
    arch = models.create("mlp_bnn", input_shape=(1, 8, 8), widths=(16, 16))
    row, packed = measure(
        "BNN", "bnn", q, arch, splits.test, tmp_path / "x.lowbit", timing=False, xnor=True
    )
    assert packed is not None and any(isinstance(m, PackedBinaryLinear) for m in packed.modules())
    assert row.agreement == 100.0 and "XNOR" not in row.packed_note
    real = lowbit.pack

    def refuse(model, *args, xnor=False, **kwargs):
        if xnor:
            raise ValueError("threshold is not monotone\nmore")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lowbit, "pack", refuse)
    row, packed = measure(
        "BNN", "bnn", q, arch, splits.test, tmp_path / "y.lowbit", timing=False, xnor=True
    )
    assert packed is not None and any(isinstance(m, PackedLinear) for m in packed.modules())
    assert (
        "XNOR chain not possible (threshold is not monotone): packed per layer" in row.packed_note
    )
