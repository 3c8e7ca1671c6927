"""`lowbit train / eval / datasets / models` end to end on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

TINY = [
    "-D",
    "n_train=96",
    "-D",
    "n_valid=32",
    "-D",
    "n_test=32",
    "-D",
    "shape=[1,6,6]",
    "-M",
    "widths=[16]",
]


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    res = _invoke(
        "train",
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        *TINY,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.02",
        "--run-dir",
        str(run),
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output and "test error" in res.output
    # --no-progress: no bar, but one line per epoch (what a nohup'd run's log shows)
    assert "epoch 1/2  loss" in res.output and "epoch 2/2  loss" in res.output, res.output
    return run


def test_train_writes_the_run_directory(run_dir: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/manifest.json"):
        assert (run_dir / name).exists(), name
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"] == {"name": "mlp", "widths": [16]}
    assert cfg["data"]["name"] == "synthetic" and cfg["method"] == {"name": "fp"}
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["schedule"] == "cosine"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_eval_reproduces_the_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    res = _invoke("eval", str(run_dir), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["epoch"] == summary["best_epoch"]
    assert out["test"]["error"] == pytest.approx(summary["test_error_at_best"])
    last = _invoke("eval", str(run_dir), "--which", "last", "--split", "test")
    assert last.exit_code == 0 and "epoch-0002.pt" in last.output and "test" in last.output


def test_eval_refuses_a_corrupt_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "checkpoints" / "manifest.json").read_text())
    best = copy / "checkpoints" / manifest["best"]["file"]
    best.write_bytes(best.read_bytes()[:-10])
    res = _invoke("eval", str(copy))
    assert res.exit_code == 2 and "truncated" in res.output


def test_eval_and_run_name_the_mistake(run_dir: Path, tmp_path: Path) -> None:
    import torch

    res = _invoke("eval", str(run_dir), "--split", "foo")
    assert res.exit_code == 2 and "unknown split 'foo': choose train, valid or test" in res.output
    res = _invoke("eval", str(run_dir / "config.json"))
    assert res.exit_code == 2 and "is not a checkpoint of a run" in res.output
    packed = tmp_path / "m.lowbit"
    packed.write_bytes(b"not really")
    res = _invoke("eval", str(packed))
    assert res.exit_code == 2 and f"lowbit run {packed}" in res.output
    res = _invoke("run", str(run_dir))
    assert res.exit_code == 2 and "a run directory; pack it first (`lowbit pack" in res.output
    if not torch.cuda.is_available():
        res = _invoke("eval", str(run_dir), "--device", "cuda")
        assert res.exit_code == 2 and "torch.cuda.is_available() is False" in res.output
        assert "corrupt" not in res.output


def test_resume_with_only_the_run_dir_continues_the_run(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "more"
    shutil.copytree(run_dir, copy)
    res = _invoke("train", "--run-dir", str(copy), "--resume", "--epochs", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]


def test_resume_refuses_flags_that_change_the_stored_run(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "more"
    shutil.copytree(run_dir, copy)
    before = (copy / "metrics.jsonl").read_text()
    res = _invoke("train", "--run-dir", str(copy), "--resume", "--method", "bnn", "--epochs", "3")
    assert res.exit_code == 2, res.output
    assert "--method bnn (the run's is fp)" in res.output and "another --run-dir" in res.output
    res = _invoke("train", "--run-dir", str(copy), "--resume", "-M", "widths=[32]", "--epochs", "3")
    assert res.exit_code == 2 and "-M widths=[32]" in res.output, res.output
    assert (copy / "metrics.jsonl").read_text() == before  # nothing trained, nothing lost
    res = _invoke("train", "--run-dir", str(copy), "--resume", "--split", "full", "--epochs", "3")
    assert res.exit_code == 2 and "--split" in res.output and "'full'" in res.output, res.output
    # the stored values themselves are fine, and so is a data flag equal to the dataset's default
    # that the run never stored (its split is synthetic's default, "paper")
    res = _invoke(
        "train", "--run-dir", str(copy), "--resume", "--method", "fp", "-M", "widths=[16]",
        "--split", "paper", "--epochs", "3", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # --resume without a run to continue says so
    res = _invoke("train", "--resume")
    assert res.exit_code == 2 and "--resume needs --run-dir" in res.output
    res = _invoke("train", "--resume", "--run-dir", str(tmp_path / "nope"))
    assert res.exit_code == 2 and "is not a run directory (no config.json)" in res.output


def test_recipe_that_fine_tunes_from_another_run_is_not_started_from_scratch(
    run_dir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "tiny-ft.toml"
    recipe.write_text(
        'name = "tiny-ft"\ninit_from = "tiny-fp"\n'
        '[model]\nname = "mlp"\nwidths = [16]\n'
        '[data]\ndataset = "synthetic"\nn_train = 96\nn_valid = 32\nn_test = 32\nshape = [1, 6, 6]\n'
        '[method]\nname = "fp"\n[train]\nepochs = 1\nbatch_size = 32\n'
    )
    run = tmp_path / "ft"
    res = _invoke("train", "--recipe", str(recipe), "--run-dir", str(run))
    assert res.exit_code == 2, res.output
    assert "fine-tunes from tiny-fp" in res.output and "--set init_from=RUN_DIR" in res.output
    assert not run.exists()
    # from a finished run (the fixture's), or explicitly from random weights
    res = _invoke(
        "train", "--recipe", str(recipe), "--run-dir", str(run), "--set", f"init_from={run_dir}",
        "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["init_from"] == str(run_dir)
    res = _invoke(
        "train", "--recipe", str(recipe), "--run-dir", str(tmp_path / "scratch"), "--set",
        "init_from=", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output


def test_unknown_names_list_the_valid_ones() -> None:
    res = _invoke("train", "--model", "vgg16", "--dataset", "mnist")
    assert res.exit_code == 2 and "unknown model 'vgg16'; valid: mlp" in res.output
    res = _invoke("train", "--model", "mlp", "--dataset", "coco")
    assert res.exit_code == 2 and "valid: mnist, cifar10" in res.output
    res = _invoke(
        "train",
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        *TINY,
        "--method",
        "nope",
        "--run-dir",
        "/tmp/never",
    )
    assert res.exit_code == 2 and "unknown method 'nope'; valid: fp" in res.output


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    res = _invoke(
        "train",
        "--model",
        "char_lstm",
        "--dataset",
        "synthetic",
        "-D",
        "n_train=8",
        "--run-dir",
        str(tmp_path / "r"),
    )
    assert res.exit_code == 2
    assert "(1, 28, 28)" in res.output and "char_lstm" in res.output
    res = _invoke(
        "train",
        "--model",
        "mlp",
        "-M",
        "input_shape=[3,32,32]",
        "--dataset",
        "synthetic",
        "-D",
        "n_train=8",
        "--run-dir",
        str(tmp_path / "r2"),
    )
    assert res.exit_code == 2 and "(3, 32, 32)" in res.output and "(1, 28, 28)" in res.output
    # a model that cannot even be built for the images (LeNet-5's 5x5 convs on 12x12 inputs)
    res = _invoke(
        "train", "--model", "lenet5", "--dataset", "synthetic", "-D", "shape=[1,12,12]",
        "-D", "n_train=8", "--run-dir", str(tmp_path / "r3"),
    )  # fmt: skip
    assert res.exit_code == 2
    assert "model lenet5 cannot be built for dataset synthetic's input shape (1, 12, 12)" in (
        res.output
    )


def test_cifar10_offline_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LOWBIT_OFFLINE", "1")
    res = _invoke(
        "train", "--model", "resnet_cifar", "--dataset", "cifar10", "--run-dir", str(tmp_path / "r")
    )
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1
        and "cifar-10-python.tar.gz" in lines[0]
        and str(tmp_path / "cifar10") in lines[0]
    )


def test_recipe_file_with_flags_on_top(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'name = "tiny"\ndescription = "a test recipe"\n'
        '[paper]\nmetric = "test_error_percent"\nvalue = 1.0\n'
        '[model]\nname = "mlp"\nwidths = [8]\nbn_output = true\n'
        '[data]\ndataset = "synthetic"\nn_train = 64\nn_valid = 16\nn_test = 16\nshape = [1, 6, 6]\nbatch_size = 16\n'
        '[method]\nname = "fp"\n'
        '[train]\nepochs = 3\nloss = "squared_hinge"\nschedule = "step"\nmilestones = [1]\n'
    )
    run = tmp_path / "run"
    res = _invoke(
        "train", "--recipe", str(recipe), "--epochs", "1", "--run-dir", str(run), "--no-progress"
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"]["name"] == "tiny" and cfg["paper"]["value"] == 1.0
    assert (
        cfg["train"]["epochs"] == 1
        and cfg["train"]["batch_size"] == 16
        and cfg["train"]["loss"] == "squared_hinge"
    )
    assert cfg["model"]["bn_output"] is True and cfg["data"]["name"] == "synthetic"
    res = _invoke("train", "--recipe", "no-such-recipe", "--run-dir", str(run))
    assert res.exit_code == 2 and "unknown recipe" in res.output


def test_datasets_and_models_listings() -> None:
    res = _invoke("datasets", "--json")
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert (
        rows["mnist"]["available"]
        and "cifar10" in rows
        and rows["svhn"]["default_split"] == "small"
    )
    res = _invoke("models", "--json")
    assert res.exit_code == 0
    assert [r["name"] for r in json.loads(res.output)][:2] == ["mlp", "mlp_laq"]
    table = _invoke("models")
    assert table.exit_code == 0 and "resnet_cifar" in table.output


def test_a_post_training_recipe_is_not_a_training_run() -> None:
    res = _invoke("train", "--recipe", "fgq-mnist-mlp-n4", "--epochs", "1")
    assert res.exit_code == 2
    assert "is post-training quantization" in res.output
    assert "lowbit reproduce fgq-mnist-mlp-n4" in res.output


def test_a_new_run_is_refused_in_a_used_run_directory(run_dir: Path, tmp_path: Path) -> None:
    before = (run_dir / "metrics.jsonl").read_text()
    res = _invoke(
        "train", "--model", "mlp", "--dataset", "synthetic", *TINY, "--epochs", "1",
        "--run-dir", str(run_dir), "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 2
    assert "already holds a run (2 epoch(s) logged, with checkpoints)" in res.output
    assert "--resume" in res.output and (run_dir / "metrics.jsonl").read_text() == before
    # errors keep their later lines: a fine-tuning start with another architecture names the
    # mismatched tensors (PyTorch puts them after the first line)
    res = _invoke(
        "train", "--model", "mlp", "--dataset", "synthetic", *TINY[:-1], "widths=[24]",
        "--method", "ttq", "--set", f"init_from={run_dir}", "--epochs", "1",
        "--run-dir", str(tmp_path / "ft"), "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 2 and "size mismatch" in res.output, res.output


def test_the_data_dir_of_a_run_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lowbit train --data-dir D: eval and pack of the run find the files in D again
    from lowbit.data import synthetic

    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "elsewhere"))
    synthetic.write_cifar(tmp_path / "d" / "cifar10", "cifar10", n_per_batch=10)
    run = tmp_path / "run"
    res = _invoke(
        "train", "--model", "mlp", "-M", "widths=[8]", "--dataset", "cifar10", "--epochs", "1",
        "--data-dir", str(tmp_path / "d"), "--run-dir", str(run), "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == str(tmp_path / "d")
    res = _invoke("eval", str(run), "--json")
    assert res.exit_code == 0, res.output
    res = _invoke("pack", str(run), "--method", "twn", "-o", str(tmp_path / "m.lowbit"), "--eval")
    assert res.exit_code == 0, res.output
    # resuming without --data-dir is the same run (the files' place is not part of what it trains on)
    res = _invoke("train", "--resume", "--run-dir", str(run), "--epochs", "2", "--no-progress")
    assert res.exit_code == 0, res.output


def test_torchrun_needs_one_run_directory_for_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each rank would stamp its own default folder (they can straddle a second)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = _invoke("train", "--model", "mlp", "--dataset", "synthetic", *TINY)
    assert res.exit_code == 2 and "pass --run-dir under torchrun" in res.output
    assert not (tmp_path / "runs").exists()
