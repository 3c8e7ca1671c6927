"""The loss-aware optimizer wrapper: Adam step, clip to [-1, 1], re-solve w_hat with d = sqrt(v) + 1e-8.

The reference for the step is a hand-written Adam (the formulas of Kingma & Ba / torch.optim.Adam),
not the wrapper's own code path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.methods import loss_aware as la
from lowbit.optim import LossAwareOptimizer, prox_targets


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (and, on a loaded
    # 2-core machine, waiting). Restore the session's setting afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _hand_adam(
    w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float
):
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w, m, v


@pytest.mark.parametrize(
    "method,opts,scheme",
    [
        ("lat", {"solver": "exact"}, "lat_e"),
        ("lat", {}, "lat_a"),
        ("laq", {"levels": "log"}, "laq_log"),
        ("lat2", {}, "lat2_a"),
    ],
)
def test_step_matches_hand_run_adam_then_prox(method: str, opts: dict, scheme: str) -> None:
    model = lowbit.quantize(_net(), method, keep=(), **opts)
    layer = model[0]
    lr = 1.0  # large enough that some latents leave [-1, 1] before the clip
    opt = lowbit.methods.get(method).wrap_optimizer(
        model, torch.optim.Adam(model.parameters(), lr=lr)
    )
    assert isinstance(opt, LossAwareOptimizer)
    x, y = _batch()
    w = layer.weight.detach().clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t in (1, 2, 3):
        opt.zero_grad()
        # the forward weight is w_hat of the current latent (step 0: unweighted, TWN start)
        prev_codes = layer.weight_quantizer.export(layer.weight).codes.clone()
        nn.functional.cross_entropy(model(x), y).backward()
        g = layer.weight.grad.detach().double()
        w, m, v = _hand_adam(w, g, m, v, t, lr)
        unclipped = w.clone()
        w = w.clamp(-1, 1)
        opt.step()
        torch.testing.assert_close(layer.weight.detach().double(), w, rtol=1e-5, atol=1e-6)
        assert float(layer.weight.detach().abs().max()) <= 1.0
        if t == 1:
            assert float(unclipped.abs().max()) > 1.0  # the clip was exercised
        d = v.sqrt() + 1e-8
        torch.testing.assert_close(
            layer.weight_quantizer.curvature.double(), d, rtol=1e-5, atol=1e-9
        )
        # w_hat solved from the stored curvature (checked against the hand-run d just above)
        expect, codes, _ = la.solve(
            layer.weight.detach(), layer.weight_quantizer.curvature, scheme, prev_codes=prev_codes
        )
        got = layer.weight_quantizer(layer.weight).detach()
        assert torch.equal(layer.weight_quantizer.codes, codes)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
        # and export() is that same w_hat, bit for bit
        assert torch.equal(layer.quantized_weight().dequantize(), got)


def test_gradient_flows_straight_through_to_latents() -> None:
    model = lowbit.quantize(_net(), "laq", keep=(), bits=3)
    x, y = _batch()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # The same loss with the quantized weights as plain leaf tensors.
    w0 = model[0].weight_quantizer(model[0].weight).detach().requires_grad_(True)
    w2 = model[2].weight_quantizer(model[2].weight).detach().requires_grad_(True)
    out = nn.functional.linear(
        torch.relu(nn.functional.linear(x, w0, model[0].bias)), w2, model[2].bias
    )
    nn.functional.cross_entropy(out, y).backward()
    assert torch.equal(model[0].weight.grad, w0.grad)
    assert torch.equal(model[2].weight.grad, w2.grad)
    assert float(model[0].weight.grad.abs().sum()) > 0


class _CharNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 4, batch_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def test_lstm_eight_gate_blocks_each_with_own_scale_and_curvature() -> None:
    torch.manual_seed(0)
    model = lowbit.quantize(_CharNet(), "lat", keep=("last",), solver="exact")
    targets = prox_targets(model)
    assert len(targets) == 8
    opt = LossAwareOptimizer.from_model(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    x = torch.randn(3, 7, 5)
    y = torch.randint(0, 5, (3, 7))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
        opt.step()
    lstm = model.lstm
    h = lstm.hidden_size
    alphas = set()
    for key in ("ih_l0", "hh_l0"):
        p = getattr(lstm, f"weight_{key}")
        v = opt.state[p]["exp_avg_sq"]
        for j, q in enumerate(lstm.weight_quantizer[key]):
            rows = slice(j * h, (j + 1) * h)
            assert torch.equal(q.curvature, v[rows].sqrt() + 1e-8)
            expect = la.solve(p.detach()[rows], q.curvature, "lat_e")[0]
            assert torch.equal(q(p[rows]).detach(), expect)
            alphas.add(round(float(q.scales), 7))
    assert len(alphas) == 8
    assert float(lstm.weight_ih_l0.detach().abs().max()) <= 1.0
    qw = lstm.quantized_weights()
    assert len(qw) == 8 and all(q.format == "ternary" for q in qw.values())


def _blobs(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 10, generator=g) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 10, generator=g), y


@pytest.mark.parametrize(
    "method,opts", [("lab", {}), ("lat2", {}), ("laq", {"bits": 3}), ("lat", {"solver": "exact"})]
)
def test_tiny_synthetic_run_loss_decreases(method: str, opts: dict) -> None:
    torch.manual_seed(0)
    model = lowbit.quantize(
        nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)), method, keep=(), **opts
    )
    opt = lowbit.methods.get(method).wrap_optimizer(
        model, torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    x, y = _blobs()
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(model(x), y))
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    assert float(nn.functional.cross_entropy(out, y)) < 0.5 * first
    assert float((out.argmax(1) == y).float().mean()) > 0.9


def test_lr_scheduler_and_state_dict_work_through_the_wrapper() -> None:
    model = lowbit.quantize(_net(), "lab", keep=())
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = LossAwareOptimizer.from_model(model, base)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(1e-3)
    sd = opt.state_dict()
    assert "exp_avg_sq" in sd["state"][0]
    # A reloaded model (weights + quantizer buffers) forwards with the same w_hat.
    clone = lowbit.quantize(_net(5), "lab", keep=())
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_optimizer_without_second_moment_keeps_its_own() -> None:
    model = lowbit.quantize(_net(), "lat", keep=(), solver="exact")
    opt = LossAwareOptimizer.from_model(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = model[0].weight.grad.clone()
    opt.step()
    v = opt.state[model[0].weight]["lowbit_exp_avg_sq"]
    torch.testing.assert_close(v, 0.001 * g * g)
    torch.testing.assert_close(model[0].weight_quantizer.curvature, v.sqrt() + 1e-8)


def test_wrapper_errors_and_skips() -> None:
    model = lowbit.quantize(_net(), "lat2", keep=())
    with pytest.raises(ValueError, match="does not hold the latent weights"):
        LossAwareOptimizer.from_model(model, torch.optim.Adam(model[2].parameters()))
    with pytest.raises(ValueError, match="no loss-aware quantized weights"):
        LossAwareOptimizer.from_model(_net(), torch.optim.Adam(_net().parameters()))
    # a layer without a gradient this step keeps its solution and its latent weight
    opt = LossAwareOptimizer.from_model(model, torch.optim.Adam(model.parameters(), lr=0.1))
    before = model[0].weight.detach().clone(), model[0].weight_quantizer.solves.clone()
    model[2].weight.grad = torch.ones_like(model[2].weight)
    opt.step()
    assert torch.equal(model[0].weight.detach(), before[0])
    assert torch.equal(model[0].weight_quantizer.solves, before[1])
    assert int(model[2].weight_quantizer.solves) >= 1


def test_unwrapped_training_warns_once() -> None:
    model = lowbit.quantize(_net(), "lat", keep=())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = _batch()
    model(x)
    with pytest.warns(UserWarning, match="wrap_optimizer"):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            model(x)


def test_trainer_runs_a_loss_aware_method_end_to_end(tmp_path) -> None:
    from lowbit import data, models
    from lowbit.train import TrainConfig, Trainer

    splits = data.load("synthetic", n_train=200, n_valid=50, n_test=50, shape=(1, 8, 8), classes=4)
    torch.manual_seed(0)
    net = models.create("mlp", input_shape=(1, 8, 8), num_classes=4, widths=(16,))
    cfg = TrainConfig(epochs=2, batch_size=50, lr=1e-2, threads=1)
    trainer = Trainer(
        net,
        splits,
        cfg,
        method="lat2",
        method_options={"keep": []},
        run_dir=tmp_path,
        progress=False,
    )
    assert isinstance(trainer.optimizer, LossAwareOptimizer)
    trainer.fit()
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == 2 and '"method/net.fc0.alpha_p"' in records[-1]
    fc0 = trainer.model.net.fc0
    assert float(fc0.weight.detach().abs().max()) <= 1.0
    assert fc0.quantized_weight().format == "ternary_asym"
    assert torch.equal(
        fc0.quantized_weight().dequantize(), fc0.weight_quantizer(fc0.weight).detach()
    )
    # a fresh quantized model loading the trained state forwards identically (same w_hat)
    clone = lowbit.quantize(
        models.create("mlp", input_shape=(1, 8, 8), num_classes=4, widths=(16,)), "lat2", keep=[]
    )
    clone.load_state_dict(trainer.model.state_dict())
    clone.eval()
    trainer.model.eval()
    x = splits.test.x[:20]
    with torch.no_grad():
        assert torch.equal(clone(x), trainer.model(x))
