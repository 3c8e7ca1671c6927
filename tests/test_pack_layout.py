"""PackedLinear buffer layout 2 (docs/format.md): scales stored at the QuantizedWeight's own
granularity, 1-bit signs for binary weights, unpadded bias; hand-computed tensor byte counts;
pack -> save -> load against float64 references; files in layout 1 still load."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.pack import PackedLinear
from lowbit.qtypes import QuantizedWeight

EPS32 = float(np.finfo(np.float32).eps)
N, K = 37, 203  # kp = 208 (13 tiles of 16 k), 3 row blocks, 4 64-bit words per binary row


def _qweight(fmt: str, gran: str, seed: int = 0, group: int | None = None) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    if fmt == "binary":
        codes = torch.randint(0, 2, (N, K), generator=g) * 2 - 1
        bits = 1
    elif fmt == "kbit_linear":
        codes = torch.randint(-4, 4, (N, K), generator=g)
        bits = 3
    else:
        codes = torch.randint(-1, 2, (N, K), generator=g)
        bits = 2
    shape: tuple[int, ...] = {"tensor": (1,), "channel": (N,)}.get(gran, (N, -(-K // (group or 1))))
    if fmt == "ternary_asym":
        shape = (*shape, 2)
    scales = torch.rand(shape, generator=g) * 0.5 + 0.05
    if gran == "fixed8":  # groups whose scales are m * 2^E (FGQ scale_bits=8), E per row
        gran = "group"
        m = torch.randint(1, 256, shape, generator=g).to(torch.float64)
        m[:, 0] = 255  # each row's largest scale sets its exponent
        e = torch.randint(-12, 3, (N, 1), generator=g).to(torch.float64)
        scales = (m * torch.exp2(e)).to(torch.float32)
    axis = "in" if gran == "group" else None
    return QuantizedWeight(codes.to(torch.int8), scales, fmt, bits, gran, group, axis)


def _dequantized(qw: QuantizedWeight) -> np.ndarray:
    """float64 weights built from the codes and scales by hand (not QuantizedWeight.dequantize)."""
    c = qw.codes.to(torch.float64).numpy()
    s = qw.scales.to(torch.float64).numpy()
    if qw.format == "ternary_asym":
        s = s.reshape(-1, 2)
        wp, wn = s[:, :1], s[:, 1:]
        return np.where(c > 0, wp, np.where(c < 0, -wn, 0.0)) * np.ones_like(c)
    if qw.granularity == "group":
        return c * np.repeat(s, qw.group_size, axis=1)[:, :K]
    return c * s.reshape(-1, 1)


# (format, granularity, group, tensors the layer saves with their hand-computed byte counts)
TILES2 = 3 * 13 * 64  # 3 row blocks x 13 tiles x 64 bytes
TILES4 = 3 * 26 * 64  # 4-bit: 8 k per tile
CASES = [
    ("ternary", "tensor", None, {"tiles": TILES2, "wscale": 4, "bias": 4 * N}),
    ("ternary", "channel", None, {"tiles": TILES2, "wscale": 4 * N, "bias": 4 * N}),
    ("ternary", "group", 4, {"tiles": TILES2, "wscale": 4 * N * 51, "bias": 4 * N}),
    (
        "ternary",
        "fixed8",
        4,
        {"tiles": TILES2, "wscale_m": N * 51, "wscale_e": 2 * N, "bias": 4 * N},
    ),
    ("ternary_asym", "tensor", None, {"tiles": TILES2, "wscale": 8, "bias": 4 * N}),
    ("ternary_asym", "channel", None, {"tiles": TILES2, "wscale": 8 * N, "bias": 4 * N}),
    ("binary", "tensor", None, {"signs": N * 32, "wscale": 4, "bias": 4 * N}),
    ("binary", "channel", None, {"signs": N * 32, "wscale": 4 * N, "bias": 4 * N}),
    ("kbit_linear", "tensor", None, {"tiles": TILES4, "wscale": 4, "bias": 4 * N}),
]


def _data_bytes(path: Path) -> int:
    """Bytes of the tensor data section: file size - 8 - header length (docs/format.md)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - n


@pytest.mark.parametrize(("fmt", "gran", "group", "sizes"), CASES)
@pytest.mark.parametrize("act", ["int8", "float"])
def test_pack_save_load_matches_reference_and_byte_counts(
    tmp_path: Path, fmt: str, gran: str, group: int | None, sizes: dict[str, int], act: str
) -> None:
    qw = _qweight(fmt, gran, group=group)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3))
    layer = PackedLinear(qw, bias, activations=act)
    saved = {k: v.numel() * v.element_size() for k, v in layer.state_dict().items()}
    assert saved == sizes
    assert (layer.config().get("scale_format") == "fixed8") == (gran == "fixed8")
    path = tmp_path / "m.lowbit"
    lowbit.save(nn.Sequential(layer), path)
    assert _data_bytes(path) == sum(sizes.values())
    loaded = lowbit.load(path)
    assert isinstance(loaded[0], PackedLinear) and loaded[0].layout == 2
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(4))
    got = loaded(x)
    assert torch.equal(got, layer(x))  # the same kernel arrays after the round trip
    if act == "int8":
        q, a_inv = kernels.quantize_activations_reference(x)
        xq = q.double().numpy() * a_inv.double().numpy()[:, None]
    else:
        xq = x.double().numpy()
    w = _dequantized(qw)
    expected = xq @ w.T + bias.double().numpy()
    groups = w.shape[1] // (group or K) + 1
    tol = (groups + 6) * EPS32 * (np.abs(xq).sum(1, keepdims=True) * np.abs(w).max() * 3 + 1)
    assert (np.abs(got.double().numpy() - expected) <= tol).all()


def test_signs_are_the_binary_row_layout(tmp_path: Path) -> None:
    qw = _qweight("binary", "tensor", seed=5)
    layer = PackedLinear(qw, None)
    signs = layer.state_dict()["signs"].numpy()
    np.testing.assert_array_equal(signs, kernels.pack_signs_reference(qw.codes.numpy()))
    # Padding bits are ignored on read: set them and the weights do not change.
    sd = layer.state_dict()
    sd["signs"] = sd["signs"].clone()
    sd["signs"][:, -1] |= 0xF0  # bits 204..207 of 256 lie past K = 203
    other = PackedLinear.from_config(layer.config())
    other.load_state_dict(sd)
    assert torch.equal(other.tiles, layer.tiles)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(K, N), nn.BatchNorm1d(N), nn.ReLU(), nn.Linear(N, 24), nn.BatchNorm1d(24)
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize("method", ["ttq", "lat2", "bnn", "twn"])
def test_folded_batchnorm_keeps_per_tensor_scales(tmp_path: Path, method: str) -> None:
    sim = lowbit.quantize(_mlp(), method, keep=[]).eval()
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sim(x)  # initialises lazily set scales where a method has them
        expected = sim(x).double()
    packed = lowbit.pack(sim, activations="float")
    path = tmp_path / f"{method}.lowbit"
    lowbit.save(packed, path)
    loaded = lowbit.load(path)
    layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2
    total = 0
    for layer in layers:
        n, k = layer.out_features, layer.in_features
        sd = layer.state_dict()
        qw_per_tensor = tuple(sd["wscale"].shape) in ((1,), (2,))
        if qw_per_tensor:
            assert sd["row_scale"].shape == (n,)  # the folded BatchNorm, once per row
        weights = (
            n * 8 * -(-k // 64) if method == "bnn" else -(-n // 16) * -(-k // 16) * 64
        )  # 1-bit signs / 2-bit tiles
        assert sum(v.numel() * v.element_size() for v in sd.values()) == (
            weights + 4 * sd["wscale"].numel() + 4 * n * (1 + qw_per_tensor)
        )
        total += sum(v.numel() * v.element_size() for v in sd.values())
    assert _data_bytes(path) == total  # nothing else in this model
    with torch.no_grad():
        got = loaded(x).double()
    scale = expected.abs().max().item() + 1.0
    assert (got - expected).abs().max().item() <= 1e-4 * scale


def _legacy(layer: PackedLinear, qw: QuantizedWeight, bias: torch.Tensor) -> PackedLinear:
    """The same layer in layout 1 (files written before layout 2), buffers built by hand."""
    cfg = {
        k: v
        for k, v in layer.config().items()
        if k not in ("layout", "scale_shape", "has_row_scale")
    }
    old = PackedLinear.from_config(cfg)
    assert old.layout == 1
    np_ = 48
    s = qw.scales.double().reshape(-1, 2).expand(N, 2) if qw.format == "ternary_asym" else None
    with torch.no_grad():
        old.tiles.copy_(torch.from_numpy(kernels.pack_ternary_reference(qw.codes.numpy())))
        scale = torch.zeros(np_)
        if s is not None:
            scale[:N] = s[:, 1].float()
            assert old.scale2 is not None
            old.scale2.zero_()
            old.scale2[:N] = (s[:, 0] - s[:, 1]).float()
        else:
            scale[:N] = qw.scales.reshape(-1).float()
        old.scale.copy_(scale)
        assert old.bias is not None
        old.bias.zero_()
        old.bias[:N] = bias
    return old


@pytest.mark.parametrize("fmt", ["ternary", "ternary_asym"])
def test_layout_1_files_still_load(tmp_path: Path, fmt: str) -> None:
    qw = _qweight(fmt, "channel", seed=7)
    bias = torch.randn(N)
    old = _legacy(PackedLinear(qw, bias), qw, bias)
    path = tmp_path / "old.lowbit"
    lowbit.save(nn.Sequential(old), path)
    assert set(old.state_dict()) == {"tiles", "scale", "bias"} | (
        {"scale2"} if fmt == "ternary_asym" else set()
    )
    assert _data_bytes(path) == TILES2 + 4 * 48 * (3 if fmt == "ternary_asym" else 2)
    loaded = lowbit.load(path)
    assert loaded[0].layout == 1
    x = torch.randn(5, K)
    q, a_inv = kernels.quantize_activations_reference(x)
    xq = q.double().numpy() * a_inv.double().numpy()[:, None]
    w = _dequantized(qw)
    expected = xq @ w.T + bias.double().numpy()
    tol = 8 * EPS32 * (np.abs(xq).sum(1, keepdims=True) * np.abs(w).max() * 3 + 1)
    assert (np.abs(loaded(x).double().numpy() - expected) <= tol).all()
    # Folding a BatchNorm into a layout-1 layer still works on its kernel arrays.
    bn = nn.BatchNorm1d(N).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
    ref = bn(loaded(x))
    loaded[0].fold_batchnorm(bn)
    assert torch.allclose(loaded[0](x), ref, rtol=1e-5, atol=1e-5)


def test_fixed8_scales_decode_exactly_and_bad_tensors_are_refused(tmp_path: Path) -> None:
    qw = _qweight("ternary", "fixed8", seed=11, group=4)
    layer = PackedLinear(qw, None)
    sd = layer.state_dict()
    m, e = sd["wscale_m"].double(), sd["wscale_e"].double()
    assert sd["wscale_m"].dtype == torch.uint8 and sd["wscale_e"].dtype == torch.int16
    # the stored bytes give back the quantizer's float32 scales exactly: m * 2^E
    assert torch.equal((m * torch.exp2(e)[:, None]).float(), qw.scales)
    assert (sd["wscale_m"].amax(1) == 255).all()  # each row's exponent is its largest scale's
    other = PackedLinear.from_config(layer.config())
    other.load_state_dict(sd)
    assert torch.equal(other.wscale, qw.scales) and torch.equal(other.scale, layer.scale)
    bad = dict(sd, wscale_e=sd["wscale_e"][:-1])
    with pytest.raises(RuntimeError, match="wscale_e"):
        PackedLinear.from_config(layer.config()).load_state_dict(bad)
    bad = dict(sd, wscale_e=torch.full_like(sd["wscale_e"], 300))
    with pytest.raises(RuntimeError, match=r"exponents must lie in \[-149, 104\]"):
        PackedLinear.from_config(layer.config()).load_state_dict(bad)
    with pytest.raises(ValueError, match="unknown scale_format 'fixed4'.*upgrade lowbit"):
        PackedLinear.from_config(dict(layer.config(), scale_format="fixed4"))
    # scales off the grid stay float32; editing packed scales off the grid refuses to save
    plain = PackedLinear(_qweight("ternary", "group", seed=11, group=4), None)
    assert "scale_format" not in plain.config() and "wscale" in plain.state_dict()
    with torch.no_grad():
        layer.wscale[0, 0] = 0.1
    with pytest.raises(ValueError, match="no longer on its 8-bit fixed-point grid"):
        layer.state_dict()


@pytest.mark.parametrize("weight_bits", [2, 4])
def test_fgq_fixed8_scales_fold_batchnorm_into_row_scale(tmp_path: Path, weight_bits: int) -> None:
    sim = lowbit.quantize(
        _mlp(), "fgq", keep=[], group_size=4, weight_bits=weight_bits, scale_bits=8, act_bits=None
    ).eval()
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = sim(x).double()
    packed = lowbit.pack(sim, activations="float")
    path = tmp_path / "fgq8.lowbit"
    lowbit.save(packed, path)
    loaded = lowbit.load(path)
    layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2
    for layer in layers:
        n, k = layer.out_features, layer.in_features
        sd = layer.state_dict()
        assert set(sd) == {"tiles", "wscale_m", "wscale_e", "row_scale", "bias"}
        groups = -(-k // 4)
        kp = -(-k // 16) * 16  # K padded to whole 16-weight tiles
        tiles = -(-n // 16) * (kp // 16 if weight_bits == 2 else kp // 8) * 64
        assert sum(v.numel() * v.element_size() for v in sd.values()) == (
            tiles + n * groups + 2 * n + 4 * n + 4 * n
        )
    with torch.no_grad():
        got = loaded(x).double()
    scale = expected.abs().max().item() + 1.0
    assert (got - expected).abs().max().item() <= 1e-4 * scale


def test_fgq_fixed8_unsigned_inputs_run_the_integer_path(tmp_path: Path) -> None:
    # The second layer sees ReLU outputs (unsigned 8-bit DFP) and has 8-bit group scales and a
    # BatchNorm folded into row_scale: its kernel gets the mantissas (int32 sums on AVX2) and
    # still matches the simulation, before and after a save/load.
    from lowbit import ptq

    sim = lowbit.quantize(_mlp(), "fgq", keep=[], group_size=4, scale_bits=8, act_mode="calibrated")
    calib = torch.randn(64, K, generator=torch.Generator().manual_seed(3))
    ptq.calibrate(sim, calib)
    sim.eval()
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = sim(x).double()
    packed = lowbit.pack(sim)
    path = tmp_path / "fgq8u.lowbit"
    lowbit.save(packed, path)
    for model in (packed, lowbit.load(path)):
        second = [m for m in model.modules() if isinstance(m, PackedLinear)][1]
        assert second._unsigned_fused() and second.row_scale is not None
        gscale_i, row_mult = second._group_mantissas()  # type: ignore[misc]
        m, e = second.state_dict()["wscale_m"], second.state_dict()["wscale_e"]
        # the mantissas are the saved bytes; the row multiplier is 2^E times the folded BN scale
        n, k = second.out_features, second.in_features
        layout, _ = kernels.pack_ternary_scales(m.double(), n, k, group_size=4)
        assert torch.equal((gscale_i & 0xFFFF).double(), layout.double())
        want = (torch.exp2(e.double()) * second.row_scale.double()).float()
        assert torch.equal(row_mult[: second.out_features], want)
        with torch.no_grad():
            got = model(x).double()
        assert (got - expected).abs().max().item() <= 1e-4 * (expected.abs().max().item() + 1.0)
