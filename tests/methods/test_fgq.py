"""FGQ / DFP quantizers: group ternarization against brute force, the 0.7 rule and k-bit groups by
hand, DFP exponents / saturation / calibration by hand, and the registered "fgq" method."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.methods import fgq
from lowbit.methods.fgq import DFPCalibratedAct, group_kbit, group_ternarize


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread (two spin badly on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Independent references (plain Python loops over groups, float64)


def groups_of(
    w: torch.Tensor, n: int | str, axis: str
) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(alpha index, group values) for every group, built without lowbit's unit helpers."""
    rows = w.reshape(w.shape[0], -1).double()
    out, k = rows.shape
    if n == "layer":
        return [((0,), rows.reshape(-1))]
    found = []
    if axis == "in":
        for o in range(out):
            for j, start in enumerate(range(0, k, n)):
                found.append(((o, j), rows[o, start : start + n]))
    else:
        for j, start in enumerate(range(0, out, n)):
            found.append(((j,), rows[start : start + n].reshape(-1)))
    return found


def brute_ternary(v: torch.Tensor) -> float:
    """min over alpha >= 0 and c in {-1,0,1}^n of ||v - alpha c||² — every code vector (n <= 7) or,
    for longer groups, every threshold Delta in {0} ∪ {|v_i|} with the optimal alpha."""
    v = v.double()
    best = float((v * v).sum())
    if v.numel() <= 7:
        for c in itertools.product((-1.0, 0.0, 1.0), repeat=v.numel()):
            ct = torch.tensor(c, dtype=torch.float64)
            cc = float((ct * ct).sum())
            if cc == 0:
                continue
            alpha = max(0.0, float((v * ct).sum()) / cc)
            best = min(best, float(((v - alpha * ct) ** 2).sum()))
        return best
    for delta in [-1.0, *v.abs().tolist()]:
        keep = v.abs() > delta
        if not keep.any():
            continue
        alpha = float(v.abs()[keep].mean())
        c = torch.where(keep, torch.sign(v), torch.zeros_like(v))
        best = min(best, float(((v - alpha * c) ** 2).sum()))
    return best


def group_error(
    w: torch.Tensor, codes: torch.Tensor, alphas: torch.Tensor, n: int | str, axis: str
):
    wg = groups_of(w, n, axis)
    cg = groups_of(codes.double(), n, axis)
    errs = []
    for (idx, v), (_, c) in zip(wg, cg, strict=True):
        a = float(alphas.double().reshape(-1)[0] if n == "layer" else alphas.double()[idx])
        errs.append(float(((v - a * c) ** 2).sum()))
    return errs


CASES = [
    # (shape, N, axis): remainders on both axes, N = 1, whole layer, conv shapes
    ((5, 11), 4, "in"),
    ((5, 12), 3, "in"),
    ((7, 6), 3, "out"),
    ((7, 2, 2, 2), 3, "out"),
    ((4, 2, 3, 3), 4, "in"),
    ((6, 5), 1, "in"),
    ((6, 5), 1, "out"),
    ((3, 4), "layer", "in"),
    ((9, 5), 6, "out"),
]


@pytest.mark.parametrize("shape,n,axis", CASES)
def test_group_ternarize_exact_equals_brute_force(shape, n, axis):
    torch.manual_seed(hash((shape, str(n), axis)) % 1000)
    w = torch.randn(shape)
    codes, alphas = group_ternarize(w, n, axis, rule="exact")
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    gran = fgq.fgq_granularity(n, axis)
    assert tuple(alphas.shape) == gran.scale_shape(shape)
    # alphas are float32 values (what a .lowbit file stores)
    assert torch.equal(alphas, alphas.float().to(alphas.dtype))
    for (idx, v), err in zip(
        groups_of(w, n, axis), group_error(w, codes, alphas, n, axis), strict=True
    ):
        best = brute_ternary(v)
        assert err <= best * (1 + 1e-6) + 1e-12, (idx, err, best)


def test_group_ternarize_codes_match_brute_force_argmin():
    # Small groups: the optimum is unique for random floats, so the codes themselves must match.
    torch.manual_seed(1)
    w = torch.randn(4, 10)
    codes, alphas = group_ternarize(w, 5, "in")
    for o in range(4):
        for j in range(2):
            v = w[o, 5 * j : 5 * j + 5].double()
            best = None
            for c in itertools.product((-1, 0, 1), repeat=5):
                ct = torch.tensor(c, dtype=torch.float64)
                if not ct.abs().sum():
                    continue
                a = max(0.0, float((v * ct).sum() / (ct * ct).sum()))
                e = float(((v - a * ct) ** 2).sum())
                if best is None or e < best[0]:
                    best = (e, c, a)
            assert tuple(codes[o, 5 * j : 5 * j + 5].tolist()) == best[1]
            assert alphas[o, j].item() == pytest.approx(best[2], rel=1e-6)


def test_n1_is_sign_and_magnitude_and_whole_layer_is_one_alpha():
    w = torch.tensor([[0.5, -0.25, 0.0], [2.0, -1.0, 0.125]])
    codes, alphas = group_ternarize(w, 1, "in")
    assert codes.tolist() == [[1, -1, 0], [1, -1, 1]]
    assert alphas.tolist() == [[0.5, 0.25, 0.0], [2.0, 1.0, 0.125]]
    codes, alphas = group_ternarize(w, "layer", "in")
    assert alphas.shape == (1,)
    # sorted |w| = 2, 1, .5, .25, .125, 0: scores 4, 4.5, 4.083.. -> keep {2, 1}, alpha 1.5
    assert codes.tolist() == [[0, 0, 0], [1, -1, 0]]
    assert alphas.item() == pytest.approx(1.5)


def test_exact_rule_by_hand_and_all_zero_group():
    w = torch.tensor([[1.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]])
    codes, alphas = group_ternarize(w, 4, "in")
    # group 0: k=1 -> 1, k=2 -> 1.9²/2 = 1.805, k=3 -> 2²/3 = 1.33: keep two, alpha 0.95
    assert codes.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    assert alphas[0, 0].item() == pytest.approx(0.95)
    assert alphas[0, 1].item() == 0.0


def test_rule_07_by_hand():
    # group 0: mean|w| = (0.1+0.5+0.9+0.02)/4 = 0.38, Delta = 0.266 -> keep -0.5, 0.9; alpha 0.7
    # group 1 (remainder, 2 weights): mean = 0.3, Delta = 0.21 -> keep 0.4 only; alpha 0.4
    w = torch.tensor([[0.1, -0.5, 0.9, -0.02, 0.4, -0.2]])
    codes, alphas = group_ternarize(w, 4, "in", rule="0.7")
    assert codes.tolist() == [[0, -1, 1, 0, 1, 0]]
    assert alphas[0].tolist() == pytest.approx([0.7, 0.4])
    # 0.7 is a heuristic: never better than exact
    torch.manual_seed(3)
    w = torch.randn(8, 32)
    ce, ae = group_ternarize(w, 8, "in", "exact")
    c7, a7 = group_ternarize(w, 8, "in", "0.7")
    err = lambda c, a: float(((w - c * a.repeat_interleave(8, 1)) ** 2).sum())  # noqa: E731
    assert err(ce, ae) <= err(c7, a7) + 1e-6


def test_group_ternarize_rejects_bad_arguments():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="rule"):
        group_ternarize(w, 2, "in", rule="0.5")
    with pytest.raises(ValueError, match="group_axis"):
        group_ternarize(w, 2, "sideways")
    with pytest.raises(ValueError, match="group_size"):
        group_ternarize(w, 0, "in")


# ----------------------------------------------------------------------------------------------
# k-bit groups


def test_group_kbit_max_rule_by_hand_half_to_even():
    # 4 bits: q = 7; step = 0.875 / 7 = 0.125; -0.3125 / 0.125 = -2.5 -> -2 (half to even)
    w = torch.tensor([[0.875, -0.3125, 0.125, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes, steps = group_kbit(w, 4, "in", bits=4, rule="max")
    assert codes.tolist() == [[7, -2, 1, 0], [0, 0, 0, 0]]
    assert steps.tolist() == [[0.125], [1.0]]


@pytest.mark.parametrize("axis,n", [("in", 16), ("out", 2), ("in", "layer")])
def test_group_kbit_mse_never_worse_than_max(axis, n):
    torch.manual_seed(4)
    w = torch.randn(6, 40) ** 3  # heavy tails: clipping the range pays off
    errs = {}
    for rule in ("max", "mse"):
        codes, steps = group_kbit(w, n, axis, bits=4, rule=rule)
        assert codes.abs().max() <= 7
        errs[rule] = group_error(w, codes, steps, n, axis)
    assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(errs["max"], errs["mse"], strict=True))
    assert sum(errs["mse"]) < 0.99 * sum(errs["max"])


# ----------------------------------------------------------------------------------------------
# Weight quantizers


def test_weight_quantizer_forward_export_and_ste():
    torch.manual_seed(5)
    for q in (fgq.make_fgq_weight(2, 4, "in"), fgq.make_fgq_weight(4, 3, "out")):
        w = torch.randn(6, 10, requires_grad=True)
        wq = q(w)
        qw = q.export(w)
        assert torch.equal(qw.dequantize(), wq.detach())
        assert qw.granularity == "group"
        (wq * torch.arange(60.0).reshape(6, 10)).sum().backward()
        assert torch.equal(w.grad, torch.arange(60.0).reshape(6, 10))  # identity STE


def test_eval_cache_follows_in_place_weight_changes():
    q = fgq.make_fgq_weight(2, 2, "in").eval()
    w = torch.tensor([[1.0, 0.1, -1.0, -0.1]])
    first = q(w).clone()
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(q(w), 2 * first)


# ----------------------------------------------------------------------------------------------
# DFP activations


def calibrated(x_batches, **kw) -> DFPCalibratedAct:
    a = DFPCalibratedAct(**kw)
    a.observe()
    for x in x_batches:
        assert torch.equal(a(x), x)  # observing passes values through
    a.finish_calibration()
    return a


def test_dfp_exponent_by_hand_unsigned_and_signed():
    # unsigned 8 bit: max 1.7 -> E = -7 (1.7*128 = 217.6 <= 255; 1.7*256 > 255)
    a = calibrated([torch.tensor([0.0, 0.3, 1.7])], bits=8)
    assert a.signed is False and a.exponent == -7
    # a negative value makes it signed: hi = 127 -> E = -6 (108.8)
    a = calibrated([torch.tensor([-0.1, 0.3, 1.7])], bits=8)
    assert a.signed is True and a.exponent == -6
    # unsigned 4 bit: max 1.0 -> E = -3 (8 <= 15; 16 > 15)
    a = calibrated([torch.tensor([0.2, 1.0])], bits=4)
    assert a.exponent == -3
    # rounding at the top: 1.998 * 128 = 255.74 rounds to 256 > 255, so E = -6, not -7
    a = calibrated([torch.tensor([1.998])], bits=8)
    assert a.exponent == -6


def test_dfp_saturation_and_underflow_by_hand():
    a = calibrated([torch.tensor([0.0, 1.0])], bits=8)  # unsigned, E = -7, top = 255/128
    assert a.exponent == -7
    a.track = True
    x = torch.tensor([0.5, 1.99, 2.5, 3.0, 0.001])
    y = a(x)
    # round(x * 128) = 64, 254.72 -> 255, 320 -> 255, 384 -> 255, 0.128 -> 0
    assert y.tolist() == [0.5, 255 / 128, 255 / 128, 255 / 128, 0.0]
    st = a.stats()
    assert (st["elements"], st["saturated"], st["underflow"]) == (5, 2, 1)
    assert st["saturation"] == pytest.approx(0.4)
    # a negative input to an unsigned quantizer is clipped to 0 and counted
    a.reset_stats()
    a(torch.tensor([-1.0, -0.001]))
    assert a.stats()["saturated"] == 1


def test_calibration_max_vs_percentile_by_hand():
    body = torch.arange(1, 1001, dtype=torch.float32) / 1000  # 0.001 .. 1.0
    batches = [body[:500], torch.cat([body[500:], torch.tensor([100.0])])]
    amax = calibrated(batches, bits=8, calibration="max")
    # max 100: 100 * 2 = 200 <= 255, 100 * 4 > 255 -> E = -1
    assert amax.exponent == -1
    apct = calibrated(batches, bits=8, calibration="percentile", percentile=99.9)
    # nearest rank ceil(0.999 * 1001) = 1000 -> the 1000th smallest value is 1.0 -> E = -7
    assert apct.exponent == -7
    apct.track = True
    apct(torch.cat(batches))
    assert apct.stats()["saturated"] == 1  # only the outlier


def test_dynamic_mode_picks_exponent_per_batch():
    a = calibrated([torch.tensor([0.5])], bits=8, mode="dynamic")
    assert a.exponent is None and a.signed is False
    a(torch.tensor([0.0, 1.0]))
    assert a.last_exponent == -7
    a(torch.tensor([0.0, 8.0]))
    assert a.last_exponent == -4  # 8 * 16 = 128 <= 255; 8 * 32 > 255
    assert a.spec().exponent is None and a.spec().kind == "dfp"


def test_auto_signedness_from_a_batch_turns_signed_when_negatives_come():
    a = DFPCalibratedAct(8, signed="auto", mode="dynamic")
    x = torch.tensor([0.25, 0.5])
    assert torch.equal(a(x), x) and a.signed is False  # first batch all >= 0: unsigned
    neg = torch.tensor([-0.5, 0.25])
    with pytest.warns(UserWarning, match="now sees negative inputs: switched to signed"):
        y = a(neg)
    assert a.signed is True and torch.equal(y, neg)  # not clamped to 0 (E = -7 holds both)
    state = a.get_extra_state()
    b = DFPCalibratedAct(8, signed="auto", mode="dynamic")
    b.set_extra_state(state)
    assert b.signed is True
    # an unsigned choice made on one batch survives a checkpoint and is still revisable
    c = DFPCalibratedAct(8, signed="auto", mode="dynamic")
    c(x)
    d = DFPCalibratedAct(8, signed="auto", mode="dynamic")
    d.set_extra_state(c.get_extra_state())
    with pytest.warns(UserWarning, match="switched to signed"):
        d(neg)
    # calibrated layers keep their choice: clamping is what calibration asked for
    e = calibrated([torch.tensor([0.5])], bits=8, mode="dynamic")
    assert e.signed is False
    assert torch.equal(e(neg), torch.tensor([0.0, 0.25]))


def test_dfp_values_are_ints_times_power_of_two():
    torch.manual_seed(6)
    x = torch.randn(1000)
    a = calibrated([x], bits=8)
    y = a(x)
    ints = y * 2.0 ** (-a.exponent)
    assert torch.equal(ints, torch.round(ints))
    assert ints.min() >= -128 and ints.max() <= 127
    # nothing saturates on the calibration data itself with the max rule
    assert math.isclose(
        float(ints.abs().max()), float(torch.round(x.abs().max() * 2.0 ** (-a.exponent)))
    )


# ----------------------------------------------------------------------------------------------
# The registered method


def test_fgq_method_registered_and_builds_quantizers():
    assert "fgq" in lowbit.methods.available()
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    lowbit.quantize(model, "fgq", keep=(), group_size=8, weight_bits=4, act_bits=4)
    assert isinstance(model[0].weight_quantizer, fgq.FGQKBitWeight)
    assert model[0].quantized_weight().scales.shape == (16, 1)
    assert isinstance(model[2].input_quantizer, DFPCalibratedAct)
    assert model[2].input_quantizer.bits == 4
    with pytest.raises(TypeError, match="no option"):
        lowbit.quantize(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "fgq", group_sizes=4)


def test_fgq_method_trains_with_straight_through_gradients():
    torch.manual_seed(7)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    lowbit.quantize(model, "fgq", keep=(), group_size=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    metrics = lowbit.methods.get("fgq").epoch_metrics(model)
    assert set(metrics) == {"0.sparsity", "2.sparsity", "4.sparsity"}
    assert all(0.0 <= v < 1.0 for v in metrics.values())


def test_fgq_fine_tuning_runs_in_the_trainer(tmp_path):
    from lowbit import data, models
    from lowbit.train import TrainConfig, Trainer

    torch.manual_seed(12)
    splits = data.load("synthetic", n_train=256, n_valid=64, n_test=64)
    net = models.create("mlp", input_shape=splits.input_shape, num_classes=10, widths=(64, 64))
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-3, eval_batch_size=64)
    trainer = Trainer(
        net, splits, cfg, method="fgq", method_options={"group_size": 64}, progress=False,
        run_dir=tmp_path / "run",
    )  # fmt: skip
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert isinstance(net.net.fc1.weight_quantizer, fgq.FGQTernaryWeight)
    assert net.net.fc1.quantized_weight().scales.shape == (64, 1)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "method/net.fc1.sparsity" in lines[-1]


# ----------------------------------------------------------------------------------------------
# Fixed-point group scales (scale_bits)


def test_scale_grid_exponent_is_the_smallest_that_holds_each_row():
    from fractions import Fraction

    torch.manual_seed(3)
    rows = torch.rand(40, 7) * torch.exp2(torch.randint(-30, 10, (40, 1)).float())
    rows[0] = 0.0  # all-zero row: exponent 0
    rows[1:3] = 1.0
    rows[1, 0] = 255 * 2.0**-4  # exactly on a bound: E = -4, not -3
    rows[2, 0] = float(
        np.nextafter(np.float32(255 * 2.0**-4), np.float32(np.inf))
    )  # just above: -3
    rows[3] = 1e-44  # subnormal: clamped so m * 2^E stays an exact float32
    exps = fgq.scale_grid_exponents(rows, 8)
    assert exps.dtype == torch.int64 and exps.shape == (40,)
    assert exps[0] == 0 and exps[1] == -4 and exps[2] == -3 and exps[3] == -149
    for r, e in zip(rows.tolist()[4:], exps.tolist()[4:], strict=True):
        top = Fraction(max(r))
        # independent: walk E until 255 * 2^E holds the row's largest scale and 2^(E-1) does not
        ref = 0
        while Fraction(255) * Fraction(2) ** ref < top:
            ref += 1
        while Fraction(255) * Fraction(2) ** (ref - 1) >= top:
            ref -= 1
        assert e == ref
    assert fgq.scale_grid_exponents(torch.tensor([0.5, 3.0]), 8).tolist() == [-6]  # 1-D: one E
    with pytest.raises(ValueError, match="2..8 bits"):
        fgq.scale_grid_exponents(rows, 9)


@pytest.mark.parametrize("levels", [None, 7])
def test_scales_on_grid_against_a_search_over_every_grid_value(levels):
    """For groups of 4, search all 256 mantissas and, for each, all 3^4 (or the rounded k-bit)
    codes by brute force. Ternary: the 5-candidate window must find the best grid scale in
    nearly every group and lose almost nothing overall. k-bit: never below the brute force, and
    within 1 % of the float32-scale error."""
    torch.manual_seed(5)
    w = torch.randn(12, 16, dtype=torch.float64) * torch.linspace(0.01, 1, 16, dtype=torch.float64)
    gran = fgq.fgq_granularity(4, "in")
    if levels is None:
        codes0, scales0 = group_ternarize(w, 4, "in")
    else:
        codes0, scales0 = group_kbit(w, 4, "in", bits=4)
    codes, scales, exps = fgq.scales_on_grid(w, gran, scales0, 8, levels)
    m = scales / torch.exp2(exps.double())[:, None]
    assert torch.equal(m, m.round()) and m.max() <= 255 and m.min() >= 0
    assert torch.equal(scales, scales.float().double())
    all_codes = torch.tensor(list(itertools.product((-1, 0, 1), repeat=4)), dtype=torch.float64)
    grid = torch.arange(256, dtype=torch.float64)
    found = 0
    ours_total = best_total = 0.0
    for o in range(12):
        step = 2.0 ** exps[o].item()
        for g in range(4):
            v = w[o, 4 * g : 4 * g + 4]
            c = codes[o, 4 * g : 4 * g + 4].double()
            a = scales[o, g].item()
            ours = float(((v - a * c) ** 2).sum())
            alphas = grid * step
            if levels is None:  # every code vector for every grid scale
                errs = ((v[None, None] - alphas[:, None, None] * all_codes[None]) ** 2).sum(-1)
                best = float(errs.min())
                # and the codes are the best ones for the chosen scale
                assert ours <= float(((v - a * all_codes) ** 2).sum(-1).min()) + 1e-15
            else:
                cs = torch.round(v[None] / alphas[1:, None]).clamp(-levels, levels)
                errs = ((v[None] - alphas[1:, None] * cs) ** 2).sum(-1)
                best = min(float(errs.min()), float((v**2).sum()))
            found += ours <= best * (1 + 1e-12) + 1e-300
            ours_total += ours
            best_total += best
    if levels is None:  # the exact float32 ternary optimum is global, so the grid's is nearby
        assert found >= 0.98 * 48
        assert ours_total <= best_total * 1.001
    else:  # group_kbit's step is a local optimum: compare with the float32-scale error instead
        float_err = float(((w - codes0.double() * scales0.repeat_interleave(4, 1)) ** 2).sum())
        assert best_total <= ours_total <= float_err * 1.01
    # and never worse than rounding the float32 scale to the grid without re-fitting the codes
    rounded = (scales0 / torch.exp2(exps.double())[:, None]).round() * torch.exp2(exps.double())[
        :, None
    ]
    naive = ((w - codes0.double() * rounded.repeat_interleave(4, 1)) ** 2).sum()
    assert ours_total <= float(naive) + 1e-12


def test_fgq_scale_bits_quantizer_and_option():
    torch.manual_seed(0)
    w = torch.randn(8, 20)
    q = fgq.FGQTernaryWeight(4, scale_bits=8)
    qw = q.export(w)
    e = fgq.scale_grid_exponents(qw.scales, 8).double()
    m = qw.scales.double() / torch.exp2(e)[:, None]
    assert torch.equal(m, m.round())
    assert "scale_bits=8" in repr(q)
    model = lowbit.quantize(nn.Sequential(nn.Linear(20, 8)), "fgq", keep=[], scale_bits=6)
    assert model[0].weight_quantizer.scale_bits == 6
    with pytest.raises(ValueError, match="scale_bits must be 2..8"):
        fgq.FGQTernaryWeight(4, scale_bits=12)
