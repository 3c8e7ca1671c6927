"""TTQ (arXiv 1612.01064, reference/papers.md §1): forward rule, gradients, export, hooks, training.

References used here are independent of ``lowbit.methods.ttq``'s implementation: hand-made tensors
with hand-computed values, finite differences (``torch.autograd.gradcheck``), a line-by-line
transcription of the official TensorFlow graph (``examples/Ternary-Net/ternary.py``) with its
gradient overrides, and sorted/looped NumPy-style thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit.methods as methods
from lowbit.convert import quantize
from lowbit.methods.ttq import (
    SCALE_FLOOR,
    TTQWeight,
    scale_parameters,
    ttq,
    ttq_codes,
    ttq_stats,
    ttq_threshold,
)
from lowbit.qtypes import Granularity

# ----------------------------------------------------------------------------------------------
# Independent references


def official_tf_graph(
    x: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float
) -> torch.Tensor:
    """The official ``tw_ternarize`` transcribed op by op, with its gradient overrides.

    TF: ``thre = stop_gradient(max|x| * t)``;
    ``mask_z = select((x < thre) & (x > -thre), 0, 1)`` (strict on both sides);
    ``mask_np = select(x < -thre, Wn, select(x > thre, Wp, 1))`` (from ones * Wp, ones * Wn);
    under ``gradient_override_map({"Sign": "Identity", "Mul": "Add"})``:
    ``w = sign(x) * stop_gradient(mask_z)``; then ``w = w * mask_np``.
    """
    thre = (x.detach().abs().max() * t).detach()
    ones = torch.ones_like(x)
    xd = x.detach()
    mask_z = torch.where((xd < thre) & (xd > -thre), torch.zeros_like(x), ones)
    mask_np = torch.where(
        x.detach() > thre, ones * wp, torch.where(x.detach() < -thre, ones * wn, ones)
    )
    sign = x + (torch.sign(x.detach()) - x).detach()  # "Sign": "Identity"
    prod = sign * mask_z
    masked = prod.detach() + (sign - sign.detach())  # "Mul": "Add" (gradient passes unmasked)
    return masked * mask_np


def looped_reference(w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float) -> torch.Tensor:
    """Per-output-channel TTQ written row by row with plain autograd (papers.md §1.3 expression)."""
    rows = []
    for i in range(w.shape[0]):
        wi = w[i]
        delta = wi.detach().abs().max() * t
        p = (wi.detach() > delta).to(w.dtype)
        n = (wi.detach() < -delta).to(w.dtype)
        value = wp[i] * p - wn[i] * n
        factor = (wp[i] * p + wn[i] * n + (1 - p - n)).detach()
        rows.append(value + (wi - wi.detach()) * factor)
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Forward rule and thresholds


def test_forward_hand_made_with_weights_exactly_at_threshold() -> None:
    # max|w| = 2 and t = 0.25 give Delta = 0.5 exactly; +-0.5 sit on the threshold -> 0.
    w = torch.tensor([2.0, 0.5, -0.5, 0.75, -0.51, 0.0, -2.0, 0.49])
    out = ttq(w, torch.tensor(1.5), torch.tensor(0.25), t=0.25)
    expected = torch.tensor([1.5, 0.0, 0.0, 1.5, -0.25, 0.0, -0.25, 0.0])
    assert torch.equal(out, expected)
    assert torch.equal(
        ttq_codes(w, t=0.25), torch.tensor([1, 0, 0, 1, -1, 0, -1, 0], dtype=torch.int8)
    )


def test_default_threshold_is_five_percent_of_max() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    assert ttq_threshold(w).item() == pytest.approx(0.05 * w.abs().max().item(), rel=1e-6)
    codes = ttq_codes(w)
    delta = 0.05 * w.abs().max()
    assert torch.equal(codes == 0, w.abs() <= delta)
    assert torch.equal(codes == 1, w > delta)


def test_channel_threshold_is_per_row() -> None:
    torch.manual_seed(1)
    w = torch.randn(5, 3, 3, 3) * torch.arange(1, 6).reshape(5, 1, 1, 1)
    delta = ttq_threshold(w, t=0.3, granularity="channel")
    assert delta.shape == (5,)
    for i in range(5):
        assert delta[i].item() == pytest.approx(0.3 * w[i].abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.77])
def test_fixed_sparsity_zeroes_exactly_round_r_n(r: float) -> None:
    torch.manual_seed(2)
    w = torch.randn(1000)  # distinct magnitudes
    codes = ttq_codes(w, sparsity=r)
    assert int((codes == 0).sum()) == round(r * 1000)
    # The zeros are the smallest magnitudes.
    order = w.abs().argsort()
    k = round(r * 1000)
    assert torch.all(codes[order[:k]] == 0)
    assert torch.all(codes[order[k:]] != 0)


def test_fixed_sparsity_per_group_with_remainder() -> None:
    torch.manual_seed(3)
    w = torch.randn(3, 10)  # groups of 4 along the input: sizes 4, 4, 2 per row
    g = Granularity("group", 4, "in")
    codes = ttq_codes(w, sparsity=0.5, granularity=g)
    for row in range(3):
        for start, size in ((0, 4), (4, 4), (8, 2)):
            chunk = codes[row, start : start + size]
            assert int((chunk == 0).sum()) == round(0.5 * size)
            mags = w[row, start : start + size].abs()
            zero_max = mags[chunk == 0].max()
            kept_min = mags[chunk != 0].min()
            assert zero_max < kept_min


def test_threshold_rejects_bad_rules() -> None:
    w = torch.randn(10)
    with pytest.raises(ValueError, match="sparsity"):
        ttq_threshold(w, sparsity=1.0)
    with pytest.raises(ValueError, match="threshold factor"):
        ttq_threshold(w, t=-0.1)


# ----------------------------------------------------------------------------------------------
# Gradients


def test_latent_gradient_scaled_by_wp_one_wn_hand_made() -> None:
    w = torch.tensor([2.0, 0.5, -0.5, 0.75, -0.51, 0.0, -2.0, 0.49], requires_grad=True)
    wp = torch.tensor(1.5, requires_grad=True)
    wn = torch.tensor(0.25, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    (ttq(w, wp, wn, t=0.25) * g).sum().backward()
    # sets: +,0,0,+,-,0,-,0 -> factors Wp,1,1,Wp,Wn,1,Wn,1 (weights at +-Delta count as zero set)
    assert torch.equal(w.grad, torch.tensor([1.5, 2.0, 3.0, 6.0, 1.25, 6.0, 1.75, 8.0]))
    assert wp.grad.item() == 1.0 + 4.0  # sum of g over the positive set (eq. 2)
    assert wn.grad.item() == -(5.0 + 7.0)  # MINUS sum over the negative set (paper omits the sign)


def test_scale_gradients_hand_derived_random() -> None:
    torch.manual_seed(4)
    w = torch.randn(32, 16, requires_grad=True)
    wp = torch.tensor([0.8], requires_grad=True)
    wn = torch.tensor([1.3], requires_grad=True)
    g = torch.randn(32, 16)
    (ttq(w, wp, wn) * g).sum().backward()
    delta = 0.05 * w.detach().abs().max()
    p = (w.detach() > delta).float()
    n = (w.detach() < -delta).float()
    torch.testing.assert_close(wp.grad, (g * p).sum().reshape(1))
    torch.testing.assert_close(wn.grad, -(g * n).sum().reshape(1))
    torch.testing.assert_close(w.grad, g * (0.8 * p + 1.3 * n + (1 - p - n)))


def test_scale_gradients_match_finite_differences() -> None:
    # The loss is smooth in Wp, Wn (the assignment does not depend on them): gradcheck's central
    # differences in float64 are an independent check of eq. 2 including the sign for Wn.
    torch.manual_seed(5)
    w = torch.randn(12, 7, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64)

    def loss(wp: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
        return ((ttq(w, wp, wn) @ x).tanh() ** 2).sum()

    wp = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    wn = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (wp, wn))


def test_channel_scale_gradients_match_finite_differences() -> None:
    torch.manual_seed(6)
    w = torch.randn(4, 9, dtype=torch.float64)
    x = torch.randn(9, 3, dtype=torch.float64)

    def loss(wp: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
        return ((ttq(w, wp, wn, granularity="channel") @ x).sin()).sum()

    wp = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    wn = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(loss, (wp, wn))


def test_matches_official_tensorflow_graph_forward_and_all_gradients() -> None:
    torch.manual_seed(7)
    for trial in range(5):
        w = torch.randn(20, 30, dtype=torch.float64)
        if trial == 0:  # plant weights exactly at +-Delta
            w[0, 0] = 4.0
            w[0, 1], w[0, 2] = 0.2, -0.2  # Delta = 0.05 * 4
        g = torch.randn(20, 30, dtype=torch.float64)
        ours = [
            w.clone().requires_grad_(),
            torch.tensor(0.6, dtype=torch.float64, requires_grad=True),
        ]
        ours.append(torch.tensor(1.4, dtype=torch.float64, requires_grad=True))
        ref = [t.detach().clone().requires_grad_() for t in ours]
        out = ttq(*ours)
        expected = official_tf_graph(*ref, t=0.05)
        if trial == 0:
            # Exactly at +-Delta the official masks disagree (mask_z keeps the weight, mask_np
            # gives it no scale): the code outputs sign(w) = +-1 there; the paper (and lowbit) 0.
            assert expected[0, 1].item() == 1.0 and expected[0, 2].item() == -1.0
            assert out[0, 1].item() == 0.0 and out[0, 2].item() == 0.0
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[0, 1:3] = False
            assert torch.equal(out.detach()[keep], expected.detach()[keep])
        else:
            assert torch.equal(out.detach(), expected.detach())
        (out * g).sum().backward()
        (expected * g).sum().backward()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_channel_granularity_matches_row_by_row_reference() -> None:
    torch.manual_seed(8)
    w0 = torch.randn(6, 11, dtype=torch.float64)
    wp0 = torch.rand(6, dtype=torch.float64) + 0.5
    wn0 = torch.rand(6, dtype=torch.float64) + 0.5
    g = torch.randn(6, 11, dtype=torch.float64)
    a = [w0.clone().requires_grad_(), wp0.clone().requires_grad_(), wn0.clone().requires_grad_()]
    b = [w0.clone().requires_grad_(), wp0.clone().requires_grad_(), wn0.clone().requires_grad_()]
    out = ttq(*a, t=0.2, granularity="channel")
    ref = looped_reference(*b, t=0.2)
    torch.testing.assert_close(out, ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


def test_plain_number_scales_and_shape_errors() -> None:
    w = torch.tensor([1.0, -1.0, 0.0], requires_grad=True)
    out = ttq(w, 2.0, 3.0)
    assert torch.equal(out.detach(), torch.tensor([2.0, -3.0, 0.0]))
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([2.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="unit"):
        ttq(torch.randn(4, 3), torch.ones(3), torch.ones(4), granularity="channel")


def test_functional_reexport_when_present() -> None:
    import lowbit.functional as F

    if not hasattr(F, "ttq"):
        pytest.skip("lowbit.functional.ttq not re-exported yet (workstream A adds it)")
    w = torch.randn(8, 8)
    assert torch.equal(
        F.ttq(w, torch.tensor(0.3), torch.tensor(0.9)), ttq(w, torch.tensor(0.3), torch.tensor(0.9))
    )


# ----------------------------------------------------------------------------------------------
# Quantizer module, export, method hooks


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def test_registered_with_options() -> None:
    assert "ttq" in methods.available()
    d = methods.get("ttq").defaults()
    # t: None means the paper's 0.05 unless sparsity is given (the two cannot be combined)
    assert d["t"] is None and d["init"] == "one" and d["sparsity"] is None
    with pytest.raises(TypeError, match="no option"):
        quantize(_mlp(), "ttq", threshold=0.1)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_export_dequantize_equals_forward_exactly(granularity: str) -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8, 4)
    )
    quantize(model, "ttq", keep=(), granularity=granularity, init="mean")
    for layer in (model[0], model[1], model[3]):
        with torch.no_grad():
            layer.weight_quantizer.wp.mul_(torch.rand_like(layer.weight_quantizer.wp) + 0.5)
        forward_w = layer.weight_quantizer(layer.weight)
        qw = layer.quantized_weight()
        assert qw.format == "ternary_asym" and qw.bits == 2 and qw.codes.dtype == torch.int8
        assert torch.equal(qw.dequantize(), forward_w.detach())
        assert torch.equal(
            qw.scales[..., 0].reshape(-1), layer.weight_quantizer.wp.detach().reshape(-1)
        )
        assert torch.equal(
            qw.scales[..., 1].reshape(-1), layer.weight_quantizer.wn.detach().reshape(-1)
        )
        assert set(qw.codes.unique().tolist()) <= {-1, 0, 1}


def test_export_of_lstm_gate_blocks() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.LSTM(5, 4))
    quantize(model, "ttq", keep=())
    lstm = model[0]
    qws = lstm.quantized_weights()
    assert len(qws) == 8 and all(q.format == "ternary_asym" for q in qws.values())
    w = lstm.weight_hh_l0
    assert torch.equal(
        qws["weight_hh_l0.g"].dequantize(), lstm.weight_quantizer["hh_l0"][2](w[8:12]).detach()
    )
    out, _ = model(torch.randn(3, 2, 5))
    out.sum().backward()
    assert all(p.grad is not None for p in scale_parameters(model))


def test_scale_init_one_mean_and_number() -> None:
    torch.manual_seed(11)
    lin = nn.Linear(40, 30)
    w = lin.weight.detach()
    q1 = TTQWeight(w)
    assert q1.wp.item() == 1.0 and q1.wn.item() == 1.0 and q1.wp.shape == (1,)
    qm = TTQWeight(w, init="mean")
    delta = 0.05 * w.abs().max()
    assert qm.wp.item() == pytest.approx(w[w > delta].mean().item(), rel=1e-5)
    assert qm.wn.item() == pytest.approx(w[w < -delta].abs().mean().item(), rel=1e-5)
    qc = TTQWeight(w, init="mean", granularity="channel")
    assert qc.wp.shape == (30,)
    row = w[3]
    assert qc.wp[3].item() == pytest.approx(
        row[row > 0.05 * row.abs().max()].mean().item(), rel=1e-5
    )
    assert TTQWeight(w, init=0.25).wn.item() == 0.25
    for bad in ("zeros", -1.0):
        with pytest.raises(ValueError):
            TTQWeight(w, init=bad)


def test_keep_first_ternarizes_last_layer_cifar_style() -> None:
    model = quantize(_mlp(), "ttq", keep=["first"])
    assert type(model[0]) is nn.Linear  # the first layer stays a plain float layer
    assert isinstance(model[2].weight_quantizer, TTQWeight)
    assert isinstance(model[4].weight_quantizer, TTQWeight)
    default = quantize(_mlp(), "ttq")  # lowbit default keeps first and last float
    assert sum(isinstance(m, TTQWeight) for m in default.modules()) == 1


def test_after_step_keeps_scales_positive() -> None:
    model = quantize(_mlp(), "ttq", keep=())
    q = model[2].weight_quantizer
    with torch.no_grad():
        q.wp.fill_(-0.3)
        q.wn.fill_(0.0)
        model[4].weight_quantizer.wp.fill_(0.7)
    methods.get("ttq").after_step(model)
    assert q.wp.item() == pytest.approx(SCALE_FLOOR) and q.wn.item() == pytest.approx(SCALE_FLOOR)
    assert model[4].weight_quantizer.wp.item() == pytest.approx(0.7)  # untouched when positive

    off = quantize(_mlp(), "ttq", keep=(), keep_positive=False)
    with torch.no_grad():
        off[2].weight_quantizer.wp.fill_(-0.3)
    methods.get("ttq").after_step(off)
    assert off[2].weight_quantizer.wp.item() == pytest.approx(-0.3)
    # t and sparsity are two ways to give one threshold: both at once is refused
    with pytest.raises(ValueError, match="as t .* or as sparsity, not both"):
        quantize(_mlp(), "ttq", keep=(), t=0.1, sparsity=0.5)
    assert quantize(_mlp(), "ttq", keep=())[2].weight_quantizer.t == 0.05
    assert quantize(_mlp(), "ttq", keep=(), sparsity=0.5)[2].weight_quantizer.sparsity == 0.5
    # a string is not a flag: "no" would otherwise count as true
    with pytest.raises(TypeError, match="keep_positive must be True or False, got 'no'"):
        quantize(_mlp(), "ttq", keep=(), keep_positive="no")


def test_positivity_clamp_after_a_real_step_that_overshoots() -> None:
    model = quantize(_mlp(), "ttq", keep=())
    q = model[2].weight_quantizer
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(64, 6)
    # Push the output of the ternary layer up: dL/dWn > 0 on its own would drive Wn below 0.
    loss = -model[:4](x).sum()
    loss.backward()
    opt.step()
    methods.get("ttq").after_step(model)
    floor32 = torch.tensor(SCALE_FLOOR).item()  # the floor as stored in a float32 parameter
    for p in scale_parameters(model):
        assert p.item() >= floor32
    assert q.wn.item() == pytest.approx(SCALE_FLOOR)  # it did overshoot and was clamped


def test_param_groups_weight_decay_on_scales() -> None:
    method = methods.get("ttq")
    on = quantize(_mlp(), "ttq", keep=())
    # one group (decay hits the scales, official CIFAR): every trainable parameter
    (only,) = method.param_groups(on, 0.1)
    assert only["params"] == [p for p in on.parameters() if p.requires_grad]
    off = quantize(_mlp(), "ttq", keep=(), scale_weight_decay=False)
    groups = method.param_groups(off, 0.1)
    assert groups is not None and len(groups) == 2
    scales = {id(p) for p in scale_parameters(off)}
    assert {id(p) for p in groups[1]["params"]} == scales and groups[1]["weight_decay"] == 0.0
    assert not scales & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(off.parameters()))
    # With zero gradients, SGD weight decay shrinks the weights but not the scales.
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=0.5)
    for p in off.parameters():
        p.grad = torch.zeros_like(p)
    before = off[2].weight.detach().clone()
    opt.step()
    assert off[2].weight_quantizer.wp.item() == 1.0
    torch.testing.assert_close(off[2].weight.detach(), before * (1 - 0.1 * 0.5))


def test_epoch_metrics_per_layer() -> None:
    model = quantize(_mlp(), "ttq", keep=(), sparsity=0.4)
    metrics = methods.get("ttq").epoch_metrics(model)
    layers = {k.split("/")[1] for k in metrics}
    assert layers == {"0", "2", "4"}
    for layer in layers:
        s = metrics[f"ttq/{layer}/sparsity"]
        assert s + metrics[f"ttq/{layer}/pos"] + metrics[f"ttq/{layer}/neg"] == pytest.approx(1.0)
        assert metrics[f"ttq/{layer}/wp"] == 1.0
    assert metrics["ttq/2/sparsity"] == pytest.approx(round(0.4 * 256) / 256)
    assert metrics["ttq/2/sparsity"] == pytest.approx(model[2].quantized_weight().sparsity())
    assert set(ttq_stats(model)["4"]) == {"wp", "wn", "sparsity", "pos", "neg", "delta"}


# ----------------------------------------------------------------------------------------------
# Training


def _blobs(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=gen) * 2
    y = torch.randint(0, 3, (n,), generator=gen)
    x = centers[y] + 0.7 * torch.randn(n, 6, generator=gen)
    return x, y


@pytest.mark.parametrize("flow", ["fine-tune", "scratch"])
def test_training_reduces_loss_and_moves_scales(flow: str) -> None:
    x, y = _blobs()
    model = _mlp(1)
    loss_fn = nn.CrossEntropyLoss()
    if flow == "fine-tune":
        # Float pre-training (a few steps), then the CIFAR protocol: ternarize all but the first.
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    # From scratch (the AlexNet protocol) starts from the fresh initialisation.
    quantize(model, "ttq", keep=["first"], init="mean")
    method = methods.get("ttq")
    start = {
        n: q.wp.item()
        for n, q in ((n, m) for n, m in model.named_modules() if isinstance(m, TTQWeight))
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        method.after_step(model)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    moved = [
        abs(m.wp.item() - start[n]) for n, m in model.named_modules() if isinstance(m, TTQWeight)
    ]
    assert min(moved) > 1e-3
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9
    assert all(math.isfinite(v) for v in method.epoch_metrics(model).values())


# ----------------------------------------------------------------------------------------------
# Recipes, the Trainer flow and the paper's plots


def test_cifar10_resnet20_recipe_fine_tunes_two_steps_on_synthetic_files(tmp_path) -> None:
    from lowbit import data, models
    from lowbit.data import synthetic
    from lowbit.report.ttq_plots import layer_series, read_metrics
    from lowbit.train import TrainConfig, Trainer, load_recipe

    recipe = load_recipe("ttq-cifar10-resnet20")
    assert recipe["paper"]["value"] == 8.87 and recipe["paper"]["fp_value"] == 8.23
    fp_recipe = load_recipe(recipe["recipe"]["init_from"])
    synthetic.write_cifar(tmp_path / "cifar10", "cifar10", n_per_batch=4)
    d = dict(recipe["data"])
    splits = data.load(d.pop("name"), data_dir=tmp_path, download=False, **d)
    assert len(splits.train) == 20 and splits.valid is None  # split "full": all 50k in real life

    def build() -> nn.Module:
        m = dict(recipe["model"])
        return models.create(m.pop("name"), input_shape=splits.input_shape, **m)

    assert fp_recipe["model"] == recipe["model"]
    float_model = build()  # stands in for the trained float checkpoint
    model = build()
    model.load_state_dict(float_model.state_dict())
    cfg = TrainConfig.from_dict({**recipe["train"], "epochs": 1, "batch_size": 10})
    options = {k: v for k, v in recipe["method"].items() if k != "name"}
    trainer = Trainer(
        model,
        splits,
        cfg,
        method="ttq",
        method_options=options,
        run_dir=tmp_path / "run",
        progress=False,
    )
    summary = trainer.fit()
    assert summary["steps"] == 2
    assert type(model.conv0) is nn.Conv2d  # conv0 stays float
    assert isinstance(
        model.linear.weight_quantizer, TTQWeight
    )  # the CIFAR code ternarized 'linear'
    # The official decay hits Wp/Wn: the recipe's rule puts them in a 2e-4 group.
    decay = {
        id(p): g["weight_decay"] for g in trainer.base_optimizer.param_groups for p in g["params"]
    }
    assert decay[id(model.linear.weight_quantizer.wp)] == pytest.approx(2e-4)
    assert decay[id(model.conv0.weight)] == pytest.approx(2e-4)
    assert decay[id(model.bn0.weight)] == 0.0
    # The latent weights started from the float model and moved; the scales learned.
    assert not torch.equal(model.linear.weight, float_model.linear.weight)
    assert model.linear.weight_quantizer.wp.item() != 1.0
    series = layer_series(read_metrics(tmp_path / "run"))
    assert "linear" in series and "res3.2.conv2" in series
    assert {"wp", "wn", "sparsity", "pos", "neg", "delta"} <= set(series["linear"])
    assert series["linear"]["wp"] == [(1, model.linear.weight_quantizer.wp.item())]


def test_plots_from_a_run_directory(tmp_path) -> None:
    import json

    from lowbit.report.ttq_plots import (
        latent_weights,
        layer_series,
        make_report,
        plot_scales,
        read_metrics,
    )
    from lowbit.train.checkpoint import save_checkpoint

    model = quantize(_mlp(), "ttq", keep=(), init="mean")
    method = methods.get("ttq")
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in (1, 2, 3):
            with torch.no_grad():
                model[2].weight_quantizer.wp.mul_(1.1)
            metrics = {f"method/{k}": v for k, v in method.epoch_metrics(model).items()}
            f.write(json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch, **metrics}) + "\n")
        f.write('{"epoch": 4, "train_lo')  # a half-written line (killed run) is skipped
    (run / "config.json").write_text(
        json.dumps({"method": {"name": "ttq", "options": {"t": 0.05}}})
    )
    save_checkpoint(run / "checkpoints", {"model": model.state_dict()}, 3)

    records = read_metrics(run)
    assert len(records) == 3
    series = layer_series(records)
    assert set(series) == {"0", "2", "4"}
    wp = [v for _, v in series["2"]["wp"]]
    assert wp[1] == pytest.approx(wp[0] * 1.1) and wp[2] == pytest.approx(wp[0] * 1.21)
    weights = latent_weights(model.state_dict())
    assert set(weights) == {"0", "2", "4"}
    assert torch.equal(weights["2"][0], model[2].weight.detach())
    paths = make_report(run)
    assert [p.name for p in paths] == ["ttq_scales.png", "ttq_sparsity.png", "ttq_histograms.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # a one-epoch run (a smoke run) still shows its shares: bars, not an empty stack plot
    import matplotlib.image as mpimg

    from lowbit.report.ttq_plots import plot_sparsity

    one = plot_sparsity(layer_series(records[:1]), tmp_path / "one.png")
    rgb = mpimg.imread(one)[..., :3]
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.3).mean() > 0.1  # empty axes: ~0.3 %
    no_ttq = layer_series([{"epoch": 1, "train_loss": 0.5}])  # a float run's metrics
    with pytest.raises(ValueError, match="no TTQ metrics"):
        plot_scales(no_ttq, tmp_path / "x.png")


def test_every_ttq_recipe_loads_and_builds() -> None:
    from lowbit import models
    from lowbit.train import TrainConfig, load_recipe
    from lowbit.train.config import RECIPE_DIR

    names = sorted(p.stem for p in RECIPE_DIR.glob("ttq-*.toml"))
    expected = {f"ttq-cifar10-resnet{d}" for d in (20, 32, 44, 56)}
    assert expected | {"ttq-mnist-mlp", "ttq-mnist-mlp-fp"} <= set(names)
    paper = {20: (8.23, 8.87), 32: (7.67, 7.63), 44: (7.18, 7.02), 56: (6.80, 6.44)}
    for name in names:
        r = load_recipe(name)
        TrainConfig.from_dict(r["train"])
        if r["method"]["name"] == "ttq":
            opts = {k: v for k, v in r["method"].items() if k != "name"}
            methods.get("ttq").resolve_options({k: v for k, v in opts.items() if k != "keep"})
        if name.startswith("ttq-cifar10-resnet") and not name.endswith("-fp"):
            depth = r["model"]["depth"]
            assert (r["paper"]["fp_value"], r["paper"]["value"]) == paper[depth]
            assert load_recipe(r["recipe"]["init_from"])["paper"]["value"] == paper[depth][0]
            net = models.create("resnet_cifar", depth=depth)
            assert len(list(net.parameters())) > 0


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(37, 53), (600, 700)])
def test_cpu_ops_equal_the_pytorch_path(
    shape: tuple[int, int], n_threads: int, monkeypatch
) -> None:
    # One scale pair per tensor on CPU float32 runs lowbit._la_solver's TTQ ops; the PyTorch
    # TTQFunction (forced by clearing the cache) is the reference: same forward and latent
    # gradient bit for bit, scale gradients to float32 rounding (double sums vs float32 dots),
    # and both near a float64 computation of eqs. 1-3.
    from lowbit import kernels
    from lowbit.methods import ttq as T

    if not kernels.la_solver_available():
        pytest.skip("lowbit._la_solver is not built")
    g = torch.Generator().manual_seed(shape[0] + n_threads)
    w0 = torch.randn(shape, generator=g).clamp(-3.9, 3.9)
    w0[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    w0[1, 0] = 4.0
    w0[1, 1:3] = torch.tensor([0.2, -0.2])  # exactly at +-Delta = 0.05 * 4: code 0
    grad = torch.randn(shape, generator=g)
    runs = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        for native in (True, False):
            monkeypatch.setattr(T, "_NATIVE", [native])
            w = w0.clone().requires_grad_()
            wp = torch.tensor(0.7, requires_grad=True)
            wn = torch.tensor([1.3], requires_grad=True)
            out = T.ttq(w, wp, wn, t=0.05)
            out.backward(grad)
            runs[native] = (out.detach(), w.grad, wp.grad, wn.grad)
    finally:
        torch.set_num_threads(previous)
    (o1, gw1, gp1, gn1), (o2, gw2, gp2, gn2) = runs[True], runs[False]
    assert torch.equal(o1.view(torch.int32), o2.view(torch.int32))
    assert torch.equal(gw1, gw2)
    assert o1[1, 1] == 0 and o1[1, 2] == 0 and o1[1, 0] == 0.7
    assert gp1.shape == gp2.shape == () and gn1.shape == gn2.shape == (1,)
    delta = 0.05 * float(w0.abs().max())
    assert delta == 0.05 * 4.0
    p = (w0 > delta).double()
    n = (w0 < -delta).double()
    g64 = grad.double()
    torch.testing.assert_close(gp1.double(), (g64 * p).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gn1.double(), -(g64 * n).sum().reshape(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp1, gp2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gn1, gn2, rtol=1e-4, atol=1e-4)
