"""Trainer: losses, schedules, parameter groups, method hooks, protocol, checkpoints, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from lowbit import data, models
from lowbit.train import (
    CheckpointError,
    ShapeMismatchError,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    checkpoint,
    cross_entropy,
    load_checkpoint,
    lr_factor,
    resolve_method,
    squared_hinge,
)


def _tiny(**kw) -> data.DataSplits:
    opts = {"n_train": 96, "n_valid": 32, "n_test": 32, "shape": (1, 6, 6)}
    opts.update(kw)
    return data.synthetic.load(**opts)


def _mlp(splits: data.DataSplits, **kw) -> nn.Module:
    torch.manual_seed(0)
    return models.create(
        "mlp", input_shape=splits.input_shape, num_classes=splits.num_classes, widths=(16,), **kw
    )


# ---------------------------------------------------------------- losses


def test_squared_hinge_by_hand() -> None:
    out = torch.tensor([[0.5, -2.0, 0.3], [2.0, 0.0, -0.5]])
    target = torch.tensor([0, 2])
    # row 0: y = (+1, -1, -1): 1 - y*out = (0.5, -1.0, 1.3) -> clamp -> squares (0.25, 0, 1.69)
    # row 1: y = (-1, -1, +1): 1 - y*out = (3.0, 1.0, 1.5) -> squares (9, 1, 2.25)
    expected = (0.25 + 0 + 1.69 + 9 + 1 + 2.25) / 6
    assert squared_hinge(out, target).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_by_hand_and_for_sequences() -> None:
    out = torch.tensor([[1.0, 2.0, 3.0]])
    expected = -(3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert cross_entropy(out, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-6)
    seq = torch.randn(2, 5, 7)
    tgt = torch.randint(0, 7, (2, 5))
    manual = -torch.log_softmax(seq, -1).gather(-1, tgt[..., None]).mean()
    assert cross_entropy(seq, tgt).item() == pytest.approx(manual.item(), rel=1e-6)


# ---------------------------------------------------------------- schedules and config


def test_lr_schedules() -> None:
    step = TrainConfig(epochs=50, schedule="step", milestones=[15, 25], gamma=0.1)
    assert [lr_factor(step, e) for e in (0, 14, 15, 24, 25, 49)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    every = TrainConfig(epochs=200, schedule="step", step_size=15, gamma=0.5)
    assert lr_factor(every, 29) == 0.5 and lr_factor(every, 30) == 0.25
    bnn = TrainConfig(epochs=1000, lr=0.003, schedule="exp", lr_final=3e-7)
    assert lr_factor(bnn, 1) == pytest.approx(0.99083, abs=1e-5)  # papers.md §2.8
    assert 0.003 * lr_factor(bnn, 1000) == pytest.approx(3e-7, rel=1e-9)
    rnn = TrainConfig(epochs=200, schedule="exp", gamma=0.98, decay_start=10)
    assert lr_factor(rnn, 10) == 1 and lr_factor(rnn, 12) == pytest.approx(0.98**2)
    # one factor per milestone: BinaryNet.pytorch AlexNet 5e-3 -> 1e-3 -> 5e-4 -> 1e-4 -> 1e-5
    alex = TrainConfig(
        epochs=45,
        lr=5e-3,
        schedule="step",
        milestones=[20, 30, 35, 40],
        gammas=[0.2, 0.5, 0.2, 0.1],
    )
    rates = [5e-3 * lr_factor(alex, e) for e in (0, 19, 20, 29, 30, 34, 35, 39, 40, 44)]
    assert rates == pytest.approx([5e-3, 5e-3, 1e-3, 1e-3, 5e-4, 5e-4, 1e-4, 1e-4, 1e-5, 1e-5])
    with pytest.raises(ValueError, match="one factor per milestone"):
        TrainConfig(schedule="step", milestones=[20, 30], gammas=[0.2])
    cos = TrainConfig(epochs=4, schedule="cosine")
    assert (
        lr_factor(cos, 0) == 1
        and lr_factor(cos, 2) == pytest.approx(0.5)
        and lr_factor(cos, 4) == pytest.approx(0)
    )


def test_config_validation_and_aliases() -> None:
    with pytest.raises(ValueError, match="valid: adam, sgd, adamax"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="valid: cross_entropy, squared_hinge"):
        TrainConfig(loss="mse")
    c = TrainConfig(loss="ce", schedule="none")
    assert c.loss == "cross_entropy" and c.schedule == "constant"


def test_param_groups_weight_decay_rules_by_name() -> None:
    splits = _tiny(shape=(1, 28, 28))
    net = models.create("lenet5", channels=(2, 3), fc=(4,), batchnorm=True)
    cfg = TrainConfig(
        weight_decay=1e-3,
        weight_decay_rules=[(r"classifier\.fc2\.", 0.0), (r"conv1\.weight$", 5e-4)],
    )
    t = Trainer(net, splits, cfg, progress=False)
    names = {id(p): n for n, p in net.named_parameters()}
    wd = {
        names[id(p)]: g["weight_decay"] for g in t.base_optimizer.param_groups for p in g["params"]
    }
    assert wd["features.conv1.weight"] == 5e-4
    assert wd["features.conv2.weight"] == 1e-3 and wd["classifier.fc1.weight"] == 1e-3
    assert wd["classifier.fc2.weight"] == 0.0 and wd["classifier.fc2.bias"] == 0.0
    assert wd["features.bn1.weight"] == 0.0  # 1-D parameters are not decayed by default
    assert len(wd) == len(list(net.parameters()))


# ---------------------------------------------------------------- method hooks


class _Wrapper:
    """An optimizer wrapper like the loss-aware one: delegates, counts steps."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.steps = opt, 0

    def step(self) -> None:
        self.steps += 1
        self.opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["inner"])
        self.steps = state["steps"]


class FakeMethod:
    """Implements the Method hooks of INTERFACES.md without any quantizer."""

    name = "fake"

    def __init__(self) -> None:
        self.after = 0
        self.wrapper: _Wrapper | None = None

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        first = model.net.fc0.weight
        return [
            {"params": [first], "lr": lr * 10},
            {"params": [p for p in model.parameters() if p is not first]},
        ]

    def wrap_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> _Wrapper:
        self.wrapper = _Wrapper(optimizer)
        return self.wrapper

    def after_step(self, model: nn.Module) -> None:
        self.after += 1
        with torch.no_grad():
            model.net.fc0.weight.clamp_(-0.05, 0.05)

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        return {
            "fc0/max_abs": float(model.net.fc0.weight.detach().abs().max()),
            "after_steps": self.after,
        }


def test_method_hooks_are_called_in_order(tmp_path) -> None:
    splits = _tiny()
    method = FakeMethod()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01)
    t = Trainer(
        _mlp(splits), splits, cfg, method=method, run_dir=tmp_path, progress=False, quantize=False
    )
    assert t.optimizer is method.wrapper
    lrs = sorted(g["lr"] for g in t.base_optimizer.param_groups)
    assert lrs[-1] == pytest.approx(0.1) and lrs[0] == pytest.approx(0.01)
    t.fit()
    assert method.after == method.wrapper.steps == 2 * 3  # 96 samples / 32 per step, 2 epochs
    assert float(t.model.net.fc0.weight.detach().abs().max()) <= 0.05 + 1e-7
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["method/after_steps"] for r in recs] == [3, 6]
    assert all(r["method/fc0/max_abs"] <= 0.05 + 1e-7 for r in recs)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'; valid: fp"):
        resolve_method("nope")
    assert resolve_method("fp") is None


# ---------------------------------------------------------------- protocol and outputs


def test_training_learns_and_reports_test_error_at_best_validation_epoch(tmp_path) -> None:
    splits = _tiny()
    t = Trainer(
        _mlp(splits),
        splits,
        TrainConfig(epochs=5, batch_size=16, lr=0.02),
        run_dir=tmp_path,
        progress=False,
    )
    summary = t.fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5]
    best = min(recs, key=lambda r: (r["valid_error"], r["epoch"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["test_error_at_best"] == best["test_error"]
    assert summary["final_test_error"] == recs[-1]["test_error"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["test_error_at_best"] < 20  # learnable synthetic data
    state = load_checkpoint(checkpoint.latest(tmp_path / "checkpoints", "best"))
    assert state["epoch"] == best["epoch"]
    for key in (
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "valid_acc",
        "test_acc",
        "samples_per_s",
        "epoch_seconds",
    ):
        assert key in recs[0]


def test_sequence_task_selects_on_validation_loss(tmp_path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("hello world, " * 200)
    splits = data.load("text", path=str(p), seq_len=12)
    net = models.create(
        "char_lstm", input_shape=splits.input_shape, num_classes=splits.num_classes, hidden=8
    )
    summary = Trainer(
        net, splits, TrainConfig(epochs=2, batch_size=16, lr=0.01), progress=False
    ).fit()
    assert summary["selection"] == "best valid_loss epoch" and "test_loss_at_best" in summary


def test_no_validation_split_uses_the_last_epoch() -> None:
    splits = _tiny(n_valid=0)
    summary = Trainer(
        _mlp(splits), splits, TrainConfig(epochs=2, batch_size=32), progress=False
    ).fit()
    assert summary["best_epoch"] == 2 and summary["selection"].startswith("last epoch")


# ---------------------------------------------------------------- failures


class _NaNAfter(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.input_shape, self.k, self.calls = (1, 6, 6), k, 0
        self.fc = nn.Linear(36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.k:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    splits = _tiny()
    t = Trainer(
        _NaNAfter(4), splits, TrainConfig(epochs=3, batch_size=32), run_dir=tmp_path, progress=False
    )
    with pytest.raises(TrainingDiverged) as err:
        t.fit()
    assert err.value.step == 5 and "at step 5 (epoch 2, batch 2)" in str(err.value)
    assert "epoch-0001.pt" in str(err.value)
    state = load_checkpoint(err.value.checkpoint)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == 5


def _run_two_epochs(tmp_path):
    splits = _tiny()
    Trainer(
        _mlp(splits), splits, TrainConfig(epochs=2, batch_size=32), run_dir=tmp_path, progress=False
    ).fit()
    return tmp_path / "checkpoints"


def test_truncated_or_corrupt_checkpoints_are_refused(tmp_path, capsys) -> None:
    ck = _run_two_epochs(tmp_path)
    path = checkpoint.latest(ck)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    splits = _tiny()
    t = Trainer(
        _mlp(splits), splits, TrainConfig(epochs=3, batch_size=32), run_dir=tmp_path, progress=False
    )
    # resuming refuses the damaged newest checkpoint and goes back to the older one it keeps
    t.fit(resume=True)
    assert "resuming from the older epoch-0001.pt (epoch 1)" in capsys.readouterr().err
    assert t.epoch == 3
    # Without a manifest next to it, a truncated file is still refused (torch cannot read it).
    lone = tmp_path / "lone.pt"
    lone.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(lone)


def test_failed_write_never_replaces_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    ck = _run_two_epochs(tmp_path)
    before = json.loads((ck / "manifest.json").read_text())
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(ck, {"format": 1, "x": torch.zeros(3)}, epoch=3)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert json.loads((ck / "manifest.json").read_text()) == before
    assert load_checkpoint(checkpoint.latest(ck))["epoch"] == 2
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]


def test_old_checkpoints_are_pruned_but_best_is_kept(tmp_path) -> None:
    splits = _tiny()
    Trainer(
        _mlp(splits), splits, TrainConfig(epochs=4, batch_size=32), run_dir=tmp_path, progress=False
    ).fit()
    manifest = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert manifest["history"] == ["epoch-0003.pt", "epoch-0004.pt"]
    assert sorted({*manifest["history"], manifest["best"]["file"]}) == files


# ---------------------------------------------------------------- shapes


def test_shape_mismatch_names_both_shapes() -> None:
    splits = _tiny(shape=(3, 8, 8))
    net = models.create("mlp", widths=(8,))  # built for (1, 28, 28)
    with pytest.raises(ShapeMismatchError) as err:
        Trainer(net, splits, TrainConfig(), progress=False, model_name="mlp")
    assert "(1, 28, 28)" in str(err.value) and "(3, 8, 8)" in str(err.value)
    few = models.create("mlp", input_shape=(3, 8, 8), num_classes=5, widths=(8,))
    with pytest.raises(ShapeMismatchError, match="10 classes"):
        Trainer(few, splits, TrainConfig(), progress=False)
    lstm = models.create("char_lstm", input_shape=(8,), num_classes=10, hidden=4)
    with pytest.raises(ShapeMismatchError, match=r"\(8,\).*\(3, 8, 8\)"):
        Trainer(lstm, splits, TrainConfig(), progress=False)


def test_cuda_device_is_refused_clearly_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    splits = _tiny()
    with pytest.raises(RuntimeError, match="cuda"):
        Trainer(_mlp(splits), splits, TrainConfig(device="cuda"), progress=False)


# ---------------------------------------------------------------- progress


def test_progress_live_bar_and_plain_lines() -> None:
    import io

    from lowbit.train.metrics import Progress

    record = {
        "epoch": 1,
        "train_loss": 0.5,
        "valid_acc": 0.9,
        "samples_per_s": 100.0,
        "epoch_seconds": 2.0,
    }
    live = io.StringIO()
    p = Progress(live=True, stream=live)
    p.start_epoch(1, 3, 10)
    p.update(5, 0.5, 0.9, 500)
    p.end_epoch(record, remaining_epochs=2)
    assert (
        "epoch 1/3" in live.getvalue()
        and "valid acc 90.00%" in live.getvalue()
        and "ETA 00:04" in live.getvalue()
    )
    plain = io.StringIO()
    q = Progress(live=False, stream=plain, log_every=0.0)
    q.start_epoch(1, 3, 10)
    q.update(5, 0.25, 0.5, 500)
    line = plain.getvalue()
    assert "step 5/10" in line and "loss 0.2500" in line and "samples/s" in line and "ETA" in line
    quiet = io.StringIO()
    r = Progress(enabled=False, stream=quiet)
    r.start_epoch(1, 3, 10)
    r.update(5, 0.25, 0.5, 500)
    r.end_epoch(record, 2)
    assert quiet.getvalue() == ""


def test_shift_adamax_optimizer_trains_a_bnn() -> None:
    # BNN's Torch7 protocol: shift-based AdaMax (power-of-two steps) selected by name.
    from lowbit.methods.bnn import ShiftAdaMax

    splits = _tiny()
    torch.manual_seed(0)
    model = models.create(
        "mlp_bnn", input_shape=splits.input_shape, num_classes=splits.num_classes, widths=(32, 32)
    )
    t = Trainer(
        model,
        splits,
        TrainConfig(epochs=8, batch_size=16, lr=2.0**-6, optimizer="shift_adamax"),
        method="bnn",
        progress=False,
    )
    assert isinstance(t.base_optimizer, ShiftAdaMax)
    summary = t.fit()
    assert summary["test_error_at_best"] < 80  # 10 classes: chance is 90 %


def test_adam_is_fused_by_default_and_matches_the_per_tensor_adam() -> None:
    # PyTorch's own per-tensor Adam is the reference: the fused kernel differs by rounding only.
    # (Compared on identical gradients: through training, biases in front of a BatchNorm get
    # gradients of pure rounding noise, which Adam normalises to +-lr, so whole runs diverge.)
    splits = _tiny()
    g = torch.Generator().manual_seed(1)
    nets, trainers = [], []
    for fused in (None, False):
        net = _mlp(splits)
        t = Trainer(net, splits, TrainConfig(lr=0.01, fused=fused), progress=False)
        assert t.base_optimizer.defaults["fused"] is (fused is None)
        nets.append(net)
        trainers.append(t)
    shapes = [p.shape for p in nets[0].parameters()]
    for _ in range(3):
        grads = [
            torch.randn(s, generator=g) * 10 ** torch.empty(s).uniform_(-6, 0, generator=g)
            for s in shapes
        ]
        for net, t in zip(nets, trainers, strict=True):
            for p, gr in zip(net.parameters(), grads, strict=True):
                p.grad = gr.clone()
            t.base_optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_python_trainer_run_is_a_run_the_cli_can_use(tmp_path) -> None:
    """Without run_info the Trainer still records what rebuilds the run: the data.load call
    (not the resolved file paths in the splits' info), the lowbit.models architecture and the
    method table in the CLI's flat form, so lowbit eval / pack / summary work on it."""
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.train.runs import _method_parts

    splits = data.load("synthetic", n_train=96, n_valid=32, n_test=32, shape=(1, 6, 6))
    net = models.create(
        "mlp", input_shape=splits.input_shape, num_classes=splits.num_classes, widths=[16, 16]
    )
    run = tmp_path / "run"
    cfg = TrainConfig(epochs=1, batch_size=32)
    Trainer(
        net,
        splits,
        cfg,
        method="twn",
        method_options={"rule": "exact"},
        run_dir=run,
        progress=False,
    ).fit()
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"] == {
        "name": "mlp",
        "input_shape": [1, 6, 6],
        "num_classes": 10,
        "widths": [16, 16],
    }
    assert stored["data"] == {
        "name": "synthetic", "split": "paper", "preprocess": "unit",
        "n_train": 96, "n_valid": 32, "n_test": 32, "shape": [1, 6, 6],
    }  # fmt: skip
    assert stored["method"] == {"name": "twn", "rule": "exact"}
    runner = CliRunner()
    for args in (
        ["eval", str(run)],
        ["pack", str(run), "-o", str(tmp_path / "m.lowbit")],
        ["summary", str(run)],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    # the nested form older Trainer runs wrote still reads
    assert _method_parts({"name": "twn", "options": {"rule": "exact"}}) == (
        "twn",
        {"rule": "exact"},
    )
