"""PackedLinear: packed kernels against the QuantizedWeight's dequantize() reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lowbit import kernels
from lowbit.pack import PackedLinear, PackingWarning, packable
from lowbit.pack import pack as pack_model
from lowbit.qtypes import QuantizedWeight

EPS32 = float(np.finfo(np.float32).eps)
N, K = 37, 203  # neither is a multiple of the 16-row / 16-k tile


def _qweight(
    fmt: str, bits: int, granularity: str, group_size: int | None = None, axis: str | None = None
) -> QuantizedWeight:
    g = torch.Generator().manual_seed(hash((fmt, bits, granularity, group_size)) % 2**31)
    if fmt in ("ternary", "ternary_asym"):
        codes = torch.randint(-1, 2, (N, K), generator=g)
    elif fmt == "binary":
        codes = torch.randint(0, 2, (N, K), generator=g) * 2 - 1
    elif fmt == "kbit_linear":
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), generator=g)
    else:  # kbit_log
        n = 2 ** (bits - 1) - 1
        codes = torch.randint(-n, n + 1, (N, K), generator=g)
    if granularity == "tensor":
        shape: tuple[int, ...] = (1,)
    elif granularity == "channel":
        shape = (N,)
    elif axis == "in":
        shape = (N, -(-K // int(group_size)))
    else:
        shape = (-(-N // int(group_size)),)
    if fmt == "ternary_asym":
        shape = (*shape, 2)
    scales = torch.rand(shape, generator=g) * 0.5 + 0.05
    return QuantizedWeight(codes.to(torch.int8), scales, fmt, bits, granularity, group_size, axis)


CASES = [
    ("ternary", 2, "tensor", None, None),
    ("ternary", 2, "channel", None, None),
    ("ternary", 2, "group", 4, "in"),
    ("ternary", 2, "group", 64, "in"),
    ("ternary", 2, "group", 4, "out"),
    ("ternary_asym", 2, "tensor", None, None),
    ("ternary_asym", 2, "channel", None, None),
    ("binary", 1, "channel", None, None),
    ("kbit_linear", 3, "channel", None, None),
    ("kbit_linear", 4, "group", 8, "in"),
    ("kbit_log", 2, "tensor", None, None),
    ("kbit_log", 3, "channel", None, None),
]


def _reference(
    qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor, xq: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """float64 y = xq @ W.T + b from dequantize(), and a bound of a few fp32 roundings per group."""
    w = qw.dequantize().to(torch.float64).numpy()
    xd = xq.to(torch.float64).numpy()
    y = xd @ w.T + bias.double().numpy()
    groups = qw.scales.shape[1] if qw.granularity == "group" and qw.group_axis == "in" else 1
    # |D * scale| can exceed |x| @ |W| for asymmetric ternary (Wn * D + (Wp - Wn) * P): scale by
    # the largest level of each row instead.
    wmax = np.abs(w).max(axis=1)
    mag = np.abs(xd).sum(axis=1, keepdims=True) * wmax[None, :] * 3 + np.abs(bias.double().numpy())
    return y, (groups + 6) * EPS32 * mag + 1e-30


@pytest.mark.parametrize(("fmt", "bits", "gran", "size", "axis"), CASES)
@pytest.mark.parametrize("m", [1, 9])
def test_packed_linear_matches_dequantized_reference(
    isa: str, fmt: str, bits: int, gran: str, size: int | None, axis: str | None, m: int
) -> None:
    qw = _qweight(fmt, bits, gran, size, axis)
    assert packable(qw)
    bias = torch.randn(N)
    layer = PackedLinear(qw, bias)
    x = torch.randn(m, K)
    q, a_inv = kernels.quantize_activations_reference(x)
    expected, tol = _reference(qw, x, bias, q.double() * a_inv.double()[:, None])
    got = layer(x)
    assert got.shape == (m, N) and got.dtype == torch.float32
    err = np.abs(got.double().numpy() - expected)
    assert (err <= tol).all(), float((err - tol).max())


def test_dfp_activations_follow_functional_dfp_quantize() -> None:
    functional = pytest.importorskip("lowbit.functional")
    qw = _qweight("ternary", 2, "group", 4, "in")
    bias = torch.zeros(N)
    x = torch.randn(5, K) * 3
    ints, e = functional.dfp_quantize(x, bits=8)
    for layer, xq in (
        (PackedLinear(qw, bias, activations="dfp"), ints.double() * 2.0**e),
        (
            PackedLinear(qw, bias, activations="dfp", exponent=e + 1),
            functional.dfp_quantize(x, exponent=e + 1)[0].double() * 2.0 ** (e + 1),
        ),
    ):
        expected, tol = _reference(qw, x, bias, xq)
        assert (np.abs(layer(x).double().numpy() - expected) <= tol).all()


@pytest.mark.parametrize(("fmt", "bits", "gran", "size", "axis"), CASES)
def test_float_activations_run_the_exact_path(
    isa: str, fmt: str, bits: int, gran: str, size: int | None, axis: str | None
) -> None:
    # No activation quantization: compared with fp32 x itself (tolerance: summation order).
    qw = _qweight(fmt, bits, gran, size, axis)
    bias = torch.randn(N)
    x = torch.randn(4, 3, K)
    got = PackedLinear(qw, bias, activations="float")(x).reshape(12, N)
    expected, tol = _reference(qw, x, bias, x.reshape(12, K))
    err = np.abs(got.double().numpy() - expected)
    assert (err <= tol).all(), float((err - tol).max())


def test_state_dict_round_trip_and_batch_dims() -> None:
    qw = _qweight("ternary", 2, "channel")
    src = PackedLinear(qw, torch.randn(N))
    dst = PackedLinear.from_config(src.config())
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 5, K)
    assert torch.equal(dst(x), src(x))
    assert torch.equal(src(x).reshape(10, N), src(x.reshape(10, K)))
    # Layout 2: per-row scales as they are, unpadded bias; the kernel arrays are not saved.
    assert set(src.state_dict()) == {"tiles", "wscale", "bias"}
    assert src.state_dict()["wscale"].shape == (N,) and src.state_dict()["bias"].shape == (N,)
    # A deep copy runs on its own buffers (not on copies of the original's cached views), so
    # in-place updates of the copy's buffers are seen.
    clone = copy.deepcopy(src)
    before = clone(x)
    assert torch.equal(before, src(x))
    with torch.no_grad():
        clone.scale.mul_(2.0)
    assert not torch.equal(clone(x), before)
    assert torch.equal(src(x), before)


def test_unsupported_formats_are_refused() -> None:
    qw8 = _qweight("kbit_linear", 8, "channel")
    assert not packable(qw8)
    with pytest.raises(ValueError, match="no packed kernel for kbit_linear weights with 8 bits"):
        PackedLinear(qw8)
    odd = _qweight("ternary", 2, "group", 6, "in")
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedLinear(odd)
    with pytest.raises(ValueError, match="activations must be one of"):
        PackedLinear(_qweight("ternary", 2, "tensor"), activations="int4")


def test_packed_model_exports_and_compiles() -> None:
    model = torch.nn.Sequential(
        PackedLinear(_qweight("ternary_asym", 2, "channel"), torch.randn(N)),
        torch.nn.ReLU(),
        torch.nn.Linear(N, 8),
    ).eval()
    x = torch.randn(3, K)
    eager = model(x)
    program = torch.export.export(model, (x,))
    assert any("lowbit.ternary_linear" in str(node.target) for node in program.graph.nodes)
    assert torch.allclose(program.module()(x), eager, rtol=0, atol=1e-6)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=0, atol=1e-6)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.ReLU(), torch.nn.Linear(N, 10))


def test_pack_model_with_float_inputs_int8_and_float_paths() -> None:
    lowbit = pytest.importorskip("lowbit")
    quant = lowbit.quantize(_mlp(), "ttq", keep=())
    x = torch.randn(6, K)
    with torch.no_grad():
        simulated = quant(x)
    exact = pack_model(quant, activations="float")
    assert all(isinstance(exact[i], PackedLinear) for i in (0, 2))
    assert all(r.startswith("packed") for r in exact.packing_report.values())
    assert torch.allclose(exact(x), simulated, rtol=1e-4, atol=1e-5)
    int8 = pack_model(quant)
    # Per-token int8 activations: close to the float-activation model, not equal.
    y = int8(x)
    assert not torch.equal(y, simulated)
    assert torch.allclose(y, simulated, rtol=0.05, atol=0.05 * float(simulated.abs().max()))
    assert type(quant[0]).__name__ == "QuantLinear"  # the input model is untouched


def test_pack_model_keeps_dfp_inputs_signed_and_unsigned() -> None:
    lowbit = pytest.importorskip("lowbit")
    quant = lowbit.quantize(_mlp(), "fgq", keep=())
    x = torch.randn(6, K)
    with torch.no_grad():
        simulated = quant(x)  # first batch decides signed (layer 0) / unsigned (after the ReLU)
    packed = pack_model(quant, strict=True)
    assert isinstance(packed[0], PackedLinear) and packed[0].activations == "dfp"
    assert packed[0].act_signed and not packed[2].act_signed and packed[2].shift is not None
    assert "udfp8" in packed.packing_report["2"]
    # Same DFP codes and the same ternary weights: only fp32 rounding differs.
    assert torch.allclose(packed(x), simulated, rtol=1e-4, atol=1e-4)


# ---- integer input formats: unsigned DFP, sign, k-bit -------------------------------------------


def test_unsigned_dfp_inputs_are_integer_exact() -> None:
    functional = pytest.importorskip("lowbit.functional")
    g = torch.Generator().manual_seed(5)
    k = 4097
    # Worst case for the zero-point trick: every code 255 against all-+1 rows (and a -1 row).
    codes = torch.ones(3, k, dtype=torch.int8)
    codes[1] = -1
    codes[2, ::2] = 0
    qw = QuantizedWeight(codes, torch.ones(1), "ternary", 2)
    layer = PackedLinear(qw, None, activations="dfp", act_signed=False, exponent=0)
    x = torch.full((2, k), 1000.0)  # saturates at 255
    x[1, :7] = -3.0  # negatives saturate at 0
    ints, _ = functional.dfp_quantize(x, 8, signed=False, exponent=0)
    exact = torch.from_numpy(kernels.ternary_matmul_reference(ints.numpy(), codes.numpy()))
    assert torch.equal(layer(x), exact.float())  # all < 2^24: representable, so must be equal
    # Random unsigned inputs, dynamic exponent, grouped scales: float64 reference on the codes.
    qwg = _qweight("ternary", 2, "group", 8, "in")
    bias = torch.randn(N)
    xr = torch.relu(torch.randn(9, K, generator=g)) * 3
    ints, e = functional.dfp_quantize(xr, 8, signed=False)
    assert int(ints.max()) > 127  # the range int8 cannot hold
    expected, tol = _reference(qwg, xr, bias, ints.double() * 2.0**e)
    got = PackedLinear(qwg, bias, activations="dfp", act_signed=False)(xr)
    assert (np.abs(got.double().numpy() - expected) <= tol).all()


def _conv_net(in_ch: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_ch, 20, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(20, 17, 3, padding=2, dilation=2, bias=False),
        torch.nn.ReLU(),
        torch.nn.Conv2d(17, 5, 1, stride=3),  # stride > kernel: some pixels are never read
    ).eval()


def test_packed_conv_float_path_matches_the_quant_model() -> None:
    lowbit = pytest.importorskip("lowbit")
    quant = lowbit.quantize(_conv_net(), "ttq", keep=())
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        simulated = quant(x)
    exact = pack_model(quant, activations="float", strict=True)
    assert all(type(exact[i]).__name__ == "PackedConv2d" for i in (0, 2, 4))
    got = exact(x)
    assert got.shape == simulated.shape
    assert torch.allclose(got, simulated, rtol=1e-4, atol=1e-5)
    y8 = pack_model(quant)(x)  # per-patch int8: close, not equal
    assert torch.allclose(y8, simulated, rtol=0.05, atol=0.05 * float(simulated.abs().max()))


@pytest.mark.parametrize("method", ["fgq", "bnn", "qnn"])
def test_packed_conv_with_quantized_inputs_matches_the_quant_model(method: str) -> None:
    lowbit = pytest.importorskip("lowbit")
    quant = lowbit.quantize(_conv_net(), method, keep=())
    x = torch.randn(2, 3, 13, 11) * 2
    with torch.no_grad():
        simulated = quant(x)  # FGQ: first batch fixes signed (conv0) / unsigned (after ReLUs)
    packed = pack_model(quant, strict=True)
    # Same integer codes (zero padding is code 0, also for ±1 inputs), same weights.
    assert torch.allclose(packed(x), simulated, rtol=1e-5, atol=1e-4 * float(simulated.abs().max()))


def test_sign_inputs_with_binary_weights_are_exact() -> None:
    lowbit = pytest.importorskip("lowbit")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Hardtanh(), torch.nn.Linear(N, 10))
    quant = lowbit.quantize(net, "bnn", keep=())
    x = torch.randn(6, K)
    with torch.no_grad():
        simulated = quant(x)
    packed = pack_model(quant, strict=True)
    assert packed[0].activations == "sign"
    # ±1 x ±1 sums are integers: both sides compute them exactly, then add the same bias.
    assert torch.equal(packed(x), simulated)


def test_unpackable_layers_are_reported_or_refused_by_name() -> None:
    lowbit = pytest.importorskip("lowbit")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3)
    )
    quant = lowbit.quantize(net, "twn", keep=())
    # said out loud, not only in the report: the layer stays float-sized and simulated
    with pytest.warns(PackingWarning, match=r"left 1 quantized layer\(s\) unpacked"):
        packed = pack_model(quant)
    assert packed.packing_report["0"].startswith("kept as QuantConv2d: grouped convolutions")
    assert packed.packing_report["2"].startswith("packed")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(packed(x), quant(x), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="layer '0' kept as QuantConv2d: grouped"):
        pack_model(quant, strict=True)
    # the report says why a format has no kernel, not only that it has none
    ttq = lowbit.quantize(
        torch.nn.Sequential(torch.nn.Linear(16, 4)),
        "ttq",
        keep=(),
        granularity="group",
        group_size=8,
    )
    with pytest.warns(PackingWarning, match="'0' kept as QuantLinear"):
        report = pack_model(ttq).packing_report["0"]
    assert "ternary_asym" in report
    with pytest.warns(PackingWarning, match="found no quantized layer"):
        pack_model(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert report.endswith("asymmetric ternary with groups along K has no packed kernel")


@pytest.mark.parametrize("method", ["twn", "fgq"])
def test_batchnorm_and_relu_fuse_into_the_epilogue(method: str) -> None:
    lowbit = pytest.importorskip("lowbit")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(K, N), torch.nn.BatchNorm1d(N), torch.nn.ReLU(), torch.nn.Linear(N, 10)
    )
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.normal_()
        net[1].bias.normal_()
    quant = lowbit.quantize(net.eval(), method, keep=())
    x = torch.randn(6, K)
    with torch.no_grad():
        quant(x)  # FGQ: decide signedness
    plain = pack_model(quant, fuse=False)
    fused = pack_model(quant)
    assert type(fused[1]) is torch.nn.Identity and type(fused[2]) is torch.nn.Identity
    assert "folded 1 (BatchNorm); fused 2 (ReLU)" in fused.packing_report["0"]
    assert fused[0].relu and type(plain[1]) is torch.nn.BatchNorm1d
    a, b = fused[0](x), plain[2](plain[1](plain[0](x)))
    assert (a >= 0).all() and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused(x), plain(x), rtol=1e-4, atol=1e-5)
    # a model handed over in training mode packs the same (inference uses the running stats)
    from_train = pack_model(quant.train())
    assert from_train.packing_report == fused.packing_report and not from_train.training
    assert torch.equal(from_train(x), fused(x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("fmt", ["ternary_asym", "kbit_linear"])
@pytest.mark.parametrize("exponent", [None, -3])
def test_dfp_inputs_of_any_width_and_sign(
    isa: str, bits: int, signed: bool, fmt: str, exponent: int | None
) -> None:
    functional = pytest.importorskip("lowbit.functional")
    qw = _qweight(fmt, 2 if fmt == "ternary_asym" else 4, "channel")
    bias = torch.randn(N)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(bits)) * 2
    layer = PackedLinear(
        qw, bias, activations="dfp", act_bits=bits, act_signed=signed, exponent=exponent
    )
    ints, e = functional.dfp_quantize(x, bits, signed, exponent)  # saturates when E is fixed
    expected, tol = _reference(qw, x, bias, ints.double() * 2.0**e)
    err = np.abs(layer(x).double().numpy() - expected)
    assert (err <= tol).all(), float((err - tol).max())


class _CustomNet(torch.nn.Module):
    """Not an nn.Sequential: convolutions, BN, a pool, two linear layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 16)
        self.fc2 = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_pack_of_custom_models_reports_refuses_and_freezes() -> None:
    import lowbit

    x = torch.randn(2, 3, 16, 16)
    # "fp" layers (convolutions included) have nothing to pack: kept, said so, no crash
    fp = lowbit.quantize(_CustomNet(), "fp", keep=()).eval()
    packed = pack_model(fp)
    assert all(r.startswith("kept as") for r in packed.packing_report.values())
    with torch.no_grad():
        assert torch.equal(packed(x), fp(x))
    # a packed model is inference-only: no parameter wants a gradient (torch.compile traces
    # the custom ops, which have no autograd formula, only then)
    twn = lowbit.quantize(_CustomNet(), "twn", keep=()).eval()
    packed = pack_model(twn)
    assert not any(p.requires_grad for p in packed.parameters())
    assert any(p.requires_grad for p in twn.parameters())  # the input model is untouched
    # the XNOR path needs binary layers it can chain; float64 models need .float() first
    with pytest.raises(ValueError, match="no binary layer to put on the XNOR kernels"):
        pack_model(twn, xnor=True)
    with pytest.raises(ValueError, match=r"float64 parameters: call model.float\(\)"):
        pack_model(copy.deepcopy(twn).double())


def test_casting_a_packed_model_keeps_its_float32_scales(tmp_path) -> None:
    """.double()/.half()/.to(bfloat16) cast the float layers; packed layers keep their float32
    buffers bit for bit, compute in float32 and answer in the input's dtype. Saving a model that
    is not float32 is refused with the fix."""
    lowbit = pytest.importorskip("lowbit")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 36, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
        torch.nn.Unflatten(1, (1, 4)),
        torch.nn.LSTM(4, 6, batch_first=True),
    ).eval()
    quant = lowbit.quantize(net, "lat2", keep=["first"]).eval()
    x = torch.randn(2, 3, 6, 6)
    packed = pack_model(quant, activations="float", strict=True)
    before = {k: v.clone() for k, v in packed.state_dict().items() if not k.startswith("0.")}
    y, (h, _) = packed(x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cast = copy.deepcopy(packed).to(dtype)
        assert cast[0].weight.dtype == dtype  # the float first layer is cast
        for key, value in cast.state_dict().items():
            if key in before:
                assert torch.equal(value, before[key]), key  # packed buffers untouched
        yc, (hc, _) = cast(x.to(dtype))
        assert yc.dtype == dtype and hc.dtype == dtype
        if dtype == torch.float64:  # only the first layer's rounding differs
            torch.testing.assert_close(yc.float(), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=f"'0.weight' is {dtype}: call model.float"):
            lowbit.save(cast, tmp_path / "m.lowbit")
    back = copy.deepcopy(packed).half().float()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", ["ttq", "lat2", "ptq-fgq"])
def test_layers_pack_keeps_replay_their_weights_and_export(method: str) -> None:
    """A depthwise conv has no packed kernel: pack keeps it as a QuantConv2d whose quantizer now
    replays the weight it had (no solver, no float() of a scale), so the copy exports."""
    lowbit = pytest.importorskip("lowbit")
    from lowbit import ptq
    from lowbit.saveload import StoredWeight

    def quantized(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 36, 10),
        ).eval()
        if method == "ptq-fgq":
            return ptq.fgq(net, torch.randn(32, 3, 6, 6), group_size=4)
        return lowbit.quantize(net, method).eval()

    quant = quantized(0)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        simulated = quant(x)
        kept_weight = quant[2].weight_quantizer(quant[2].weight).clone()
    packed = pack_model(quant, activations="float")
    assert packed.packing_report["2"].startswith("kept as QuantConv2d: grouped")
    assert isinstance(packed[2].weight_quantizer, StoredWeight)
    with torch.no_grad():
        assert torch.equal(packed[2].weight_quantizer(packed[2].weight), kept_weight)
        eager = packed(x)
    torch.testing.assert_close(eager, simulated, rtol=1e-4, atol=1e-5)
    program = torch.export.export(packed, (x,))
    assert torch.equal(program.module()(x), eager)
    # the replayed codes and scales are in the state dict: another packed model of the same
    # architecture loads them and becomes this one
    with pytest.warns(PackingWarning):
        other = pack_model(quantized(1), activations="float")
    assert "2.weight_quantizer.codes" in packed.state_dict()
    other.load_state_dict(packed.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), eager)


def test_packed_conv_takes_unbatched_input_and_refuses_integer_input() -> None:
    lowbit = pytest.importorskip("lowbit")
    quant = lowbit.quantize(_conv_net(), "twn", keep=())
    packed = pack_model(quant, activations="float", strict=True)
    x = torch.randn(3, 13, 11)
    with torch.no_grad():
        expected = quant(x.unsqueeze(0)).squeeze(0)
        assert quant(x).shape == expected.shape  # nn.Conv2d takes (C, H, W) too
    torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="PackedConv2d takes floating-point inputs.*torch.int64"):
        packed(torch.zeros(1, 3, 13, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"PackedConv2d expects \(B, 3, H, W\) or \(3, H, W\)"):
        packed(torch.randn(4, 13, 11))


def test_calibrated_activation_exponent_travels_in_the_state_dict() -> None:
    lowbit = pytest.importorskip("lowbit")
    torch.manual_seed(0)
    qw = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(32, 8)), "twn", keep=())[0]
    qweight = qw.quantized_weight()
    a = PackedLinear(qweight, activations="dfp", exponent=-3)
    b = PackedLinear(qweight, activations="dfp", exponent=-6)
    x = torch.randn(4, 32)
    with torch.no_grad():
        ya, yb = a(x), b(x)  # b's cached kernel holds E = -6
    assert not torch.equal(ya, yb)
    b.load_state_dict(a.state_dict())
    assert b.exponent == -3
    with torch.no_grad():
        assert torch.equal(b(x), ya)
    # a layer that picks its exponent per batch cannot take a calibrated one
    dynamic = PackedLinear(qweight, activations="dfp", exponent=None)
    with pytest.raises(RuntimeError, match="picks its activation exponent per batch"):
        dynamic.load_state_dict(a.state_dict())
    bad = dict(a.state_dict(), act_exponent=torch.tensor(500, dtype=torch.int16))
    with pytest.raises(RuntimeError, match=r"act_exponent: expected one integer exponent"):
        b.load_state_dict(bad)


def test_per_batch_dfp_exponents_refuse_trace_and_export_with_the_fix() -> None:
    """jit.trace would freeze the example input's exponent (wrong at other scales), export
    stopped at a data-dependent guard: both now say to calibrate."""
    lowbit = pytest.importorskip("lowbit")
    from lowbit import ptq

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 4),
    )  # fmt: skip
    x = torch.randn(3, 16)
    dynamic = lowbit.quantize(copy.deepcopy(net), "fgq").eval()
    for model in (dynamic, pack_model(dynamic)):
        with pytest.raises(RuntimeError, match="act_mode='calibrated', then lowbit.ptq.calibrate"):
            torch.jit.trace(model, (x,))
        with pytest.raises(RuntimeError, match="cannot be traced or exported"):
            torch.export.export(model, (x,))
    calibrated = lowbit.quantize(copy.deepcopy(net), "fgq", act_mode="calibrated").eval()
    ptq.calibrate(calibrated, [torch.randn(64, 16)])
    packed = pack_model(calibrated)
    program = torch.export.export(packed, (x,))
    big = 10 * torch.randn(3, 16)  # other scales, same (specialised) batch size
    with torch.no_grad():
        assert torch.equal(program.module()(big), packed(big))


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_a_nan_token_gives_a_nan_row_on_integer_input_paths(isa: str) -> None:
    lowbit = pytest.importorskip("lowbit")
    from lowbit import kernels, ptq

    if isa not in kernels.available_isas():
        pytest.skip(f"{isa} not on this CPU")
    torch.manual_seed(0)
    qnn = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(37, 4)), "qnn", keep=(),
                          activations="int4").eval()  # fmt: skip
    net = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5))
    fgq = ptq.fgq(net.eval(), torch.randn(64, 40), group_size=4, keep=())
    for quant, k in ((qnn, 37), (fgq, 40)):
        packed = pack_model(quant)
        x = torch.randn(3, k)
        x[0] = float("nan")
        x[1, 3] = float("nan")
        with torch.no_grad(), kernels.use_isa(isa):
            y, clean = packed(x), packed(x[2:])
        assert torch.isnan(y[:2]).all()  # every output of a token with a NaN, as torch.nn.Linear
        assert torch.equal(y[2:], clean)  # other tokens untouched
        with torch.no_grad():
            torch.testing.assert_close(y[2:], quant(x[2:]), rtol=1e-4, atol=1e-5)


def test_tiny_inputs_take_the_smallest_dfp_exponent_in_both_paths() -> None:
    lowbit = pytest.importorskip("lowbit")
    from lowbit import functional as F

    assert F.dfp_exponent(torch.tensor([1e-36]), 8, False) == -126
    # smallest E with 2^(-k - E) <= 127, i.e. E >= -k - 6: -128 -> clamped, -116 kept
    assert F.dfp_exponent(torch.tensor([2.0**-122]), 8, True) == -126
    assert F.dfp_exponent(torch.tensor([2.0**-110]), 8, True) == -116
    torch.manual_seed(0)
    quant = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(16, 3)), "fgq", keep=(),
                            act_signed=False)  # fmt: skip
    quant.train()(torch.rand(4, 16))
    quant.eval()
    packed = pack_model(quant)
    x = torch.rand(2, 16) * 1e-36  # normal fp32 values: the packed layer raised here
    with torch.no_grad():
        torch.testing.assert_close(packed(x), quant(x), rtol=1e-4, atol=1e-6)
