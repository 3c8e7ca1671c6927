"""DDP under torchrun: 2 gloo processes on CPU train the same weights as one process on the
same global batches; only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowbit import data, models
from lowbit.train import TrainConfig, Trainer, load_checkpoint
from lowbit.train.checkpoint import latest

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lowbit import data, models
    from lowbit.train import Trainer, TrainConfig
    torch.manual_seed(0)
    s = data.synthetic.load(n_train=128, n_valid=32, n_test=32, shape=(1, 6, 6))
    net = models.create("mlp", input_shape=s.input_shape, num_classes=10, widths=(16,), batchnorm=False)
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, seed=1)
    t = Trainer(net, s, cfg, run_dir=sys.argv[1], progress=False)
    assert t.dist.world_size == 2, t.dist
    t.fit()
    if t.dist.rank == 1:
        torch.save(t.model.state_dict(), sys.argv[1] + "-rank1.pt")
    """
)


@pytest.mark.ddp
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(run),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    torch.manual_seed(0)
    s = data.synthetic.load(n_train=128, n_valid=32, n_test=32, shape=(1, 6, 6))
    net = models.create(
        "mlp", input_shape=s.input_shape, num_classes=10, widths=(16,), batchnorm=False
    )
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, seed=1)
    single = Trainer(net, s, cfg, progress=False)
    single.fit()

    ddp_weights = load_checkpoint(latest(run / "checkpoints"))["model"]
    rank1 = torch.load(str(run) + "-rank1.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        # DDP averages two half-batch gradients: equal to the full-batch mean up to float rounding.
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(ddp_weights[k], rank1[k])  # ranks stay in lockstep
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone logs
    cfg_json = json.loads((run / "config.json").read_text())
    assert cfg_json["world_size"] == 2
    last = json.loads(lines[-1])
    assert last["valid_acc"] == pytest.approx(single.evaluate("valid")["acc"])
