"""The ``--device cuda`` paths: every method trains on a GPU and agrees with the CPU.

These tests skip on machines without CUDA (CI has none); they were run on an H100 through the
device tool (see docs/results.md). References are the same computation on the CPU, in float64
where the GPU's float32 order of summation would otherwise decide the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import data, methods, models
from lowbit.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fgq is post-training (lowbit.ptq), fp is the float baseline: both are still checked below.
TRAINABLE = methods.available()


@pytest.fixture(autouse=True)
def _exact_cuda_matmul():
    # TF32 would make the GPU disagree with the CPU by ~1e-3 for reasons that are not ours.
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _splits(shape=(1, 8, 8), **kw) -> data.DataSplits:
    return data.synthetic.load(n_train=128, n_valid=32, n_test=32, shape=shape, **kw)


def _mlp(splits: data.DataSplits, name: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    # no dropout: the CPU and the GPU draw different masks
    extra = {"dropout": 0.0, "dropout_in": 0.0} if name == "mlp_bnn" else {}
    return models.create(
        name,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        widths=(32, 32),
        **extra,
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float, atol: float):
    diff = (actual.cpu() - expected).abs().max().item() if expected.numel() else 0.0
    assert torch.allclose(actual.cpu(), expected, rtol=rtol, atol=atol), (
        f"{name}: max |diff| {diff}"
    )


def _convnet(splits: data.DataSplits) -> nn.Module:
    torch.manual_seed(0)
    return models.create("lenet5", input_shape=splits.input_shape, num_classes=splits.num_classes)


@pytest.mark.parametrize("method", TRAINABLE)
@pytest.mark.parametrize("arch", ["mlp", "lenet5"])
def test_forward_and_backward_on_cuda_match_cpu(method: str, arch: str) -> None:
    splits = _splits(shape=(1, 28, 28)) if arch == "lenet5" else _splits()
    # binary activations belong behind BN + Hardtanh (mlp_bnn), not behind a ReLU
    mlp_name = "mlp_bnn" if method in ("bnn", "qnn") else "mlp"
    net = _convnet(splits) if arch == "lenet5" else _mlp(splits, mlp_name)
    lowbit.quantize(net, method, keep=("first", "last"))
    net.train()
    cpu = copy.deepcopy(net).double()
    gpu = copy.deepcopy(net).double().cuda()
    x = splits.train.x[:16].double()
    y = splits.train.y[:16]
    out_cpu = cpu(x)
    out_gpu = gpu(x.cuda())
    assert out_gpu.device.type == "cuda"
    _close(out_gpu, out_cpu, "output", rtol=1e-9, atol=1e-9)
    nn.functional.cross_entropy(out_cpu, y).backward()
    nn.functional.cross_entropy(out_gpu, y.cuda()).backward()
    for (name, p_cpu), (_, p_gpu) in zip(
        cpu.named_parameters(), gpu.named_parameters(), strict=True
    ):
        assert p_gpu.device.type == "cuda", name
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        _close(p_gpu.grad, p_cpu.grad, name, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["fp", "ttq", "bnn", "qnn", "lab", "lat2", "laq", "twn"])
def test_trainer_on_cuda_trains_and_keeps_every_tensor_on_the_gpu(method: str, tmp_path) -> None:
    splits = _splits()
    net = _mlp(splits)
    cfg = TrainConfig(device="cuda", epochs=2, batch_size=32, lr=0.01, seed=0)
    tr = Trainer(net, splits, cfg, method=method, progress=False, run_dir=tmp_path)
    summary = tr.fit()
    assert all(p.device.type == "cuda" for p in net.parameters())
    for state in tr.optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                assert v.device.type == "cuda"
    assert summary["status"] == "finished"
    assert 0.0 <= summary["test_error_at_best"] <= 100.0
    # the trained model packs (packing is a CPU operation) and the packed model runs on the CPU
    if method in ("ttq", "lab", "lat2", "laq", "twn", "bnn", "qnn"):
        net.eval()
        sim = copy.deepcopy(net).cpu()
        packed = lowbit.pack(copy.deepcopy(net), activations="float")
        x = splits.test.x
        assert (packed(x).argmax(1) == sim(x).argmax(1)).float().mean() >= 0.9


def test_cuda_resume_continues_the_same_run(tmp_path) -> None:
    splits = _splits()

    def trainer(run_dir):
        cfg = TrainConfig(device="cuda", epochs=3, batch_size=32, lr=0.01, seed=0)
        return Trainer(_mlp(splits), splits, cfg, method="lat2", progress=False, run_dir=run_dir)

    straight = trainer(tmp_path / "a")
    straight.fit()
    trainer(tmp_path / "b").fit(stop_after_epochs=2)
    resumed = trainer(tmp_path / "b")
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert b.device.type == "cuda", name
        if not a.is_floating_point():
            continue  # counters (a quantizer's number of solves) may count the resume's re-solve
        _close(b.float(), a.float().cpu(), name, rtol=1e-5, atol=1e-5)


def test_cli_train_device_cuda(tmp_path) -> None:
    from typer.testing import CliRunner

    from lowbit.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train", "--model", "mlp", "--dataset", "synthetic", "--method", "lat2",
            "--epochs", "1", "--batch-size", "32", "--device", "cuda", "--run-dir", str(run),
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run / "metrics.jsonl").exists()
