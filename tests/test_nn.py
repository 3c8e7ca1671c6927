"""Quantizer modules and Quant* layers: export exactness, layer outputs against torch with the
dequantized weights, STE gradients, QuantLSTM against nn.LSTM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import lowbit
from lowbit import nn as lnn
from lowbit.methods.twn import BWNWeight, TWNWeight
from lowbit.qtypes import ActSpec

GRANS = [
    {"granularity": "tensor"},
    {"granularity": "channel"},
    {"granularity": "group", "group_size": 4, "group_axis": "in"},
    {"granularity": "group", "group_size": 3, "group_axis": "out"},
]


def all_quantizers(g: dict) -> list[lnn.WeightQuantizer]:
    return [
        TWNWeight(rule="0.7", **g),
        TWNWeight(rule="exact", **g),
        BWNWeight(**g),
        lnn.SignWeight(**g),
        lnn.KBitLinearWeight(bits=4, **g),
        lnn.KBitLinearWeight(bits=3, clip=0.5, **g),
        lnn.KBitLogWeight(bits=3, **g),
    ]


@pytest.mark.parametrize("g", GRANS, ids=lambda g: "-".join(str(v) for v in g.values()))
@pytest.mark.parametrize("shape", [(7, 10), (8, 3, 3, 3)])
def test_export_dequantizes_exactly_to_forward_weight(g, shape) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for q in [*all_quantizers(g), lnn.FloatWeight()]:
        forward = q(w)
        qw = q.export(w)
        assert qw.codes.dtype == torch.int8 or qw.format == "float"
        assert torch.equal(qw.dequantize(), forward), type(q).__name__
        assert torch.equal(
            q.export().dequantize(), forward
        )  # no argument: the last forward's weight


def test_export_without_forward_needs_weight() -> None:
    with pytest.raises(RuntimeError, match="latent weight"):
        TWNWeight().export()


def test_identity_ste_gradient_reaches_latent_weight() -> None:
    x = torch.randn(5, 6)
    layer = lnn.QuantLinear(6, 4, weight_quantizer=TWNWeight(rule="exact"))
    g = torch.randn(5, 4)
    layer(x).backward(g)
    # y = x W_q^T + b with dW_q/dW = I (STE): dL/dW = g^T x, dL/db = sum g.
    torch.testing.assert_close(layer.weight.grad, g.T @ x)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_clipped_kbit_weight_gradient_is_gated() -> None:
    w = torch.tensor([[0.2, -0.7, 0.5, -0.1]], requires_grad=True)
    q = lnn.KBitLinearWeight(bits=3, clip=0.5)
    q(w).backward(torch.ones(1, 4))
    assert w.grad.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_quant_linear_matches_torch_with_dequantized_weight() -> None:
    lin = nn.Linear(10, 7)
    q = lnn.QuantLinear.from_float(
        lin, TWNWeight(granularity="channel"), lnn.make_act_quantizer("dfp8")
    )
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(3, 10)
    ref_x = lnn.DFPAct(8)(x)
    expected = TF.linear(ref_x, q.quantized_weight().dequantize(), lin.bias)
    assert torch.equal(q(x), expected)
    assert "weight=ternary/channel" in repr(q) and "input=dfp8" in repr(q)


@pytest.mark.parametrize(
    "kw",
    [
        {"stride": 1, "padding": 1},
        {"stride": 2, "padding": 0, "dilation": 2},
        {"stride": 1, "padding": "same", "groups": 2},
        {"stride": 2, "padding": 1, "padding_mode": "reflect", "bias": False},
        {"stride": 1, "padding": (1, 2), "padding_mode": "circular", "groups": 4},
    ],
)
def test_quant_conv2d_matches_torch_with_dequantized_weight(kw) -> None:
    conv = nn.Conv2d(4, 8, 3, **kw)
    ref = copy.deepcopy(conv)
    q = lnn.QuantConv2d.from_float(conv, BWNWeight(granularity="channel"))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        ref.weight.copy_(q.quantized_weight().dequantize())
    torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)
    assert (q.stride, q.padding, q.dilation, q.groups, q.padding_mode) == (
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.padding_mode,
    )


def test_binary_input_quantizer_on_conv() -> None:
    q = lnn.QuantConv2d(
        2, 3, 3, padding=1, weight_quantizer=lnn.SignWeight(), input_quantizer=lnn.BinaryAct()
    )
    x = torch.randn(1, 2, 5, 5)
    ref = TF.conv2d(
        torch.where(x < 0, -1.0, 1.0), torch.where(q.weight < 0, -1.0, 1.0), q.bias, padding=1
    )
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-6)


def test_make_act_quantizer_names() -> None:
    assert lnn.make_act_quantizer("float") is None and lnn.make_act_quantizer(None) is None
    assert isinstance(lnn.make_act_quantizer("binary"), lnn.BinaryAct)
    d = lnn.make_act_quantizer("udfp6")
    assert isinstance(d, lnn.DFPAct) and d.bits == 6 and not d.signed
    lin = lnn.make_act_quantizer("int4")
    assert isinstance(lin, lnn.LinearAct) and lin.spec() == ActSpec(
        "kbit_linear", 4, True, scale=1 / 7, clip=1.0
    )
    assert isinstance(lnn.make_act_quantizer(ActSpec("dfp", 8, exponent=-4)), lnn.DFPAct)
    with pytest.raises(ValueError, match="activation spec"):
        lnn.make_act_quantizer("int")


def test_dfp_act_records_exponent_and_levels() -> None:
    a = lnn.DFPAct(8)
    y = a(torch.tensor([1.0, -0.3, 0.01]))
    assert a.last_exponent == -6
    assert torch.equal(y, torch.round(torch.tensor([1.0, -0.3, 0.01]) * 64) / 64)


# ----------------------------------------------------------------------------------------------
# QuantLSTM


def _lstm_pair(**kw) -> tuple[nn.LSTM, lnn.QuantLSTM]:
    torch.manual_seed(0)
    ref = nn.LSTM(dtype=torch.float64, **kw)
    q = lnn.QuantLSTM.from_float(copy.deepcopy(ref), _float_quantizers(ref))
    return ref, q


def _float_quantizers(lstm: nn.LSTM) -> nn.ModuleDict:
    keys = lnn.QuantLSTM.matrix_keys(lstm)  # type: ignore[arg-type]
    return nn.ModuleDict({k: nn.ModuleList(lnn.FloatWeight() for _ in range(4)) for k in keys})


@pytest.mark.parametrize(
    "kw",
    [
        {"input_size": 3, "hidden_size": 5},
        {"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True},
        {"input_size": 2, "hidden_size": 3, "num_layers": 2, "batch_first": True, "bias": False},
    ],
)
def test_quant_lstm_fp_matches_nn_lstm(kw) -> None:
    ref, q = _lstm_pair(**kw)
    x = torch.randn(4, 6, kw["input_size"], dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dirs = 2 if kw.get("bidirectional") else 1
    h0 = torch.randn(
        kw.get("num_layers", 1) * dirs,
        6 if not kw.get("batch_first") else 4,
        kw["hidden_size"],
        dtype=torch.float64,
    )
    c0 = torch.randn_like(h0)
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    out_q, (h_q, c_q) = q(x2, (h0, c0))
    for a, b in [(out_r, out_q), (h_r, h_q), (c_r, c_q)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (out_r.sum() + h_r.sum()).backward()
    (out_q.sum() + h_q.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(
            p.grad, dict(q.named_parameters())[name].grad, rtol=1e-10, atol=1e-12
        )


def test_quant_lstm_unbatched_and_float32() -> None:
    torch.manual_seed(1)
    ref = nn.LSTM(3, 4)
    q = lnn.QuantLSTM.from_float(copy.deepcopy(ref), _float_quantizers(ref))
    x = torch.randn(5, 3)
    out_r, (h_r, _) = ref(x)
    out_q, (h_q, _) = q(x)
    assert out_q.shape == out_r.shape == (5, 4) and h_q.shape == (1, 4)
    torch.testing.assert_close(out_q, out_r, rtol=1e-5, atol=1e-6)


def test_quant_lstm_gate_blocks_have_their_own_scales() -> None:
    torch.manual_seed(2)
    ref = nn.LSTM(4, 3, dtype=torch.float64)
    with torch.no_grad():  # make each gate block's magnitude different
        for j in range(4):
            ref.weight_ih_l0[3 * j : 3 * (j + 1)] *= 10.0**j
    keys = ["ih_l0", "hh_l0"]
    wq = nn.ModuleDict({k: nn.ModuleList(TWNWeight(rule="exact") for _ in range(4)) for k in keys})
    q = lnn.QuantLSTM.from_float(copy.deepcopy(ref), wq)
    exported = q.quantized_weights()
    assert sorted(exported) == sorted(f"weight_{k}.{g}" for k in keys for g in "ifgo")
    alphas = [exported[f"weight_ih_l0.{g}"].scales.item() for g in "ifgo"]
    for j, g in enumerate("ifgo"):
        block = ref.weight_ih_l0[3 * j : 3 * (j + 1)].detach()
        # alpha = mean |w| over the kept set of this block alone.
        kept = exported[f"weight_ih_l0.{g}"].codes != 0
        assert alphas[j] == pytest.approx(block.abs()[kept].mean().item(), rel=1e-6)
    assert alphas[3] > 100 * alphas[0]
    # Output equals nn.LSTM running on the dequantized gate matrices.
    with torch.no_grad():
        for k in keys:
            full = torch.cat([exported[f"weight_{k}.{g}"].dequantize().double() for g in "ifgo"])
            getattr(ref, f"weight_{k}").copy_(full)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    # float32 scales are exported; compare at float32 precision.
    torch.testing.assert_close(q(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_quant_lstm_refuses_proj_size_and_packed_sequences() -> None:
    with pytest.raises(ValueError, match="proj_size"):
        lnn.QuantLSTM.from_float(nn.LSTM(3, 4, proj_size=2), nn.ModuleDict())
    q = lnn.QuantLSTM(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(TypeError, match="PackedSequence"):
        q(packed)


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_shapes_are_checked_like_nn_lstm(batch_first: bool) -> None:
    """The fused kernel reads out of bounds when the input size or the states do not fit, so the
    quantized and the packed LSTM check them first; nn.LSTM refuses the same calls."""
    torch.manual_seed(0)
    float_lstm = nn.LSTM(6, 8, num_layers=2, batch_first=batch_first)
    q = lowbit.quantize(nn.Sequential(copy.deepcopy(float_lstm)), "lat", keep=())[0]
    packed = lowbit.pack(nn.Sequential(copy.deepcopy(q)).eval())[0]
    x = torch.randn(3, 5, 6)
    states = (2, 3 if batch_first else 5, 8)
    bad_inputs = [
        torch.randn(3, 5, 7),
        torch.randn(3, 5, 1),
        torch.randn(6),
        torch.randn(2, 3, 5, 6),
    ]
    bad_states = [(2, states[1], 9), (2, states[1] + 1, 8), (1, states[1], 8), (2, 8)]
    for lstm, kind in ((q, "QuantLSTM"), (packed, "PackedLSTM")):
        for bad in bad_inputs:
            with pytest.raises((RuntimeError, ValueError)):
                float_lstm(bad)
            with pytest.raises(ValueError, match=f"{kind} expects .*input_size=6"):
                lstm(bad)
        for shape in bad_states:
            h = torch.zeros(shape)
            with pytest.raises((RuntimeError, ValueError)):
                float_lstm(x, (h, h))
            with pytest.raises(
                ValueError, match=rf"{kind}: h0 and c0 must be \(2, {states[1]}, 8\)"
            ):
                lstm(x, (h, h))
        # right shapes, batched and unbatched, still run and agree with the states given
        h = torch.randn(states)
        out, (hn, cn) = lstm(x, (h, h.clone()))
        assert out.shape == (3, 5, 8) and hn.shape == states and cn.shape == states
        out1, (h1, _) = lstm(x[0], (h[:, 0], h[:, 0].clone()))
        assert out1.shape == (5, 8) and h1.shape == (2, 8)
    with pytest.raises(ValueError, match=r"h0 and c0 must be \(2, 8\)"):
        q(x[0], (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)))


class LearnedScaleTernary(lnn.WeightQuantizer):
    """A quantizer with a trainable scale: the base forward must route a gradient to it."""

    format = "ternary"

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.5]))

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F_codes(w), self.alpha


def F_codes(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w.abs() > 0.3, torch.where(w < 0, -1, 1), 0).to(torch.int8)


def test_base_forward_trains_learned_scales() -> None:
    q = LearnedScaleTernary()
    w = torch.tensor([[0.5, -0.1, -0.7, 0.2]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = q(w)
    assert torch.equal(out, torch.tensor([[0.5, 0.0, -0.5, 0.0]]))
    out.backward(g)
    # d/dalpha sum(g * codes * alpha) = sum(g * codes) = 1 - 3; latent gradient is the identity STE.
    assert q.alpha.grad.tolist() == [-2.0]
    assert torch.equal(w.grad, g)
    assert torch.equal(q.export(w).dequantize(), out.detach())


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}])
def test_quant_lstm_fused_forward_equals_the_step_by_step_cell(kw) -> None:
    # forward() runs PyTorch's fused LSTM on the quantized gate matrices; reference_forward()
    # writes the cell out step by step (itself checked against nn.LSTM in the fp case below).
    torch.manual_seed(3)
    ref = nn.LSTM(4, 3, dtype=torch.float64, **kw)
    keys = lnn.QuantLSTM.matrix_keys(ref)  # type: ignore[arg-type]
    wq = nn.ModuleDict({k: nn.ModuleList(TWNWeight(rule="exact") for _ in range(4)) for k in keys})
    q = lnn.QuantLSTM.from_float(ref, wq)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    out_f, (h_f, c_f) = q(x)
    loss_f = out_f.pow(2).sum() + h_f.sum() + c_f.sum()
    grads_f = torch.autograd.grad(loss_f, list(q.parameters()))
    out_r, (h_r, c_r) = q.reference_forward(x)
    loss_r = out_r.pow(2).sum() + h_r.sum() + c_r.sum()
    grads_r = torch.autograd.grad(loss_r, list(q.parameters()))
    for a, b in [(out_f, out_r), (h_f, h_r), (c_f, c_r), *zip(grads_f, grads_r, strict=True)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_quant_lstm_step_by_step_reference_matches_nn_lstm() -> None:
    ref, q = _lstm_pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    out_r, (h_r, c_r) = ref(x)
    out_q, (h_q, c_q) = q.reference_forward(x)
    for a, b in [(out_r, out_q), (h_r, h_q), (c_r, c_q)]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("bits", "clip"), [(2, None), (4, None), (8, None), (4, 0.5)])
def test_kbit_weight_cpu_forward_equals_functional_dequantize(bits: int, clip, monkeypatch) -> None:
    # Large per-tensor CPU float32 weights take one C++ pass; the PyTorch quantize + dequantize
    # (forced through the functional cache) and the export are the references, bit for bit.
    from lowbit import functional as Fn
    from lowbit import kernels
    from lowbit.nn import KBitLinearWeight

    if not kernels.la_solver_available():
        pytest.skip("lowbit._la_solver is not built")
    torch.manual_seed(bits)
    w = torch.randn(300, 200)
    w[0, :3] = torch.tensor([0.0, -0.0, float(w.abs().max())])
    q = KBitLinearWeight(bits=bits, clip=clip)
    calls = []
    real = kernels.kbit_fake
    monkeypatch.setattr(kernels, "kbit_fake", lambda *a: calls.append(1) or real(*a))
    fast = q.dequantized(w)
    monkeypatch.setattr(Fn, "_SIGN_OPS", [False])
    slow = q.dequantized(w)
    assert calls == [1]
    assert torch.equal(fast, slow)
    assert torch.equal(fast, q.export(w).dequantize())
