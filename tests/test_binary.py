"""Binary XNOR-popcount kernels (lowbit.binary): bit-exact against int64 / float64 references.

Every kernel test runs on every ISA path this CPU has (the `isa` fixture, or an explicit loop
where Hypothesis drives the shapes) and, where work is split, with 1, 2 and 3 threads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as TF

from lowbit import binary as B
from lowbit import kernels


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(previous)


def _pm1(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# GEMM


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 14),
    n=st.integers(1, 70),
    k=st.integers(1, 1100),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_int64_reference_on_every_isa(m: int, n: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    expected = B.binary_linear_reference(B.signs(a), B.signs(w))
    ab, wb = B.pack_bits(a), B.pack_bits(w)
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            got = B.binary_linear(ab, wb, k)
        assert torch.equal(got.long(), expected), isa


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1100, 4097), (64, 130, 700), (5, 600, 8192)])
def test_gemm_threads_and_extremes(isa: str, threads: int, m: int, n: int, k: int) -> None:
    # (1, 1100, 4097) and (5, 600, 8192) split the weight rows (GEMV / big weights), (64, 130, 700)
    # splits the tokens; all-equal rows must give +K and all-opposite rows -K.
    gen = torch.Generator().manual_seed(m * n)
    a, w = _pm1((m, k), gen), _pm1((n, k), gen)
    a[0], w[0], w[1] = 1.0, 1.0, -1.0
    got = B.binary_linear(B.pack_bits(a), B.pack_bits(w), k)
    assert torch.equal(got.long(), B.binary_linear_reference(a, w))
    assert got[0, 0] == k and got[0, 1] == -k
    # Bit outputs: thread chunks and tiles must write whole, disjoint 64-bit words.
    thr = torch.randint(-60, 60, (n,), generator=gen, dtype=torch.int32)
    flip = torch.rand(n, generator=gen) < 0.5
    bits = B.binary_linear(B.pack_bits(a), B.pack_bits(w), k, out="bits", threshold=(thr, flip))
    expected = B.binary_linear_reference(a, w, out="bits", threshold=(thr, flip))
    assert torch.equal(B.unpack_bits(bits, n), expected)


def test_sign_rule_for_zero_negative_zero_and_nan(isa: str) -> None:
    # 0, -0.0 and NaN are +1; -inf and the smallest negative subnormal are -1.
    a = torch.tensor([[0.0, -0.0, float("nan"), -float("inf"), -1e-45, 3.0]])
    w = torch.ones(1, 6)
    got = B.binary_linear(B.pack_bits(a), B.pack_bits(w), 6)
    assert int(got) == 1 + 1 + 1 - 1 - 1 + 1
    assert torch.equal(B.unpack_bits(B.pack_bits(a), 6), B.signs(a))


def test_gemm_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="bytes per row"):
        B.binary_linear(B.pack_bits(torch.randn(2, 64)), B.pack_bits(torch.randn(2, 128)), 64)
    with pytest.raises(ValueError, match="k does not fit"):
        B.binary_linear(B.pack_bits(torch.randn(2, 64)), B.pack_bits(torch.randn(2, 64)), 65)
    with pytest.raises(ValueError, match="threshold"):
        B.binary_linear(
            B.pack_bits(torch.randn(2, 64)), B.pack_bits(torch.randn(2, 64)), 64, out="bits"
        )


# ----------------------------------------------------------------------------------------------
# Epilogues


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_float_int8_and_bit_epilogues(isa: str, threads: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    m, k = 23, 300
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    ab, wb = B.pack_bits(a), B.pack_bits(w)
    sa, sw = B.signs(a), B.signs(w)
    scale = torch.randn(n, generator=gen)
    bias = torch.randn(n, generator=gen) * 5
    for out in ("float", "int8"):
        got = B.binary_linear(ab, wb, k, out=out, scale=scale, bias=bias)
        ref = B.binary_linear_reference(sa, sw, out=out, scale=scale, bias=bias)
        assert torch.equal(got, ref), out
    thr = torch.randint(-40, 40, (n,), generator=gen, dtype=torch.int32)
    flip = torch.rand(n, generator=gen) < 0.5
    got = B.binary_linear(ab, wb, k, out="bits", threshold=(thr, flip))
    assert got.shape == (m, B.packed_bytes(n))
    ref = B.binary_linear_reference(sa, sw, out="bits", threshold=(thr, flip))
    assert torch.equal(B.unpack_bits(got, n), ref)
    # Padding bits past N stay 0, so the output is a valid packed input for the next layer.
    raw = np.unpackbits(got.numpy(), axis=1, bitorder="little")
    assert not raw[:, n:].any()


def test_threshold_epilogue_equals_float_batchnorm_and_sign(isa: str) -> None:
    gen = torch.Generator().manual_seed(7)
    m, n, k = 200, 96, 129
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) * 3
    bn = nn.BatchNorm1d(n).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-15, 15, generator=gen)
        bn.running_var.uniform_(0.5, 40, generator=gen)
        bn.weight.uniform_(-1, 1, generator=gen)  # negative scales flip the comparison
        bn.weight[:4] = 0.0  # constant channels: sign(beta)
        bn.bias.uniform_(-1, 1, generator=gen)
    act = nn.Hardtanh()

    def fn(d: torch.Tensor) -> torch.Tensor:
        return act(bn(d + bias))

    thr, flip = B.fold_threshold(fn, k, n)
    assert bool(flip.any()) and not bool(flip.all())
    got = B.binary_linear(B.pack_bits(a), B.pack_bits(w), k, out="bits", threshold=(thr, flip))
    with torch.no_grad():
        y = TF.linear(B.signs(a).float(), B.signs(w).float(), bias)
        expected = B.signs(act(bn(y)))
    assert torch.equal(B.unpack_bits(got, n), expected)


def test_fold_threshold_rejects_non_monotone_functions() -> None:
    with pytest.raises(B.NotMonotoneError):
        B.fold_threshold(lambda d: d.abs() - 3, 10, 2)


# ----------------------------------------------------------------------------------------------
# Convolution


CONV_CASES = [
    # (C, N, H, W, kernel, stride, padding, dilation)
    (1, 3, 5, 5, 3, 1, 1, 1),
    (63, 5, 7, 9, 3, 1, 1, 1),
    (64, 4, 6, 5, 3, 2, 1, 1),
    (65, 7, 9, 7, (3, 2), (2, 1), (2, 0), (1, 2)),
    (130, 2, 5, 6, 1, 1, 0, 1),
    (20, 6, 11, 8, 5, 2, 2, 2),
    (9, 3, 4, 4, 3, 1, 3, 1),  # padding larger than the kernel reach: some rows all padding
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_with_exact_zero_padding_matches_float64_conv(isa: str, case: tuple) -> None:  # type: ignore[type-arg]
    c, n, h, w, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(c * 31 + n)
    kh, kw = B._pair(kernel)
    x, wt = _pm1((2, c, h, w), gen), _pm1((n, c, kh, kw), gen)
    expected = B.binary_conv2d_reference(x, wt, stride, padding, dilation)
    corr = B.zero_padding_correction(wt, h, w, stride, padding, dilation)
    got = B.binary_conv2d(
        B.pack_conv_input(x),
        B.pack_conv_weight(wt),
        c,
        kernel,
        stride,
        padding,
        dilation,
        corr=corr,
    )
    assert torch.equal(got.permute(0, 3, 1, 2).long(), expected)
    # Without the correction the padding acts as +1 ("same-one" padding).
    ph, pw = B._pair(padding)
    plus = TF.pad(x, (pw, pw, ph, ph), value=1.0)
    same_one = B.binary_conv2d(
        B.pack_conv_input(x), B.pack_conv_weight(wt), c, kernel, stride, padding, dilation
    )
    assert torch.equal(
        same_one.permute(0, 3, 1, 2).long(),
        B.binary_conv2d_reference(plus, wt, stride, 0, dilation),
    )


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_packed_conv_module_threads_and_outputs(isa: str, threads: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x, wt = torch.randn(3, 70, 9, 11, generator=gen), torch.randn(20, 70, 3, 3, generator=gen)
    bias = torch.randn(20, generator=gen)
    conv = B.PackedBinaryConv2d(wt, 2, 1, 1, bias=bias, out="float")
    expected = TF.conv2d(B.signs(x).double(), B.signs(wt).double(), stride=2, padding=1)
    got = conv(x)
    assert got.shape == expected.shape
    assert torch.equal(got, (expected.float() + bias[:, None, None]))


# ----------------------------------------------------------------------------------------------
# Max-pool on bits


@pytest.mark.parametrize(
    ("c", "h", "w", "kernel", "stride", "padding"),
    [(70, 9, 7, 2, 2, 0), (5, 8, 8, 3, 2, 1), (64, 5, 6, (3, 2), (1, 2), (1, 0))],
)
def test_maxpool_on_bits_matches_torch(
    isa: str, c: int, h: int, w: int, kernel, stride, padding
) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(c)
    x = _pm1((2, c, h, w), gen)
    expected = TF.max_pool2d(x, kernel, stride, padding)
    got = B.binary_maxpool2d(B.pack_conv_input(x), kernel, stride, padding)
    assert torch.equal(B.unpack_bits(got, c).permute(0, 3, 1, 2).float(), expected)
    # Channels in or_mask pool with OR of the sign bits: the min of ±1.
    mask_bits = np.zeros(B.packed_bytes(c) * 8, dtype=np.uint8)
    mask_bits[:c:2] = 1
    mask = torch.from_numpy(np.packbits(mask_bits, bitorder="little"))
    got = B.unpack_bits(B.binary_maxpool2d(B.pack_conv_input(x), kernel, stride, padding, mask), c)
    mixed = expected.clone()
    mixed[:, ::2] = -TF.max_pool2d(-x, kernel, stride, padding)[:, ::2]
    assert torch.equal(got.permute(0, 3, 1, 2).float(), mixed)


# ----------------------------------------------------------------------------------------------
# 8-bit first layer


@pytest.mark.parametrize("signed", [False, True])
def test_bitplane_linear_matches_bnn_reference(isa: str, signed: bool) -> None:
    from lowbit.methods.bnn import bitplane_linear as bnn_bitplane

    gen = torch.Generator().manual_seed(int(signed))
    k, n = 200, 33
    x = torch.randint(-128 if signed else 0, 128 if signed else 256, (9, k), generator=gen)
    w = _pm1((n, k), gen)
    got = B.bitplane_linear(x, B.pack_bits(w), k, signed=signed)
    assert torch.equal(got, bnn_bitplane(x, w, signed=signed))
    assert torch.equal(got, x @ w.long().T)


# ----------------------------------------------------------------------------------------------
# Whole models


def _randomize_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if mod.running_mean is not None:  # (not for batch-statistics norms)
                    mod.running_mean.uniform_(-20, 20, generator=gen)
                    mod.running_var.uniform_(1, 50, generator=gen)
                mod.weight.uniform_(-1, 1, generator=gen)
                mod.bias.uniform_(-1, 1, generator=gen)
            elif isinstance(getattr(mod, "bias", None), torch.Tensor):
                mod.bias.uniform_(-3, 3, generator=gen)  # type: ignore[operator]


def test_pack_bnn_mlp_predicts_exactly_like_the_simulated_model() -> None:
    import lowbit
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    model = MLP(widths=(96, 130, 70), act="hardtanh", bn_output=True)
    model = lowbit.quantize(model, "bnn")
    _randomize_bn(model, 1)
    model.eval()
    packed = B.pack_bnn(model)
    kinds = [m.out_kind for m in packed if isinstance(m, B.PackedBinaryLinear)]
    assert kinds == ["bits", "float"]
    x = torch.randn(300, 1, 28, 28)
    with torch.no_grad():
        ref, got = model(x), packed(x)
        # The bits between the binary layers are exactly the simulated sign activations.
        net = model.net
        h = net.act1(net.bn1(net.fc1(net.act0(net.bn0(net.fc0(net.flatten(x)))))))
        bits = packed[4](packed[3](packed[2](packed[1](packed[0](x)))))
    assert torch.equal(B.unpack_bits(bits, 130), B.signs(h))
    assert torch.equal(ref.argmax(1), got.argmax(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_pack_bnn_convnet_predicts_exactly_like_the_simulated_model() -> None:
    import lowbit
    from lowbit.models.convnet import ConvNet

    torch.manual_seed(0)
    model = ConvNet(input_shape=(3, 12, 12), width=8, fc=40, act="hardtanh")
    model = lowbit.quantize(
        model, "bnn", keep=(), overrides={"features.conv0": {"activations": "float"}}
    )
    _randomize_bn(model, 2)
    model.eval()
    packed = B.pack_bnn(model)
    assert sum(isinstance(m, B.BinaryMaxPool2d) for m in packed) == 3
    assert sum(isinstance(m, B.PackedBinaryConv2d) for m in packed) == 5
    x = torch.randn(100, 3, 12, 12)
    with torch.no_grad():
        ref, got = model(x), packed(x)
    assert torch.equal(ref.argmax(1), got.argmax(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_custom_ops_have_working_fake_implementations() -> None:
    gen = torch.Generator().manual_seed(0)
    a, w = (
        B.pack_bits(torch.randn(3, 100, generator=gen)),
        B.pack_weights(torch.randn(70, 100, generator=gen)),
    )
    thr, flip = torch.zeros(70, dtype=torch.int32), torch.zeros(70, dtype=torch.uint8)
    for kind, extra in ((0, (None, None)), (3, (thr, flip))):
        torch.library.opcheck(
            torch.ops.lowbit.binary_linear.default,
            (a, w, 70, 100, None, None, None, *extra, kind),
            test_utils=("test_schema", "test_faketensor"),
        )
    xb = B.pack_conv_input(torch.randn(1, 5, 6, 6, generator=gen))
    torch.library.opcheck(
        torch.ops.lowbit.binary_im2col.default,
        (xb, [3, 3, 1, 1, 1, 1, 1, 1]),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.lowbit.binary_maxpool2d.default,
        (xb, [2, 2, 2, 2, 0, 0], torch.zeros(8, dtype=torch.uint8)),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_single_layer_route_matches_quant_layers(isa: str) -> None:
    # What lowbit.pack can use per layer: float in, float(d) + bias out, structure unchanged.
    import lowbit

    torch.manual_seed(0)
    lin = lowbit.quantize(
        nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 70), nn.Linear(70, 5)), "bnn", keep=()
    )[1]
    w, s = B.binary_layer_weight(lin)
    packed = B.PackedBinaryLinear(w, bias=lin.bias, scale=s)
    x = torch.randn(7, 30)
    x[0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    with torch.no_grad():
        assert torch.equal(lin(x), packed(x))
    conv = lowbit.quantize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.Conv2d(16, 4, 3)
        ),
        "bnn",
        keep=(),
    )[1]
    w, s = B.binary_layer_weight(conv)
    pc = B.PackedBinaryConv2d(w, conv.stride, conv.padding, conv.dilation, bias=conv.bias, scale=s)
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        # The packed layer adds the bias once to the exact integer dot product. PyTorch's float
        # convolution may start its accumulation from the bias (oneDNN does on AVX2-only CPUs),
        # which rounds differently by an ulp; so the reference is the bias-free convolution of
        # the ±1 tensors (sums of ±1 are exact in fp32) plus the bias, and the Quant layer
        # itself agrees to fp32 rounding.
        sx = torch.where(x < 0, -1.0, 1.0)
        sw = torch.where(conv.weight < 0, -1.0, 1.0)
        exact = torch.nn.functional.conv2d(sx, sw, None, conv.stride, conv.padding, conv.dilation)
        out = pc(x)
        assert torch.equal(exact + conv.bias.view(1, -1, 1, 1), out)
        torch.testing.assert_close(conv(x), out, rtol=0, atol=1e-5)


def test_packed_model_exports_through_the_custom_ops() -> None:
    import lowbit
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    model = lowbit.quantize(MLP(widths=(40, 70, 30), act="hardtanh", bn_output=True), "bnn")
    _randomize_bn(model, 3)
    packed = B.pack_bnn(model.eval())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        exported = torch.export.export(packed, (x,))
        assert torch.equal(exported.module()(x), packed(x))


def test_fresh_packed_conv_with_padding_exports_before_any_eager_call() -> None:
    """The zero-padding correction is cached by the first eager call; a fresh (or just loaded)
    model under export must compute it from the traced buffers instead of NumPy."""
    import lowbit
    from lowbit.models.convnet import ConvNet

    torch.manual_seed(1)
    model = lowbit.quantize(ConvNet(input_shape=(3, 8, 8), width=8, fc=16, act="hardtanh"), "bnn")
    _randomize_bn(model, 4)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = B.pack_bnn(model)(x)
        fresh = B.pack_bnn(model)
        assert any(isinstance(m, B.PackedBinaryConv2d) and m.padding != (0, 0) for m in fresh)
        assert torch.equal(torch.export.export(fresh, (x,)).module()(x), expected)


def test_batch_statistics_norms_are_not_folded_and_inputs_of_any_batch_shape() -> None:
    import lowbit

    torch.manual_seed(2)
    hard = torch.nn.Hardtanh
    model = torch.nn.Sequential(
        torch.nn.Linear(31, 64),
        torch.nn.BatchNorm1d(64, track_running_stats=False),  # batch statistics at inference
        hard(),
        torch.nn.Linear(64, 65),
        torch.nn.BatchNorm1d(65),
        hard(),
        torch.nn.Linear(65, 10),
    )
    lowbit.quantize(model, "bnn", keep=("last",))
    _randomize_bn(model, 6)
    model.eval()
    packed = lowbit.pack(model, xnor=True)
    assert packed[0].out_kind == "float"  # the BN cannot become a threshold: it runs as is
    assert isinstance(packed[1], torch.nn.BatchNorm1d)
    x = torch.randn(500, 31) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=0, atol=1e-4)
    # leading batch dimensions and empty batches behave as in the simulated model
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), hard(),
        torch.nn.Linear(32, 24), torch.nn.BatchNorm1d(24), hard(), torch.nn.Linear(24, 10),
    )  # fmt: skip
    lowbit.quantize(mlp, "bnn", keep=())
    _randomize_bn(mlp, 7)
    mlp.eval()
    pm = lowbit.pack(mlp, xnor=True)
    assert [m.out_kind for m in pm] == ["bits", "bits", "float"]
    x3 = torch.randn(5, 3, 16)
    with torch.no_grad():
        expected = mlp(x3.reshape(15, 16)).reshape(5, 3, 10)
    torch.testing.assert_close(pm(x3), expected, rtol=0, atol=1e-4)
    assert pm(torch.randn(0, 16)).shape == (0, 10)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), hard(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), hard(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16, 10),
    )  # fmt: skip
    lowbit.quantize(conv, "bnn", keep=())
    conv.eval()
    with pytest.raises(ValueError, match=r"set model.input_shape = \(C, H, W\)"):
        lowbit.pack(conv, xnor=True)
    conv.input_shape = (3, 4, 4)
    assert lowbit.pack(conv, xnor=True)(torch.randn(0, 3, 4, 4)).shape == (0, 10)


def test_shift_batchnorm_folds_into_thresholds() -> None:
    import lowbit
    from lowbit.methods import bnn

    torch.manual_seed(3)
    hard = torch.nn.Hardtanh
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), hard(),
        torch.nn.Linear(32, 24), torch.nn.BatchNorm1d(24), hard(), torch.nn.Linear(24, 10),
    )  # fmt: skip
    lowbit.quantize(model, "bnn", keep=())
    bnn.use_shift_batchnorm(model)
    model.train()
    for _ in range(5):
        model(torch.randn(64, 16) * 2)  # running statistics of their own
    model.eval()
    packed = lowbit.pack(model, xnor=True)
    assert [m.out_kind for m in packed] == ["bits", "bits", "float"]  # both norms folded
    x = torch.randn(300, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=0, atol=1e-4)


def test_kept_layers_say_why_they_are_not_binary() -> None:
    import lowbit

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Hardtanh(),
        torch.nn.Linear(16, 4),
    )  # fmt: skip
    lowbit.quantize(model, "bnn", keep=(), overrides={"0": {"activations": "float"}})
    report = lowbit.pack(model.eval(), xnor=True, strict=False).packing_report
    assert report["0"] == (
        "kept as QuantLinear: its inputs are float, not binarized (XNOR needs ±1 inputs and weights)"
    )


def test_lowbit_pack_xnor_gives_the_fully_binary_chain() -> None:
    import lowbit
    from lowbit.models.mlp import MLP

    torch.manual_seed(4)
    model = lowbit.quantize(MLP(widths=(64, 64, 64), act="hardtanh", bn_output=True), "bnn")
    _randomize_bn(model, 5)
    model.eval()
    packed = lowbit.pack(model, xnor=True)
    assert any(isinstance(m, B.PackedBinaryLinear) and m.out_kind == "bits" for m in packed)
    x = torch.randn(200, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(packed(x).argmax(1), model(x).argmax(1))


# ----------------------------------------------------------------------------------------------
# The modules' eager hot path (one C++ call per layer) and its fallbacks


@pytest.mark.parametrize("out", ["int32", "float", "int8", "bits"])
def test_linear_module_inputs_of_every_kind_match_the_reference(isa: str, out: str) -> None:
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(70, 100, generator=gen)
    scale, bias = torch.rand(70, generator=gen) + 0.5, torch.randn(70, generator=gen) * 10
    thr = (torch.randint(-20, 20, (70,), generator=gen, dtype=torch.int32), torch.rand(70) < 0.5)
    eps = {"scale": scale, "bias": bias} if out in ("float", "int8") else {}
    threshold = thr if out == "bits" else None
    layer = B.PackedBinaryLinear(w, threshold=threshold, out=out, **eps)
    bits_layer = B.PackedBinaryLinear(w, threshold=threshold, out=out, input="bits", **eps)

    def ref(x: torch.Tensor) -> torch.Tensor:
        y = B.binary_linear_reference(
            B.signs(x.reshape(-1, 100)), B.signs(w), out=out, threshold=threshold, **eps
        )
        if out == "bits":
            return y
        return y.reshape(*x.shape[:-1], 70)

    def check(got: torch.Tensor, x: torch.Tensor) -> None:
        expected = ref(x)
        if out == "bits":
            got = B.unpack_bits(got.reshape(-1, got.shape[-1]), 70)
        elif out == "int32":
            got = got.long()
        assert torch.equal(got, expected)

    x = torch.randn(6, 100, generator=gen)
    x[0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    for xin in (
        x,  # the fast path
        x.reshape(2, 3, 100),  # leading dimensions
        x[0],  # one sample, no batch dimension
        x.double(),  # another dtype: general path
        x.clone().requires_grad_(),  # needs grad: general path
        torch.randn(100, 6, generator=gen).T,  # not contiguous
    ):
        with torch.no_grad():
            check(layer(xin), xin.detach().float())
    check(layer(x.clone().requires_grad_()), x)  # grad mode on
    packed = B.pack_bits(x)
    check(bits_layer(packed), x)
    wide = torch.zeros(6, 2 * packed.shape[1], dtype=torch.uint8)
    wide[:, ::2] = packed
    check(bits_layer(wide[:, ::2]), x)  # strided bits: general path
    with pytest.raises(ValueError, match="bytes per row"):
        bits_layer(torch.zeros(6, 24, dtype=torch.uint8))
    with pytest.raises(ValueError, match="100"):
        layer(torch.randn(6, 99))
    with pytest.raises(TypeError):
        bits_layer(x)  # floats into a layer that takes packed bits


def test_plan_follows_replaced_and_reloaded_buffers() -> None:
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(40, 130, generator=gen)
    x = torch.randn(5, 130, generator=gen)
    flip = torch.zeros(40, dtype=torch.bool)
    layer = B.PackedBinaryLinear(
        w, threshold=(torch.zeros(40, dtype=torch.int32), flip), out="bits"
    )

    def expected(thr: torch.Tensor, weight: torch.Tensor = w) -> torch.Tensor:
        return B.binary_linear_reference(
            B.signs(x), B.signs(weight), out="bits", threshold=(thr, flip)
        )

    assert torch.equal(B.unpack_bits(layer(x), 40), expected(torch.zeros(40, dtype=torch.int32)))
    thr = torch.randint(-30, 30, (40,), generator=gen, dtype=torch.int32)
    layer.thr = thr.clone()  # a new buffer: the cached plan is rebuilt
    assert torch.equal(B.unpack_bits(layer(x), 40), expected(thr))
    w2 = torch.randn(40, 130, generator=gen)
    other = B.PackedBinaryLinear(w2, threshold=(thr, flip), out="bits")
    layer.load_state_dict(other.state_dict())
    assert torch.equal(B.unpack_bits(layer(x), 40), expected(thr, w2))
    twin = copy.deepcopy(layer).float()
    del layer  # the copy owns its buffers
    assert torch.equal(B.unpack_bits(twin(x), 40), expected(thr, w2))


def test_conv_module_fallbacks_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(13)
    wt = torch.randn(9, 20, 3, 3, generator=gen)
    conv = B.PackedBinaryConv2d(wt, 1, 1, out="int32")
    x = torch.randn(2, 20, 7, 6, generator=gen)
    expected = B.binary_conv2d_reference(B.signs(x), B.signs(wt), 1, 1)
    for xin in (x, x.double(), x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(conv(xin).long(), expected)
    bits = B.PackedBinaryConv2d(wt, 1, 1, out="int32", input="bits")
    xb = B.pack_conv_input(x)
    assert torch.equal(bits(xb).long(), expected)
    assert torch.equal(
        bits(xb.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)).long(), expected
    )
    with pytest.raises(ValueError, match="bytes per pixel"):
        bits(torch.zeros(2, 7, 6, 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Bit-plane first layer in pack_bnn (QNN §2.5)


@pytest.mark.parametrize(
    ("activations", "bits", "signed"), [("uint8", 8, False), ("int4", 4, True)]
)
def test_pack_bnn_runs_a_k_bit_first_layer_exactly_over_bit_planes(
    activations: str, bits: int, signed: bool
) -> None:
    import lowbit
    from lowbit.methods.bnn import bitplane_linear as bnn_bitplane_linear
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    model = lowbit.quantize(
        MLP(widths=(96, 130, 70), act="hardtanh", bn_output=True),
        "bnn",
        keep=("last",),
        overrides={"net.fc0": {"activations": activations}},
    )
    _randomize_bn(model, 6)
    model.eval()
    fc0 = model.net.fc0
    assert B.is_bitplane_layer(fc0) and not B.is_binary_layer(fc0)
    packed = B.pack_bnn(model)
    first = packed[1]
    assert isinstance(first, B.PackedBitplaneLinear) and first.act_bits == bits
    x = torch.rand(400, 1, 28, 28) * 2 - (1 if signed else 0)
    flat = x.reshape(400, -1)
    with torch.no_grad():
        # The integer dot products are exact: the simulated quantizer's codes times the ±1 codes.
        step = fc0.input_quantizer.spec().scale
        q = torch.round(fc0.input_quantizer(flat) / step).to(torch.int64)
        codes = fc0.quantized_weight().codes.to(torch.int64)
        assert torch.equal(first.codes(flat).to(torch.int64), q)
        dots = first.dots(q)
        assert torch.equal(dots, q @ codes.T)
        assert torch.equal(dots, bnn_bitplane_linear(q, codes, bits, signed))
        # The float output is the simulated layer's up to fp32 rounding of F.linear's sum.
        torch.testing.assert_close(first(flat), fc0(flat), rtol=1e-6, atol=1e-4)
        ref, got = model(x), packed(x)
        net = model.net
        h = net.act1(net.bn1(net.fc1(net.act0(net.bn0(net.fc0(flat))))))
        bits_out = packed[:5](x)
    assert torch.equal(B.unpack_bits(bits_out, 130), B.signs(h))
    assert torch.equal(ref.argmax(1), got.argmax(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert not any(
        isinstance(m, B.PackedBitplaneLinear) for m in B.pack_bnn(model, bitplanes=False)
    )
    if not signed:  # the traced path (custom ops) gives the same bits and floats
        with torch.no_grad():
            exported = torch.export.export(packed, (x[:5],))
            assert torch.equal(exported.module()(x[:5]), packed(x[:5]))


def test_bitplane_layer_with_channel_scales_matches_float64() -> None:
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(33, 70, generator=gen)
    wscale = torch.rand(33, generator=gen) + 0.1
    bias = torch.randn(33, generator=gen)
    layer = B.PackedBitplaneLinear(
        w, act_bits=8, act_signed=False, act_clip=1.0, wscale=wscale, bias=bias
    )
    x = torch.rand(2, 3, 70, generator=gen) * 1.2 - 0.1  # values outside [0, 1] saturate
    q = torch.round(x / (1.0 / 255)).clamp(0, 255).to(torch.int64)
    exact = (q @ B.signs(w).T).to(torch.float64) * (1.0 / 255) * wscale.double() + bias.double()
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-6, atol=1e-5)
    assert torch.equal(layer.dots(q.reshape(-1, 70)), q.reshape(-1, 70) @ B.signs(w).T)


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize(
    ("m", "k", "n", "bits", "signed"),
    [
        (1, 1, 1, 8, False),
        (33, 7, 9, 8, True),
        (70, 65, 70, 5, False),
        (5, 200, 130, 8, True),
        (40, 784, 24, 3, True),
    ],
)
def test_bitplane_kernel_is_exact_on_every_isa(
    isa: str, threads: int, m: int, k: int, n: int, bits: int, signed: bool
) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(n, k, generator=gen)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    q = torch.randint(lo, hi + 1, (m, k), generator=gen)
    q[0, : min(k, 3)] = torch.tensor([lo, hi, 0])[: min(k, 3)]  # the extremes, two's complement
    layer = B.PackedBitplaneLinear(w, act_bits=bits, act_signed=signed)
    expected = q @ B.signs(w).T
    assert torch.equal(layer.dots(q), expected)
    # Through the layer's own quantizer (signed codes are narrow: -128 clamps to -127).
    qn = q.clamp(layer.lo, layer.hi)
    y = layer(qn.float() * layer.step)
    exact = (qn @ B.signs(w).T).double() * layer.step
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-6)
