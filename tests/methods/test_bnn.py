"""BNN / QNN (lowbit.methods.bnn): STEs, clipping, binary activations, bit-planes, Glorot, SBN, AdaMax.

Every expected value is computed independently of the code under test: hand-derived gates and
finite differences, int64 dot products, hand-worked batch-norm cases, a plain re-implementation
of the shift arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import methods
from lowbit.methods import bnn
from lowbit.nn import QuantLinear, QuantModule
from lowbit.qtypes import ActSpec
from lowbit.train.losses import squared_hinge


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Tiny ops on a shared 2-core machine: one intra-op thread avoids spin-wait contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(
    widths: tuple[int, ...] = (32, 32), d_in: int = 12, classes: int = 4, dropout: float = 0.0
) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan = d_in
    for w in widths:
        layers += [nn.Linear(fan, w), nn.BatchNorm1d(w), nn.Hardtanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        fan = w
    layers += [nn.Linear(fan, classes), nn.BatchNorm1d(classes)]
    return nn.Sequential(*layers)


def _capture_layer_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """What each Linear/Conv layer computes with: the output of its input quantizer, else its raw input."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name: str, quantized: bool):  # noqa: ANN202
        def fn(
            mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor | None = None
        ) -> None:
            seen.setdefault(name, []).append((out if quantized else args[0]).detach().clone())

        return fn

    for name, m in model.named_modules():
        if isinstance(m, QuantModule) and m.input_quantizer is not None:
            m.input_quantizer.register_forward_hook(hook(name, True))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QuantModule):
            m.register_forward_pre_hook(hook(name, False))
    return seen


# ----------------------------------------------------------------------------------------------
# STE gradients


def test_activation_ste_is_htanh_gate_and_matches_finite_differences() -> None:
    torch.manual_seed(0)
    x = torch.rand(4000, dtype=torch.float64) * 4 - 2
    x = x[(x.abs() - 1).abs() > 1e-3]  # finite differences are undefined at the kinks
    x.requires_grad_(True)
    g = torch.randn_like(x)
    q = bnn.SignInput()
    out = q(x)
    assert set(out.detach().unique().tolist()) == {-1.0, 1.0}
    (out * g).sum().backward()
    hand = g * (x.detach().abs() <= 1).to(x.dtype)  # BNN eq. 4-5: g * 1{|x| <= 1}
    assert torch.equal(x.grad, hand)
    h = 1e-6
    xd = x.detach()
    fd = (torch.nn.functional.hardtanh(xd + h) - torch.nn.functional.hardtanh(xd - h)) / (2 * h)
    torch.testing.assert_close(x.grad, g * fd, rtol=0, atol=1e-8)


def test_identity_ste_option_passes_gradient_everywhere() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    bnn.SignInput(ste="identity")(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_weight_ste_is_identity_to_latent_weight() -> None:
    torch.manual_seed(1)
    w = (torch.rand(6, 9, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    x = torch.randn(5, 9, dtype=torch.float64)
    wq = bnn.BinaryWeight()
    loss = torch.tanh(x @ wq(w).T).pow(2).sum()
    loss.backward()
    # Same loss on a leaf holding the binary weight: its gradient must reach w unchanged.
    wb = torch.where(w.detach() < 0, -1.0, 1.0).to(torch.float64).requires_grad_(True)
    torch.tanh(x @ wb.T).pow(2).sum().backward()
    assert torch.equal(w.grad, wb.grad)


def test_kbit_activation_ste_matches_finite_differences_of_clip() -> None:
    torch.manual_seed(2)
    x = torch.rand(3000, dtype=torch.float64) * 3 - 1.5
    x = x[(x.abs() - 1).abs() > 1e-3].requires_grad_(True)
    q = lowbit.methods.get("qnn").make_input_quantizer(
        None, **lowbit.methods.get("qnn").resolve_options()
    )
    y = q(x)
    codes = y.detach() * 7  # int4 narrow grid in [-1, 1]: k / 7, |k| <= 7
    assert (
        torch.allclose(codes, codes.round(), rtol=0, atol=1e-12) and codes.abs().max() <= 7 + 1e-12
    )
    assert (y.detach() - x.detach().clamp(-1, 1)).abs().max() <= 1 / 14 + 1e-12
    g = torch.randn_like(y)
    (y * g).sum().backward()
    h = 1e-6
    fd = (x.detach().add(h).clamp(-1, 1) - x.detach().sub(h).clamp(-1, 1)) / (2 * h)
    torch.testing.assert_close(x.grad, g * fd, rtol=0, atol=1e-8)


def test_log_activations_are_powers_of_two() -> None:
    q = lowbit.methods.get("qnn").make_input_quantizer(
        None, **lowbit.methods.get("qnn").resolve_options({"activations": "log4"})
    )
    x = torch.tensor([0.0, 0.004, 0.2, 0.3, -0.55, 0.9, 1.7])
    y = q(x)
    # levels {0, ±2^-6, ..., ±1}; arithmetic midpoints between neighbours decide
    assert y.tolist() == [0.0, 0.0, 0.25, 0.25, -0.5, 1.0, 1.0]
    assert q.spec() == ActSpec("kbit_log", 4, True, scale=1.0, clip=1.0)


def test_sign_zero_and_nan_are_plus_one() -> None:
    x = torch.tensor([0.0, -0.0, 5.0, -1e-30, 1e-30])
    assert bnn.SignInput()(x).tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    assert bnn.BinaryWeight()(x.reshape(1, -1)).tolist() == [[1.0, 1.0, 1.0, -1.0, 1.0]]
    x[2] = float("nan")  # the exported codes (what packing and kernels see) send NaN to +1
    codes = bnn.BinaryWeight().export(x.reshape(1, -1)).codes
    assert codes.tolist() == [[1, 1, 1, -1, 1]]


# ----------------------------------------------------------------------------------------------
# Stochastic binarization


@pytest.mark.parametrize("which", ["activation", "weight"])
def test_stochastic_binarization_frequency_matches_hard_sigmoid(which: str) -> None:
    xs = [-1.5, -1.0, -0.6, -0.2, 0.0, 0.3, 0.9, 1.0, 1.2]
    n = 100_000
    x = torch.tensor(xs).repeat_interleave(n).reshape(len(xs), n)
    torch.manual_seed(3)
    q = (
        bnn.SignInput(stochastic=True)
        if which == "activation"
        else bnn.BinaryWeight(stochastic=True)
    )
    q.train()
    b = q(x)
    assert set(b.unique().tolist()) <= {-1.0, 1.0}
    freq = (b > 0).double().mean(1)
    for value, f in zip(xs, freq.tolist(), strict=True):
        p = min(max((value + 1) / 2, 0.0), 1.0)  # hard_sigmoid
        bound = 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma; p in {0, 1} must be exact
        assert abs(f - p) <= bound, (value, f, p)
    q.eval()  # inference is the deterministic sign
    assert torch.equal(q(x), torch.where(x < 0, -1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Clipping, LR groups, training hooks


def _train_steps(
    model: nn.Module, method: str, steps: int, lr: float, hook: str = "after_step", seed: int = 0
) -> list[float]:
    m = methods.get(method)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 12, generator=g)
    y = x[:, :4].argmax(1)
    groups = m.param_groups(model, lr)
    opt = torch.optim.Adam(groups if groups is not None else model.parameters(), lr=lr)
    if hook == "post_hook":
        bnn.clip_after_step(opt, model)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 256, (64,), generator=g)
        loss = squared_hinge(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hook == "after_step":
            m.after_step(model)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    ("method", "hook"),
    [("bnn", "after_step"), ("bnn", "post_hook"), ("qnn", "after_step"), ("bnn", "none")],
)
def test_latent_weights_stay_clipped_after_every_step(method: str, hook: str) -> None:
    torch.manual_seed(4)
    model = lowbit.quantize(_mlp(), method, keep=(), init="uniform")
    _train_steps(model, method, 20, lr=0.05, hook=hook)
    latents = list(bnn.latent_weights(model))
    assert len(latents) == 3
    worst = max(float(w.detach().abs().max()) for _, w, _ in latents)
    if hook == "none":  # the check can fail: without the hook, Glorot-scaled Adam leaves [-1, 1]
        assert worst > 1.0
    else:
        assert worst <= 1.0
        assert methods.get(method).epoch_metrics(model)[f"{method}/saturated"] > 0


def test_lstm_gate_blocks_are_clipped_and_glorot_scaled() -> None:
    torch.manual_seed(5)
    model = lowbit.quantize(nn.Sequential(nn.LSTM(6, 5), nn.Linear(5, 2)), "bnn", keep=("last",))
    with torch.no_grad():
        model[0].weight_ih_l0.mul_(10)
    names = [n for n, _, _ in bnn.latent_weights(model)]
    assert names == [f"0.weight_{k}_l0.{g}" for k in ("ih", "hh") for g in "ifgo"]
    methods.get("bnn").after_step(model)
    assert model[0].weight_ih_l0.abs().max() <= 1
    groups = {gr["name"]: gr["lr_scale"] for gr in methods.get("bnn").param_groups(model, 1.0)}
    assert groups["0.weight_ih_l0"] == pytest.approx(1 / math.sqrt(1.5 / (6 + 5)))
    assert groups["0.weight_hh_l0"] == pytest.approx(1 / math.sqrt(1.5 / (5 + 5)))


def test_glorot_scales_match_hand_computation() -> None:
    # papers.md §2.3 examples: 784->4096 57.0, 4096->4096 73.9, 4096->10 52.3, 3x3 128->128 39.2,
    # first conv 3->128 28.0, FC 8192->1024 78.4, 1024->10 26.3
    cases = [
        ((4096, 784), 57.0),
        ((4096, 4096), 73.9),
        ((10, 4096), 52.3),
        ((128, 128, 3, 3), 39.2),
        ((128, 3, 3, 3), 28.0),
        ((1024, 8192), 78.4),
        ((10, 1024), 26.3),
    ]
    for shape, expected in cases:
        assert round(bnn.glorot_lr_scale(*bnn.fans(shape)), 1) == expected, shape
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.Linear(20, 10)
    )
    model = lowbit.quantize(net, "bnn", keep=())
    groups = methods.get("bnn").param_groups(model, 0.01)
    by_name = {g["name"]: g for g in groups}
    hand = {
        "0.weight": math.sqrt((27 + 72) / 1.5),
        "2.weight": math.sqrt((128 + 20) / 1.5),
        "3.weight": math.sqrt(30 / 1.5),
    }
    for name, gamma in hand.items():
        assert by_name[name]["lr"] == pytest.approx(0.01 * gamma, rel=1e-12)
    assert by_name["other"]["lr"] == 0.01
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = lowbit.quantize(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "bnn", keep=(), lr_scale=None
    )
    (only,) = methods.get("bnn").param_groups(plain, 0.01)
    assert only["params"] == [p for p in plain.parameters() if p.requires_grad]


def test_uniform_init_option() -> None:
    torch.manual_seed(6)
    model = lowbit.quantize(_mlp((256, 256), d_in=256), "bnn", init="uniform")
    w = model[3].weight.detach()
    assert w.abs().max() <= 1 and abs(float(w.abs().mean()) - 0.5) < 0.01  # U(-1,1): E|w| = 1/2
    kept = _mlp((256,), d_in=64)
    before = kept[3].weight.detach().clone()
    lowbit.quantize(kept, "bnn", keep=("first",))
    assert isinstance(kept[3], QuantLinear) and torch.equal(kept[3].weight.detach(), before)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="act_ste"):
        lowbit.quantize(_mlp(), "bnn", act_ste="tanh")
    with pytest.raises(ValueError, match="weight_format"):
        lowbit.quantize(_mlp(), "qnn", weight_format="cubic")
    with pytest.raises(ValueError, match="init"):
        lowbit.quantize(_mlp(), "bnn", init="normal")


# ----------------------------------------------------------------------------------------------
# Where activations are binary


def test_default_rules_float_first_layer_real_inputs_hidden_layers_binary() -> None:
    torch.manual_seed(7)
    model = lowbit.quantize(_mlp((16, 16, 16)), "bnn")
    seen = _capture_layer_inputs(model)
    x = torch.randn(32, 12)
    model.train()
    model(x)
    model.eval()
    model(x)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], QuantModule)
    assert all(torch.equal(t, x) for t in seen["0"])  # the float first layer sees the real input
    for name in ("3", "6"):  # hidden binary layers
        for t in seen[name]:
            assert set(t.unique().tolist()) == {-1.0, 1.0}
    assert isinstance(model[9], nn.Linear) and not isinstance(model[9], QuantModule)


def test_keep_nothing_binarizes_every_layer_input_including_the_first() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    model = lowbit.quantize(net, "bnn", keep=())
    seen = _capture_layer_inputs(model)
    model(torch.rand(4, 3, 8, 8) * 2 - 1)
    assert set(seen) == {"0", "3", "8"}
    for name in seen:
        assert set(seen[name][0].unique().tolist()) == {-1.0, 1.0}, name
    first = lowbit.quantize(_mlp(), "bnn", keep=(), overrides={"0": {"activations": "uint8"}})
    assert first[0].input_quantizer.spec() == ActSpec(
        "kbit_linear", 8, False, scale=1 / 255, clip=1.0
    )


def test_dropout_option_gives_sign_then_dropout_values() -> None:
    torch.manual_seed(19)
    p = 0.5
    h = torch.nn.functional.hardtanh(torch.randn(2000, 64) * 2)
    drop = nn.Dropout(p).train()
    dropped = drop(h)
    q = bnn.SignInput(ste="identity", dropout=p).train()
    out = q(dropped)
    # Theano order: sign first, then dropout with its 1/(1-p) rescaling
    expected = torch.where(h < 0, -1.0, 1.0) * (dropped != 0).float() / (1 - p)
    assert torch.equal(out, expected)
    # the training mean matches the eval input (what BN running statistics rely on)
    q.eval()
    assert torch.equal(q(h), torch.where(h < 0, -1.0, 1.0))
    assert (out.mean(0) - q(h).mean(0)).abs().max() < 5 * 1 / math.sqrt(2000)
    plain = bnn.SignInput().train()(torch.tensor([0.0, 0.7, -1.4]))
    assert plain.tolist() == [1.0, 1.0, -1.0]  # without the option, sign(0) = +1
    with pytest.raises(ValueError, match="dropout"):
        bnn.SignInput(dropout=1.0)


@pytest.mark.parametrize("ste", ["htanh", "identity"])
def test_dropout_option_gradient_is_sign_then_dropouts(ste: str) -> None:
    # Theano's binary_tanh then dropout: out = Sign(z) * mask / (1-p), so by hand
    # dL/dz = g * gate(z) * mask / (1-p), with gate(z) = 1{|z| <= 1} (htanh) or 1 (identity).
    # Reached through nn.Dropout's own backward (x = z * mask / (1-p)), as in a model.
    p = 0.5
    z = torch.tensor([0.3, 0.7, -0.9, 1.5, -0.2, 0.6], requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    x = z * mask / (1 - p)
    g = torch.tensor([1.0, 2.0, -1.0, 1.0, 3.0, 0.5])
    out = bnn.SignInput(ste=ste, dropout=p).train()(x)
    (out * g).sum().backward()
    gate = (z.detach().abs() <= 1).float() if ste == "htanh" else torch.ones(6)
    assert out.tolist() == (torch.where(z < 0, -1.0, 1.0) * mask / (1 - p)).tolist()
    assert torch.equal(z.grad, g * gate * mask / (1 - p))


# ----------------------------------------------------------------------------------------------
# Bit-plane identity for 8-bit first-layer inputs (QNN §2.5)


def test_bitplane_identity_is_exact_for_uint8_inputs() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (16, 1024), generator=g, dtype=torch.int64).to(torch.uint8)
    x[0] = 255
    x[1] = 0
    w = torch.where(torch.rand(24, 1024, generator=g) < 0.5, -1, 1).to(torch.int8)
    ref = x.to(torch.int64) @ w.to(torch.int64).T
    assert torch.equal(bnn.bitplane_linear(x, w, bits=8), ref)
    planes = bnn.bitplanes(x, 8)
    assert set(planes.unique().tolist()) == {0, 1}
    assert torch.equal((planes * (2 ** torch.arange(8)).reshape(8, 1, 1)).sum(0), x.to(torch.int64))


def test_bitplane_identity_is_exact_for_signed_int8_inputs() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randint(-128, 128, (8, 512), generator=g, dtype=torch.int64).to(torch.int8)
    x[0] = -128
    w = torch.where(torch.rand(5, 512, generator=g) < 0.5, -1, 1).to(torch.int8)
    ref = x.to(torch.int64) @ w.to(torch.int64).T
    assert torch.equal(bnn.bitplane_linear(x, w, bits=8, signed=True), ref)
    with pytest.raises(TypeError):
        bnn.bitplanes(torch.zeros(3), 8)


@pytest.mark.parametrize(("bits", "signed"), [(1, False), (3, False), (4, True), (6, True)])
def test_bitplane_identity_other_widths(bits: int, signed: bool) -> None:
    g = torch.Generator().manual_seed(100 + bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    x = torch.randint(lo, hi, (6, 300), generator=g, dtype=torch.int64)
    w = torch.where(torch.rand(7, 300, generator=g) < 0.5, -1, 1).to(torch.int8)
    assert torch.equal(bnn.bitplane_linear(x, w, bits=bits, signed=signed), x @ w.to(torch.int64).T)


# ----------------------------------------------------------------------------------------------
# Shift-based batch norm and AdaMax (QNN §2.4)


def test_shift_batchnorm_hand_computed_case() -> None:
    sbn = bnn.ShiftBatchNorm(1, eps=1e-12)
    with torch.no_grad():
        sbn.weight.fill_(3.0)
        sbn.bias.fill_(0.5)
    x = torch.tensor([[0.0], [1.0], [2.0], [5.0]])
    # mean 2; C = [-2, -1, 0, 3]; AP2(C) = [-2, -1, 0, 4]; var = (4 + 1 + 0 + 12) / 4 = 4.25;
    # 1/sqrt(4.25) = 0.485 -> AP2 = 0.5; xhat = [-1, -0.5, 0, 1.5]; AP2(3) = 4 -> y = 4 xhat + 0.5
    y = sbn(x)
    assert y.squeeze(1).tolist() == [-3.5, -1.5, 0.5, 6.5]
    assert sbn.running_mean.item() == pytest.approx(0.2)
    assert sbn.running_var.item() == pytest.approx(0.9 + 0.1 * 4.25)
    sbn.eval()
    # eval: C = x - 0.2, var = 1.325 -> 1/sqrt = 0.869 -> AP2 = 1; y = 4 (x - 0.2) + 0.5
    torch.testing.assert_close(sbn(x).squeeze(1), 4 * (x.squeeze(1) - 0.2) + 0.5)


def test_shift_batchnorm_within_ap2_bound_of_float_batchnorm() -> None:
    torch.manual_seed(11)
    x = (
        torch.randn(64, 6, 5, 5, dtype=torch.float64)
        * torch.tensor([0.1, 1, 3, 7, 0.3, 20], dtype=torch.float64).reshape(1, 6, 1, 1)
        + 2
    )
    gamma = torch.tensor([0.3, 1.0, 1.7, 2.5, 0.05, 6.0], dtype=torch.float64)
    beta = torch.linspace(-1, 1, 6, dtype=torch.float64)
    sbn = bnn.ShiftBatchNorm(6).double()
    bn = nn.BatchNorm2d(6, eps=1e-4).double()
    with torch.no_grad():
        for m in (sbn, bn):
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
    ys, yf = sbn(x), bn(x)
    c = x - x.mean((0, 2, 3), keepdim=True)
    ratio_to_c = (ys - beta.reshape(1, 6, 1, 1)) / c
    per_channel = ratio_to_c.permute(1, 0, 2, 3).reshape(6, -1)
    # per channel one multiplier AP2(gamma) * AP2(inv std): an exact power of two
    assert torch.allclose(per_channel, per_channel[:, :1])
    e = torch.log2(per_channel[:, 0].detach())
    assert torch.allclose(e, e.round(), rtol=0, atol=1e-9)
    # AP2 errors: var within 2^±1/2, rsqrt then 2^±1/4, its AP2 2^±1/2, AP2(gamma) 2^±1/2
    r = (ys - beta.reshape(1, 6, 1, 1)) / (yf - beta.reshape(1, 6, 1, 1))
    assert r.min() >= 2**-1.25 - 1e-12 and r.max() <= 2**1.25 + 1e-12
    (ys * torch.randn_like(ys)).sum().backward()
    assert torch.isfinite(sbn.weight.grad).all() and sbn.weight.grad.abs().sum() > 0


def test_use_shift_batchnorm_swaps_every_batchnorm() -> None:
    model = bnn.use_shift_batchnorm(_mlp())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, bnn.ShiftBatchNorm) for m in model.modules()) == 3
    assert model(torch.randn(8, 12)).shape == (8, 4)


def _ap2(v: float) -> float:
    return 0.0 if v == 0 else math.copysign(2.0 ** round(math.log2(abs(v))), v)


def test_shift_adamax_matches_a_plain_reimplementation_and_adamax_within_factor_two() -> None:
    torch.manual_seed(12)
    p = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    opt = bnn.ShiftAdaMax([p])
    grads = [torch.randn(40, dtype=torch.float64) * s for s in (1.0, 0.1, 3.0, 0.5, 0.01)]
    ref = p.detach().tolist()
    m, v = [0.0] * 40, [0.0] * 40
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        float_update = []
        for i, gi in enumerate(g.tolist()):
            m[i] = m[i] - m[i] / 8 + gi / 8  # beta1 = 1 - 2^-3: shifts only
            v[i] = max(v[i] - v[i] / 1024, abs(gi))  # beta2 = 1 - 2^-10
            step = _ap2(2.0**-10 / (1 - (1 - 1 / 8) ** t))
            ref[i] -= step * m[i] * _ap2(1 / (v[i] + 1e-8))
            # AdaMax (Kingma & Ba, Alg. 2) from the same m, v: lr / (1 - beta1^t) * m / v
            float_update.append(2.0**-10 / (1 - 0.875**t) * m[i] / (v[i] + 1e-8))
        torch.testing.assert_close(
            p.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-14, atol=0
        )
        ratio = (before - p.detach()) / torch.tensor(float_update, dtype=torch.float64)
        assert ratio.min() >= 0.5 - 1e-9 and ratio.max() <= 2.0 + 1e-9  # two AP2 roundings


def test_shift_adamax_minimises_a_quadratic() -> None:
    torch.manual_seed(13)
    p = torch.nn.Parameter(torch.randn(20) * 3)
    opt = bnn.ShiftAdaMax([p], lr=2.0**-4)
    first = float((p**2).sum().detach())
    for _ in range(300):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    assert float((p**2).sum().detach()) < 0.01 * first


# ----------------------------------------------------------------------------------------------
# Gradient quantization (QNN 6-bit gradients)


def test_quantize_gradient_grid_bias_and_error() -> None:
    g = torch.tensor([0.0, 0.013, -0.4, 1.0, -0.77, 0.5001], dtype=torch.float64)
    step = 1.0 / 31  # 6 bits: q = 31 levels per side of max|g| = 1
    det = bnn.quantize_gradient(g, 6, stochastic=False)
    assert det[0] == 0 and (det - g).abs().max() <= step / 2 + 1e-15
    assert torch.allclose(det / step, (det / step).round(), atol=1e-9)
    gen = torch.Generator().manual_seed(14)
    # one call on 20000 copies: max|g| of the stack is that of g, so each row is one draw
    draws = bnn.quantize_gradient(g.repeat(20000, 1), 6, generator=gen)
    assert torch.allclose(draws / step, (draws / step).round(), atol=1e-9)
    assert (draws[:, 0] == 0).all()
    # unbiased: |mean - g| within 5 sigma (sigma <= step / 2 / sqrt(n))
    assert (draws.mean(0) - g).abs().max() <= 5 * (step / 2) / math.sqrt(20000)
    assert ((draws - g).abs() < step + 1e-12).all()


def test_grad_bits_option_quantizes_latent_gradient() -> None:
    torch.manual_seed(15)
    model = lowbit.quantize(_mlp(), "bnn", keep=(), grad_bits=4)
    squared_hinge(model(torch.randn(16, 12)), torch.randint(0, 4, (16,))).backward()
    grad = model[3].weight.grad
    step = grad.abs().max() / 7
    assert torch.allclose(grad / step, (grad / step).round(), atol=1e-4)
    assert len((grad / step).round().unique()) <= 15


# ----------------------------------------------------------------------------------------------
# Export


def test_bnn_export_is_binary_and_dequantizes_to_forward_weight() -> None:
    torch.manual_seed(16)
    model = lowbit.quantize(_mlp(), "bnn", keep=(), init="uniform", stochastic=True)
    model.eval()
    for _, layer in lowbit.convert.quantized_layers(model).items():
        assert isinstance(layer, QuantLinear)
        qw = layer.quantized_weight()
        assert qw.format == "binary" and qw.bits == 1 and qw.codes.dtype == torch.int8
        assert set(qw.codes.unique().tolist()) == {-1, 1}
        assert torch.equal(qw.codes, torch.where(layer.weight < 0, -1, 1).to(torch.int8))
        assert torch.equal(qw.dequantize(), layer.weight_quantizer(layer.weight))
        assert layer.input_quantizer.spec() == ActSpec("binary")


@pytest.mark.parametrize(("fmt", "bits"), [("linear", 2), ("linear", 4), ("log", 4)])
def test_qnn_export_is_kbit_and_dequantizes_to_forward_weight(fmt: str, bits: int) -> None:
    torch.manual_seed(17)
    model = lowbit.quantize(
        _mlp(),
        "qnn",
        keep=(),
        weight_bits=bits,
        weight_format=fmt,
        activations="uint2",
        init="uniform",
    )
    layer = model[3]
    qw = layer.quantized_weight()
    assert qw.format == f"kbit_{fmt}" and qw.bits == bits
    assert torch.equal(qw.dequantize(), layer.weight_quantizer(layer.weight))
    if fmt == "linear":  # fixed range [-1, 1]: levels k / q
        q = 2 ** (bits - 1) - 1
        torch.testing.assert_close(
            qw.dequantize(), (layer.weight.detach() * q).round().clamp(-q, q) / q
        )
    spec = layer.input_quantizer.spec()
    assert (spec.kind, spec.bits, spec.signed) == ("kbit_linear", 2, False)
    one_bit = lowbit.quantize(_mlp(), "qnn", keep=(), weight_bits=1, activations="binary")
    assert one_bit[3].quantized_weight().format == "binary"
    assert one_bit[3].input_quantizer.spec() == ActSpec("binary")


# ----------------------------------------------------------------------------------------------
# A tiny training run


@pytest.mark.parametrize("method", ["bnn", "qnn"])
def test_tiny_synthetic_training_run_learns(method: str) -> None:
    torch.manual_seed(18)
    model = lowbit.quantize(_mlp((64, 64)), method, keep=(), init="uniform")
    losses = _train_steps(model, method, 150, lr=3e-3, seed=1)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 12, generator=g)
    model.eval()
    acc = (model(x).argmax(1) == x[:, :4].argmax(1)).float().mean()
    assert acc > 0.6


def test_qnn_max_weight_scale_for_small_lstm_weights() -> None:
    torch.manual_seed(20)
    lstm = nn.Sequential(nn.LSTM(8, 6), nn.Linear(6, 3))
    with torch.no_grad():
        lstm[0].weight_ih_l0.uniform_(-0.06, 0.06)
    fixed = lowbit.quantize(lstm, "qnn", keep=("last",), activations="float")
    w_f = fixed[0].quantized_weights()["weight_ih_l0.i"].dequantize()
    assert torch.equal(w_f, torch.zeros_like(w_f))  # |w| < 1/14: every level rounds to 0
    lstm2 = nn.Sequential(nn.LSTM(8, 6), nn.Linear(6, 3))
    with torch.no_grad():
        lstm2[0].weight_ih_l0.uniform_(-0.06, 0.06)
    block = lstm2[0].weight_ih_l0.detach()[:6].clone()
    scaled = lowbit.quantize(
        lstm2, "qnn", keep=("last",), activations="float", weight_scale="max", lr_scale="none"
    )
    qw = scaled[0].quantized_weights()["weight_ih_l0.i"]
    step = block.abs().max() / 7
    torch.testing.assert_close(qw.dequantize(), (block / step).round() * step)
    (only,) = methods.get("qnn").param_groups(scaled, 0.01)
    assert only["params"] == [p for p in scaled.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="weight_scale"):
        lowbit.quantize(
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "qnn", keep=(), weight_scale="mean"
        )


def test_trainer_uses_the_glorot_groups_and_clips_every_step() -> None:
    # The Trainer (lowbit.train) drives the same hooks as a user's loop: its optimizer must carry
    # the Glorot-scaled rates and the latent weights must end every step inside [-1, 1].
    from lowbit.data import synthetic
    from lowbit.train import TrainConfig, Trainer

    torch.manual_seed(21)
    splits = synthetic.load(n_train=200, n_valid=50, n_test=50, shape=(1, 6, 6), classes=4)
    net = nn.Sequential(nn.Flatten(), _mlp((32, 32), d_in=36))
    cfg = TrainConfig(epochs=2, batch_size=50, lr=0.05, loss="squared_hinge", log_every=1e9)
    trainer = Trainer(
        net,
        splits,
        cfg,
        method="bnn",
        method_options={"keep": [], "init": "uniform"},
        progress=False,
    )
    rates = sorted(g["lr"] / cfg.lr for g in trainer.base_optimizer.param_groups)
    hand = sorted([1.0] + [math.sqrt((a + b) / 1.5) for a, b in ((36, 32), (32, 32), (32, 4))])
    assert rates == pytest.approx(hand)
    trainer.fit()
    latents = [w.detach() for _, w, _ in bnn.latent_weights(trainer.model)]
    assert len(latents) == 3 and max(float(w.abs().max()) for w in latents) <= 1.0
    assert any(float((w.abs() == 1).float().mean()) > 0 for w in latents)  # clipping did act


def test_warns_when_binary_inputs_are_never_negative() -> None:
    # sign(ReLU(x)) is +1 everywhere: a binary layer behind a ReLU learns nothing.
    import warnings

    import lowbit

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    )
    lowbit.quantize(model, "bnn")
    with pytest.warns(UserWarning, match="all >= 0"):
        model(torch.randn(4, 8))
    # Once only, and never for inputs that take both signs.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 8))
    model2 = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Hardtanh(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    )
    lowbit.quantize(model2, "bnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model2(torch.randn(16, 8))
