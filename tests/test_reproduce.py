"""`lowbit reproduce`: --list over the installed recipes, a tiny synthetic recipe end to end
(paper number beside the measured one), a post-training (kind = "ptq") recipe, the time budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowbit import data as data_mod
from lowbit.cli import app
from lowbit.reproduce import list_recipes, load_splits, reproduce, train_budgeted
from lowbit.train.config import RECIPE_DIR, load_recipe

SYNTH = """
[recipe]
name = "{name}"
description = "tiny synthetic recipe for the tests"
{extra}
[paper]
metric = "test_error_percent"
value = {value}
source = "made up for the test"

[model]
name = "mlp"
widths = [32, 32]

[data]
name = "synthetic"
n_train = 200
n_valid = 50
n_test = 100

[method]
{method}

[train]
epochs = 2
batch_size = 50
lr = 0.003
"""


def _write(
    tmp: Path,
    name: str,
    value: float = 1.5,
    method: str = 'name = "ttq"\nkeep = ["last"]',
    extra: str = "",
) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(SYNTH.format(name=name, value=value, method=method, extra=extra))
    return p


def test_list_shows_every_recipe_with_its_data_status() -> None:
    rows = list_recipes()
    names = {r["name"] for r in rows}
    assert names == {load_recipe(str(p))["recipe"]["name"] for p in RECIPE_DIR.glob("*.toml")}
    status = {s["name"]: s["available"] for s in data_mod.status()}
    for r in rows:
        assert "error" not in r, r
        assert r["data_available"] == status.get(r["dataset"], False), r["name"]
        if r["dataset"] not in status:
            assert "no loader" in r["data_where"]
        assert r["kind"] in ("train", "ptq")
    by = {r["name"]: r for r in rows}
    assert by["ttq-mnist-mlp"]["data_available"] is True  # MNIST is embedded
    assert by["ttq-mnist-mlp"]["init_from"] == "ttq-mnist-mlp-fp"
    assert by["ttq-cifar10-resnet20"]["paper_value"] == pytest.approx(8.87)


def test_list_command_prints_json_and_table() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce", "--list", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["name"] for r in json.loads(result.output)} == {r["name"] for r in list_recipes()}
    table = runner.invoke(app, ["reproduce", "--list"])
    assert table.exit_code == 0
    assert "ttq-cifar10-resnet20 " in table.output and "8.87 % err" in table.output


def test_reproduce_writes_paper_vs_measured_report(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "tiny-ttq", value=1.5)
    lines: list[str] = []
    res = reproduce(str(recipe), tmp_path / "out", progress=False, log=lines.append)
    (row,) = res.rows
    summary = json.loads((res.trained.run_dir / "summary.json").read_text())
    assert row.paper_value == pytest.approx(1.5)
    assert row.protocol_error == pytest.approx(summary["test_error_at_best"])
    assert row.epochs == "2/2"
    md = res.report.read_text()
    assert "| test err sim | paper | protocol err |" not in md  # paper columns come first
    assert "| float layers | paper | protocol err | test err sim |" in md
    assert f"| 1.5% | {row.protocol_error:.2f}% |" in md
    assert "the paper's 1.5%" in md
    stored = json.loads((res.out_dir / "results.json").read_text())
    assert stored["rows"][0]["paper_value"] == pytest.approx(1.5)
    assert stored["rows"][0]["protocol_error"] == pytest.approx(row.protocol_error)
    assert (res.out_dir / "plots" / "training_curves.png").is_file()
    assert (res.out_dir / "plots" / "ttq_scales.png").is_file()
    assert Path(row.model_file).is_file() and row.packed_error is not None
    assert any("paper" in line for line in lines)


def test_ptq_recipe_reproduces_its_float_model_first(tmp_path: Path) -> None:
    _write(tmp_path, "tiny-fp", method='name = "fp"')
    ptq = tmp_path / "tiny-fgq.toml"
    ptq.write_text(
        '[recipe]\nname = "tiny-fgq"\nkind = "ptq"\n'
        f'init_from = "{(tmp_path / "tiny-fp.toml").as_posix()}"\n'
        '[paper]\nmetric = "test_error_percent"\nsource = "none"\n'
        '[method]\nname = "fgq"\ngroup_size = 4\nact_bits = 8\ncalib_samples = 64\n'
    )
    res = reproduce(str(ptq), tmp_path / "out", progress=False, log=lambda s: None)
    assert [r.method for r in res.rows] == ["fp", "fgq"]
    fgq = res.rows[1]
    assert fgq.epochs == "post-training" and fgq.paper_value is None
    assert fgq.weights.startswith("ternary 2b N=4")
    assert (tmp_path / "out" / "tiny-fp" / "report.md").is_file()
    assert "carries no paper number" in res.report.read_text()


def test_bad_kind_is_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad", extra='kind = "distill"')
    with pytest.raises(ValueError, match="kind must be"):
        reproduce(str(p), tmp_path / "out", progress=False, log=lambda s: None)


def test_deadline_stops_training_after_one_epoch(tmp_path: Path) -> None:
    spec = load_recipe(str(_write(tmp_path, "budget", method='name = "fp"')))
    spec["train"]["epochs"] = 3
    splits = load_splits(spec["data"])
    said: list[str] = []
    res = train_budgeted(
        spec,
        splits,
        tmp_path / "run",
        deadline=time.perf_counter() - 1,
        progress=False,
        log=said.append,
    )
    assert (res.epochs_done, res.epochs) == (1, 3)
    assert res.summary["status"] == "stopped"
    assert any("time budget" in s for s in said)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_smoke_overrides_are_said_and_bad_runs_leave_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lowbit.cli import app

    recipe = _write(tmp_path, "tiny-fp", method='name = "fp"')
    lines: list[str] = []
    res = reproduce(
        str(recipe), tmp_path / "out", epochs=1, train_samples=100, progress=False,
        timing=False, log=lines.append,
    )  # fmt: skip
    md = res.report.read_text()
    # the verdict counts against the recipe's own budget and says the data was cut
    assert "1 of the recipe's 2 epochs; first 100 training samples only)" in md
    assert any("--epochs 1: 1 of the recipe's 2 epochs" in line for line in lines)
    assert any("packing, saving, reloading" in line for line in lines)
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        reproduce(str(recipe), tmp_path / "bad", epochs=0, progress=False, log=lambda s: None)
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(
        app, ["reproduce", str(recipe), "--json", "--out", str(tmp_path / "j")]
    )
    assert res.exit_code == 2 and "--json goes with --list" in res.output
    assert not (tmp_path / "j").exists()


def test_bad_sample_counts_and_used_output_folders_are_refused(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "tiny-fp", method='name = "fp"')
    for flag in ("--train-samples", "--threads"):
        for value in ("0", "-100"):
            res = CliRunner().invoke(
                app, ["reproduce", str(recipe), flag, value, "--out", str(tmp_path / "n")]
            )
            assert res.exit_code == 2 and f"{flag} must be at least 1, got {value}" in res.output
    with pytest.raises(ValueError, match="train_samples must be at least 1"):
        load_splits({"name": "synthetic"}, train_samples=0)
    # a folder that already holds something: refused before any work, nothing in it touched
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.md").write_text("an earlier report")
    res = CliRunner().invoke(app, ["reproduce", str(recipe), "--epochs", "1", "-o", str(used)])
    assert res.exit_code == 2 and f"{used} is not empty" in res.output
    assert [p.name for p in used.iterdir()] == ["report.md"]
    from lowbit.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="is not empty: choose another output folder"):
        run_demo(DemoConfig(out=str(used)))
    assert [p.name for p in used.iterdir()] == ["report.md"]


def test_a_smoke_run_of_a_recipe_without_paper_number_says_it_was_cut(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "tiny-nonumber", method='name = "fp"')
    recipe.write_text(recipe.read_text().replace("value = 1.5\n", ""))
    res = reproduce(
        str(recipe), tmp_path / "out", epochs=1, train_samples=100, progress=False,
        timing=False, log=lambda s: None,
    )  # fmt: skip
    md = res.report.read_text()
    assert "carries no paper number" in md
    assert "cut-down run: 1 of the recipe's 2 epochs; first 100 training samples only" in md
