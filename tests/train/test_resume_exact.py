"""Kill a training process for real (SIGKILL, mid-epoch), resume it, and get the exact weights of
an uninterrupted run; the same for a run stopped after N epochs and continued from the CLI spec."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowbit import data, models
from lowbit.train import TrainConfig, Trainer, load_checkpoint
from lowbit.train.checkpoint import latest
from lowbit.train.runs import make_spec, train_spec

# Dropout (global RNG), shuffling and flip augmentation (the trainer's generator), a step LR
# schedule and Adam state: everything a resume has to restore.
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lowbit import data, models
    from lowbit.train import Trainer, TrainConfig
    torch.set_num_threads(int(sys.argv[2]))
    torch.manual_seed(0)
    s = data.synthetic.load(n_train=200, n_valid=40, n_test=40, shape=(1, 8, 8))
    s.augment = data.transforms.flip
    net = models.create("mlp", input_shape=s.input_shape, num_classes=10, widths=(32,), dropout=0.3)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, schedule="step", milestones=[2], seed=3)
    Trainer(net, s, cfg, run_dir=sys.argv[1], progress=False).fit(_kill_at_step=int(sys.argv[3]))
    """
)


def _setup() -> tuple[data.DataSplits, torch.nn.Module, TrainConfig]:
    torch.manual_seed(0)
    s = data.synthetic.load(n_train=200, n_valid=40, n_test=40, shape=(1, 8, 8))
    s.augment = data.transforms.flip
    net = models.create("mlp", input_shape=s.input_shape, num_classes=10, widths=(32,), dropout=0.3)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, schedule="step", milestones=[2], seed=3)
    return s, net, cfg


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "killed"
    # 200 / 32 -> 7 steps per epoch; step 17 is in the middle of epoch 3.
    proc = subprocess.run(
        [sys.executable, str(script), str(run), str(torch.get_num_threads()), "17"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert manifest["last"]["epoch"] == 2  # epoch 3 was cut short: no checkpoint for it
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    s, net, cfg = _setup()
    resumed = Trainer(net, s, cfg, run_dir=run, progress=False)
    resumed.fit(resume=True)

    s, net, cfg = _setup()
    straight = Trainer(net, s, cfg, run_dir=tmp_path / "straight", progress=False)
    straight.fit()
    _assert_same(resumed.model.state_dict(), straight.model.state_dict())
    _assert_same(
        resumed.base_optimizer.state_dict()["state"][0],
        straight.base_optimizer.state_dict()["state"][0],
    )
    # The metrics file of the resumed run matches the uninterrupted one, epoch by epoch.
    strip = ("epoch_seconds", "samples_per_s")
    recs = [
        {k: v for k, v in json.loads(line).items() if k not in strip}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    ref = [
        {k: v for k, v in json.loads(line).items() if k not in strip}
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert recs == ref
    # The final checkpoint on disk holds the same weights too (weights_only load).
    _assert_same(load_checkpoint(latest(run / "checkpoints"))["model"], straight.model.state_dict())


def test_stop_after_epochs_and_resume_through_the_spec(tmp_path: Path) -> None:
    spec = make_spec(
        model="mlp",
        dataset="synthetic",
        model_options={"widths": [16], "dropout": 0.2},
        data_options={
            "n_train": 128,
            "n_valid": 32,
            "n_test": 32,
            "shape": [1, 6, 6],
            "augment": "flip",
        },
        train={"epochs": 3, "batch_size": 32, "lr": 0.01},
    )
    train_spec(spec, tmp_path / "a", progress=False, stop_after_epochs=1)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["status"] == "stopped"
    summary_a = train_spec(spec, tmp_path / "a", resume=True, progress=False)
    summary_b = train_spec(spec, tmp_path / "b", progress=False)
    assert summary_a["status"] == summary_b["status"] == "finished"
    wa = load_checkpoint(latest(tmp_path / "a" / "checkpoints"))["model"]
    wb = load_checkpoint(latest(tmp_path / "b" / "checkpoints"))["model"]
    _assert_same(wa, wb)
    assert summary_a["test_error_at_best"] == summary_b["test_error_at_best"]


def test_resume_falls_back_to_the_older_checkpoint_when_the_newest_is_damaged(
    tmp_path: Path, capsys
) -> None:
    import pytest

    from lowbit.train import CheckpointError
    from lowbit.train.checkpoint import read_manifest

    spec = make_spec(
        model="mlp",
        dataset="synthetic",
        model_options={"widths": [16], "dropout": 0.2},
        data_options={"n_train": 128, "n_valid": 32, "n_test": 32, "shape": [1, 6, 6]},
        train={"epochs": 3, "batch_size": 32, "lr": 0.01},
    )
    train_spec(spec, tmp_path / "a", progress=False, stop_after_epochs=2)
    ck = tmp_path / "a" / "checkpoints"
    newest = latest(ck)
    assert newest is not None and newest.name == "epoch-0002.pt"
    assert read_manifest(ck)["history"] == ["epoch-0001.pt", "epoch-0002.pt"]
    newest.write_bytes(newest.read_bytes()[:-100])  # e.g. the disk filled up while writing it
    summary_a = train_spec(spec, tmp_path / "a", resume=True, progress=False)
    assert "resuming from the older epoch-0001.pt (epoch 1)" in capsys.readouterr().err
    summary_b = train_spec(spec, tmp_path / "b", progress=False)
    # epoch 2 was trained again, exactly: the same weights and the same metrics as a clean run
    wa = load_checkpoint(latest(ck))["model"]
    wb = load_checkpoint(latest(tmp_path / "b" / "checkpoints"))["model"]
    _assert_same(wa, wb)
    assert summary_a["test_error_at_best"] == summary_b["test_error_at_best"]
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    # with nothing intact left, the error says what to do
    for f in ck.glob("epoch-*.pt"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no older intact checkpoint"):
        train_spec(spec, tmp_path / "a", resume=True, progress=False)


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    import pytest

    spec = make_spec(
        model="mlp",
        dataset="synthetic",
        model_options={"widths": [8]},
        train={"epochs": 1, "batch_size": 64},
    )
    train_spec(spec, tmp_path, progress=False)
    other = make_spec(
        model="mlp",
        dataset="synthetic",
        model_options={"widths": [9]},
        train={"epochs": 2, "batch_size": 64},
    )
    with pytest.raises(ValueError, match="cannot resume"):
        train_spec(other, tmp_path, resume=True, progress=False)


def _legacy_spec() -> dict:
    return make_spec(
        model="mlp",
        dataset="synthetic",
        model_options={"widths": [16]},
        data_options={"n_train": 128, "n_valid": 32, "n_test": 32, "shape": [1, 6, 6]},
        train={"epochs": 2, "batch_size": 32, "lr": 0.01, "fused": False},
    )


def test_runs_from_before_the_fused_option_resume_with_the_per_tensor_adam(tmp_path: Path) -> None:
    # A run directory written before TrainConfig.fused existed (config.json without the key)
    # trained with Adam's per-tensor loop; resuming it must keep that loop, so it ends exactly
    # where an uninterrupted loop-Adam run ends.
    spec = _legacy_spec()
    train_spec(spec, tmp_path / "a", progress=False, stop_after_epochs=1)
    cfg_path = tmp_path / "a" / "config.json"
    stored = json.loads(cfg_path.read_text())
    del stored["train"]["fused"]
    cfg_path.write_text(json.dumps(stored))
    resumed = {k: v for k, v in spec.items()}
    resumed["train"] = {k: v for k, v in spec["train"].items() if k != "fused"}  # a plain resume
    train_spec(resumed, tmp_path / "a", resume=True, progress=False)
    train_spec(spec, tmp_path / "b", progress=False)
    wa = load_checkpoint(latest(tmp_path / "a" / "checkpoints"))["model"]
    wb = load_checkpoint(latest(tmp_path / "b" / "checkpoints"))["model"]
    _assert_same(wa, wb)


def test_a_new_run_never_trains_into_another_runs_directory(tmp_path: Path) -> None:
    s, net, cfg = _setup()
    cfg.epochs = 1
    run = tmp_path / "run"
    Trainer(net, s, cfg, run_dir=run, progress=False).fit()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    _, net2, cfg2 = _setup()
    with pytest.raises(ValueError, match=r"already holds a run \(1 epoch\(s\) logged, with checkp"):
        Trainer(net2, s, cfg2, run_dir=run, progress=False).fit()
    # nothing of the first run was touched
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    # the same trainer object may go on in the same process (one epoch per call)
    _, net3, cfg3 = _setup()
    cfg3.epochs = 2
    t = Trainer(net3, s, cfg3, run_dir=tmp_path / "steps", progress=False)
    t.fit(stop_after_epochs=1)
    assert t.fit(stop_after_epochs=1)["status"] == "finished"
    # a killed run that logged an epoch before its first checkpoint: resume starts again and
    # the stale line goes
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "lr": 0.5}) + "\n")
    _, net4, cfg4 = _setup()
    cfg4.epochs = 1
    Trainer(net4, s, cfg4, run_dir=stale, progress=False).fit(resume=True)
    lines = [json.loads(x) for x in (stale / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1] and lines[0]["lr"] != 0.5
