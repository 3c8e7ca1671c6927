"""`lowbit demo` at a tiny budget: every row, every report file, and numbers recomputed here from
the models and files the demo wrote (not read back from the demo's own bookkeeping)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit import models
from lowbit.binary import PackedBinaryLinear
from lowbit.demo import STAGES, DemoConfig, DemoResult, _stage_spec, run_demo
from lowbit.pack import PackedLinear

KEYS = ["fp", "fgq", "ttq", "bnn", "lat2", "laq"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(
        out=out,
        dataset="synthetic",
        data_options={"n_train": 300, "n_valid": 64, "n_test": 200},
        widths=(32, 32),
        epochs=1,
        budget=0,
        reps=3,
        progress=False,
    )
    lines: list[str] = []
    result = run_demo(cfg, log=lines.append)
    result.log = lines  # type: ignore[attr-defined]
    return result


def _preds(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x).argmax(-1)


def test_every_model_is_a_row_of_the_printed_table(demo: DemoResult) -> None:
    assert [r.method for r in demo.rows] == KEYS
    header = demo.table.splitlines()[0]
    for col in (
        "test err sim",
        "test err packed",
        "file",
        "compr.",
        "samples/s b256",
        "latency b1",
    ):
        assert col in header
    body = demo.table.splitlines()[2 : 2 + len(KEYS)]
    for row, line in zip(demo.rows, body, strict=True):
        assert line.startswith(row.name)
        assert f"{row.sim_error:.2f}%" in line
        if row.packed_error is not None:
            assert f"{row.packed_error:.2f}%" in line
    assert demo.table in "\n".join(demo.log)  # type: ignore[attr-defined]
    assert any(str(demo.report) in line for line in demo.log)  # type: ignore[attr-defined]


def test_report_files_exist(demo: DemoResult) -> None:
    out = demo.out_dir
    for name in ("report.md", "results.json", "table.txt"):
        assert (out / name).is_file()
    for png in (
        "training_curves",
        "ttq_scales",
        "ttq_sparsity",
        "ttq_histograms",
        "weight_histograms",
        "tradeoff",
    ):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "report.md").read_text()
    for row in demo.rows:
        assert f"| {row.name} |" in md
    for png in ("training_curves", "tradeoff", "ttq_scales"):
        assert f"plots/{png}.png" in md
    stored = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in stored["rows"]] == KEYS
    assert stored["facts"]["wall time (s)"] > 0
    for key in ("fp", "ttq", "bnn", "lat2", "laq"):
        assert (out / "runs" / key / "metrics.jsonl").is_file()
        assert not (out / "runs" / key / "checkpoints").exists()  # only the .lowbit models stay
    assert "## Targets" in md


@pytest.mark.parametrize("key", KEYS[1:])
def test_packed_numbers_recomputed_from_the_saved_file(demo: DemoResult, key: str) -> None:
    row = demo.rows[KEYS.index(key)]
    test = demo.splits[key].test
    sim = demo.models[key]
    sim_pred = _preds(sim, test.x)
    assert row.sim_error == pytest.approx(100.0 * float((sim_pred != test.y).double().mean()))
    assert row.model_file and Path(row.model_file).is_file()
    loaded = lowbit.load(row.model_file)
    # BNN runs on the XNOR chain (PackedBinaryLinear), the others on PackedLinear
    packed_layers = [
        m for m in loaded.modules() if isinstance(m, (PackedLinear, PackedBinaryLinear))
    ]
    if key == "bnn":
        assert all(isinstance(m, PackedBinaryLinear) for m in packed_layers)
    assert packed_layers, f"{key}: nothing packed ({row.packed_note})"
    assert len(packed_layers) == sum(r.startswith("packed") for r in row.packing_report.values())
    pred = _preds(loaded, test.x)
    assert row.packed_error == pytest.approx(100.0 * float((pred != test.y).double().mean()))
    assert row.agreement == pytest.approx(100.0 * float((pred == sim_pred).double().mean()))
    # The packed model is the simulated one: they agree on (nearly) every sample.
    assert row.agreement >= 90.0
    # Compression: float32 bytes of the architecture / the file's size.
    spec = _stage_spec(
        next(s for s in STAGES if s.key == (key if key != "fgq" else "fp")),
        DemoConfig(widths=(32, 32), epochs=1, dataset="synthetic"),
    )
    arch = models.create(
        spec["model"]["name"],
        input_shape=test.x.shape[1:],
        num_classes=10,
        **{k: v for k, v in spec["model"].items() if k != "name"},
    )
    fbytes = sum(4 * t.numel() for t in arch.state_dict().values() if t.is_floating_point())
    assert row.float_bytes == fbytes
    assert row.file_bytes == os.path.getsize(row.model_file)
    assert row.compression == pytest.approx(fbytes / os.path.getsize(row.model_file))
    # Quantized-layer compression: float32 weight + bias bytes over the packed tensors' bytes.
    # (the calibrated activation exponent is in the state dict, but in the file's config)
    packed_bytes = sum(
        t.numel() * t.element_size()
        for m in packed_layers
        for k, t in m.state_dict().items()
        if k != "act_exponent"
    )
    layer_float = sum(
        4 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
        for m in packed_layers
    )
    assert row.layer_compression == pytest.approx(layer_float / packed_bytes)
    weight_bytes = sum(
        t.numel() * t.element_size()
        for m in packed_layers
        for n, t in m.state_dict().items()
        if n not in ("bias", "act_exponent")
    )
    weight_float = sum(4 * m.in_features * m.out_features for m in packed_layers)
    assert row.weight_compression == pytest.approx(weight_float / weight_bytes)
    assert row.weight_compression > row.layer_compression  # the fp32 bias is not compressed
    assert row.layer_compression > 2.0
    assert row.speedup is not None and row.speedup > 0


def test_ternary_and_binary_layers_shrink_well(demo: DemoResult) -> None:
    by = {r.method: r for r in demo.rows}
    for key in ("ttq", "lat2", "bnn"):
        assert by[key].layer_compression is not None and by[key].layer_compression > 6.0, key
    assert by["fp"].packed_error is None and by["fp"].compression is not None
    assert by["fp"].compression <= 1.0  # a float file is no smaller than its float32 weights


def test_demo_spec_shortens_schedules_and_full_keeps_the_recipe() -> None:
    ttq = next(s for s in STAGES if s.key == "ttq")
    short = _stage_spec(ttq, DemoConfig(epochs=2))
    assert short["train"]["epochs"] == 2
    assert short["train"]["schedule"] == "cosine"  # recipe milestone 3 >= 2 epochs would never fire
    full = _stage_spec(ttq, DemoConfig(full=True))
    from lowbit.train.config import load_recipe

    recipe = load_recipe(ttq.recipe)
    assert full["train"]["epochs"] == recipe["train"]["epochs"]
    assert full["train"]["schedule"] == recipe["train"]["schedule"]
    assert "init_from" not in full["recipe"]


def test_demo_command_rejects_unknown_methods() -> None:
    from lowbit.cli import app

    result = CliRunner().invoke(app, ["demo", "--methods", "fp,xnor"])
    assert result.exit_code == 2
    assert "xnor" in result.output
