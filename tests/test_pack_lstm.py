"""PackedLSTM: QuantLSTM gate blocks on the packed kernels (float path = the simulation to fp32
rounding; int8 path = an independent float64 reference of the per-token int8 rule), and
QuantLSTM / PackedLSTM in .lowbit files (round trips, refusal of inconsistent manifests, size)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import models
from lowbit.nn import QuantLSTM
from lowbit.pack import LSTMGemm, PackedLSTM, PackingError
from lowbit.saveload import LowbitFileError, read_manifest

GATES = ("i", "f", "g", "o")
IN, HID = 6, 12  # neither a multiple of the 16-row / 16-k tiles

# (method, quantize options): ternary (LAT), asymmetric ternary (LAT2), 3-bit linear (LAQ).
METHODS = {
    "lat": {},
    "lat2": {},
    "laq3": {"bits": 3, "levels": "linear"},
}

CONFIGS = [
    {"num_layers": 1},
    {"num_layers": 2, "batch_first": True},
    {"num_layers": 1, "bidirectional": True, "bias": False},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
]


def _method(name: str) -> tuple[str, dict[str, Any]]:
    return ("laq" if name == "laq3" else name), METHODS[name]


def _quant_lstm(method: str, seed: int = 0, **kw: Any) -> QuantLSTM:
    torch.manual_seed(seed)
    lstm = nn.LSTM(IN, HID, **kw)
    with torch.no_grad():  # larger than the default init, so that the gates saturate sometimes
        for p in lstm.parameters():
            p.uniform_(-0.6, 0.6)
    name, opts = _method(method)
    q = lowbit.quantize(nn.Sequential(lstm), name, keep=(), **opts)[0]
    assert isinstance(q, QuantLSTM)
    return q.eval()


def _inputs(lstm: nn.LSTM, batch: int | None, steps: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randn(steps, IN, generator=g)
    shape = (batch, steps, IN) if lstm.batch_first else (steps, batch, IN)
    return torch.randn(shape, generator=g)


def _state(lstm: nn.LSTM, batch: int | None, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = lstm.num_layers * (2 if lstm.bidirectional else 1)
    shape = (n, HID) if batch is None else (n, batch, HID)
    return torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g)


def _packed(q: QuantLSTM, activations: str) -> PackedLSTM:
    model = lowbit.pack(nn.Sequential(q), activations=activations, strict=True)
    assert model.packing_report["0"].startswith("packed: PackedLSTM(")
    assert isinstance(model[0], PackedLSTM)
    return model[0]


def _run(m: nn.Module, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out, (h, c) = m(x, hx)
    return out, h, c


# ----------------------------------------------------------------------------------------------
# The float path equals the simulated QuantLSTM


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_float_path_equals_the_simulated_quant_lstm(method: str, cfg: dict[str, Any]) -> None:
    q = _quant_lstm(method, **cfg)
    packed = _packed(q, "float")
    for batch in (3, None):  # batched and unbatched
        x = _inputs(q, batch)
        for hx in (None, _state(q, batch)):
            want, got = _run(q, x, hx), _run(packed, x, hx)
            for w, g in zip(want, got, strict=True):
                assert g.shape == w.shape and g.dtype == torch.float32
                # fp32 summation order (and the folded b_ih + b_hh) only.
                torch.testing.assert_close(g, w, rtol=0, atol=2e-6)


def test_every_gate_block_keeps_its_own_scale() -> None:
    q = _quant_lstm("lat2", num_layers=1)
    packed = _packed(q, "float")
    qws = q.quantized_weights()
    for key in ("ih_l0", "hh_l0"):
        gemm = packed.gemm(key)
        assert gemm.gate_scales and gemm.weight_format == "ternary_asym"
        saved = gemm.state_dict()["wscale"]  # one [Wp, Wn] per gate block in the file
        assert saved.shape == (4, 2)
        want = torch.stack([qws[f"weight_{key}.{g}"].scales.reshape(2) for g in GATES])
        assert torch.equal(saved, want)
        assert len({tuple(r) for r in saved.tolist()}) == 4  # the 4 gates really differ


def test_per_row_gate_scales_and_mixed_inputs_qnn() -> None:
    # QNN: 4-bit weights scaled per unit (row) and uniform 4-bit inputs: the first input
    # projection runs on the input codes; hidden states stay float (exact path) or int8.
    torch.manual_seed(3)
    net = nn.Sequential(nn.LSTM(IN, HID, num_layers=2))
    q = lowbit.quantize(
        net, "qnn", keep=(), weight_bits=4, weight_scale="max", granularity="channel"
    )[0].eval()
    assert q.input_quantizer is not None
    packed = _packed(q, "float")
    assert packed.gemm("ih_l0").activations == "kbit"
    assert packed.gemm("ih_l1").activations == packed.gemm("hh_l0").activations == "float"
    assert not packed.gemm("hh_l0").gate_scales  # per-row scales are stored per row
    x = _inputs(q, 4)
    for w, g in zip(_run(q, x), _run(packed, x), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6)
    assert "kbit4 (layer-0 input), int8" in lowbit.pack(nn.Sequential(q)).packing_report["0"]


def test_gate_blocks_without_a_packed_kernel_keep_the_quant_lstm() -> None:
    net = nn.Sequential(nn.LSTM(IN, HID))
    q = lowbit.quantize(net, "qnn", keep=(), weight_bits=6, weight_scale="max")
    packed = lowbit.pack(q)
    assert isinstance(packed[0], QuantLSTM)
    assert "kept as QuantLSTM: weight_ih_l0: no packed kernel" in packed.packing_report["0"]
    with pytest.raises(PackingError, match="layer '0' kept as QuantLSTM"):
        lowbit.pack(q, strict=True)


# ----------------------------------------------------------------------------------------------
# The int8 path equals a float64 reference of the per-token int8 rule


def _int8_tokens(x: torch.Tensor) -> torch.Tensor:
    """docs/format.md "Activations", absmax: per token (row) ``s = 127 / max(max|x|, 1e-5)``
    as an fp32 division, ``q = clamp(round_half_even(x * s), -127, 127)`` (fp32 product);
    returns the dequantized ``q * (1 / s)`` (fp32 reciprocal) in float64."""
    x32 = x.to(torch.float32).numpy()
    amax = np.maximum(np.abs(x32).max(axis=-1, keepdims=True), np.float32(1e-5))
    s = (np.float32(127.0) / amax).astype(np.float32)
    q = np.clip(np.rint((x32 * s).astype(np.float32)), -127, 127)
    inv = (np.float32(1.0) / s).astype(np.float32)
    return torch.from_numpy(q.astype(np.float64) * inv.astype(np.float64))


@torch.no_grad()
def _reference_int8_lstm(
    q: QuantLSTM, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, ...]:
    """nn.LSTM from its definition in float64 on the dequantized gate blocks, every GEMM input
    (x, the hidden states, the layer outputs feeding the next layer) quantized per token."""
    qws = q.quantized_weights()
    dirs = 2 if q.bidirectional else 1
    xs = x.transpose(0, 1) if q.batch_first else x  # (T, B, In)
    steps, batch = xs.shape[:2]
    if hx is None:
        h0 = c0 = torch.zeros(q.num_layers * dirs, batch, HID, dtype=torch.float64)
    else:
        h0, c0 = hx[0].double(), hx[1].double()
    layer_in = xs.double()
    hn, cn = [], []
    for layer in range(q.num_layers):
        outs = []
        for d in range(dirs):
            key = f"l{layer}{'_reverse' if d else ''}"
            w_ih = torch.cat([qws[f"weight_ih_{key}.{g}"].dequantize() for g in GATES]).double()
            w_hh = torch.cat([qws[f"weight_hh_{key}.{g}"].dequantize() for g in GATES]).double()
            b = torch.zeros(4 * HID, dtype=torch.float64)
            if q.bias:
                b = getattr(q, f"bias_ih_{key}").double() + getattr(q, f"bias_hh_{key}").double()
            h, c = h0[layer * dirs + d], c0[layer * dirs + d]
            out = torch.zeros(steps, batch, HID, dtype=torch.float64)
            for t in range(steps - 1, -1, -1) if d else range(steps):
                gates = _int8_tokens(layer_in[t]) @ w_ih.T + _int8_tokens(h) @ w_hh.T + b
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                out[t] = h
            outs.append(out)
            hn.append(h)
            cn.append(c)
        layer_in = torch.cat(outs, dim=2)
    output = layer_in.transpose(0, 1) if q.batch_first else layer_in
    return output, torch.stack(hn), torch.stack(cn)


@pytest.mark.parametrize("method", list(METHODS))
def test_int8_path_equals_the_per_token_int8_reference(method: str) -> None:
    q = _quant_lstm(method, num_layers=2, bidirectional=True, batch_first=True)
    packed = _packed(q, "int8")
    x = _inputs(q, 4, steps=6)
    hx = _state(q, 4)
    got = _run(packed, x, hx)
    want = _reference_int8_lstm(q, x, hx)
    for g, w in zip(got, want, strict=True):
        # fp32 accumulation and gate math only: far below one int8 step of the hidden state
        # (~1/127 of max|h|), which is what the rounding of activations costs.
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-5)
    # ... and the int8 rounding is really there: the exact float path differs by much more.
    exact = _run(_packed(q, "float"), x, hx)
    assert (exact[0] - got[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------
# .lowbit files


class _Net(nn.Module):
    """A custom model (skeleton loading) with a 2-layer bidirectional LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(IN, HID, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HID, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def _net(method: str = "lat") -> nn.Module:
    torch.manual_seed(4)
    name, opts = _method(method)
    return lowbit.quantize(_Net(), name, keep=("last",), **opts).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_quant_and_packed_lstm_round_trip(tmp_path: Path, method: str) -> None:
    model = _net(method)
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(5))
    for activations in (None, "int8", "float"):
        m = model if activations is None else lowbit.pack(model, activations=activations)
        path = tmp_path / f"{activations}.lowbit"
        lowbit.save(m, path)
        loaded = lowbit.load(path, model=_Net())
        kind = QuantLSTM if activations is None else PackedLSTM
        assert isinstance(loaded.rnn, kind)
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))
        if activations is not None:
            assert loaded.rnn.config() == m.rnn.config()
            assert loaded.packing_report == m.packing_report
        else:  # the stored codes replay every gate block bit for bit
            for name, qw in m.rnn.quantized_weights().items():
                back = loaded.rnn.quantized_weights()[name]
                assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)


def test_a_lone_lstm_round_trips_without_a_skeleton(tmp_path: Path) -> None:
    q = _quant_lstm("lat", num_layers=2, bidirectional=True, bias=False)
    x = _inputs(q, 2)
    for m in (q, _packed(q, "int8")):
        lowbit.save(m, tmp_path / "l.lowbit")
        loaded = lowbit.load(tmp_path / "l.lowbit")
        assert type(loaded) is type(m)
        for a, b in zip(_run(loaded, x), _run(m, x), strict=True):
            assert torch.equal(a, b)


def _file_parts(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return read_manifest(path), load_file(path)


def _write(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A crafted file: consistent header, checksums and tensor list, whatever the layer spec."""
    from safetensors.torch import save_file

    manifest["tensors"] = {
        k: {
            "dtype": {torch.uint8: "U8", torch.float32: "F32", torch.int8: "I8"}[t.dtype],
            "shape": list(t.shape),
            "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(),
        }
        for k, t in tensors.items()
    }
    text = json.dumps(manifest)
    meta = {
        "lowbit.manifest": text,
        "lowbit.manifest.sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("packed", [False, True], ids=["QuantLSTM", "PackedLSTM"])
def test_inconsistent_lstm_manifests_are_refused(tmp_path: Path, packed: bool) -> None:
    model = _net("lat2")
    if packed:
        model = lowbit.pack(model)
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    manifest, tensors = _file_parts(path)
    weight = "rnn.hh_l1_reverse.tiles" if packed else "rnn.weight_hh_l1_reverse.g.codes"
    scale = "rnn.ih_l0.wscale" if packed else "rnn.weight_ih_l0.f.scales"
    _write(path, copy.deepcopy(manifest), dict(tensors))
    lowbit.load(path, model=_Net())  # the crafting itself is sound

    def spec(m: dict[str, Any]) -> dict[str, Any]:
        return m["layers"]["rnn"]["config"] if packed else m["layers"]["rnn"]

    cases: list[tuple[str, Any, dict[str, torch.Tensor]]] = []
    # A missing tensor.
    cases.append(("lacks", manifest, {k: v for k, v in tensors.items() if k != weight}))
    # A tensor of the wrong shape.
    short = dict(tensors)
    short[scale] = tensors[scale].reshape(-1)[:1].clone()
    cases.append(("does not fit", manifest, short))
    # A spec that disagrees with the tensors and with the skeleton (hidden size).
    m2 = copy.deepcopy(manifest)
    spec(m2)["hidden_size"] = HID + 4
    cases.append(("needs|does not match", m2, tensors))
    # A gate block / matrix that is not there.
    m3 = copy.deepcopy(manifest)
    if packed:
        del spec(m3)["matrices"]["hh_l0"]
    else:
        del spec(m3)["weights"]["weight_hh_l0.o"]
    cases.append(("(matrices|weights) must .*missing \\['(weight_)?hh_l0(\\.o)?'\\]", m3, tensors))
    for match, man, ts in cases:
        _write(path, copy.deepcopy(man), ts)
        target = _Net()
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(LowbitFileError, match=match):
            lowbit.load(path, model=target)
        after = target.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_packed_gate_scale_shape_is_checked(tmp_path: Path) -> None:
    model = lowbit.pack(_net("lat"))
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    manifest, tensors = _file_parts(path)
    assert tensors["rnn.hh_l0.wscale"].shape == (4,)  # one scale per gate block
    m = copy.deepcopy(manifest)
    m["layers"]["rnn"]["config"]["matrices"]["hh_l0"]["gate_scales"] = False
    _write(path, m, tensors)
    with pytest.raises(LowbitFileError, match="rnn.hh_l0.wscale.*F32\\[4\\].*F32\\[48\\]"):
        lowbit.load(path, model=_Net())
    gemm = model.rnn.gemm("hh_l0")
    with pytest.raises(RuntimeError, match="one scale per gate block needs \\(4,\\)"):
        LSTMGemm.from_lstm_config(gemm.config(), True).load_state_dict(
            {**gemm.state_dict(), "wscale": torch.ones(3)}
        )


def test_char_lstm_packs_completely_and_is_15x_smaller(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = models.create("char_lstm", input_shape=(100,), num_classes=96)  # the 1x512 of §3.7
    q = lowbit.quantize(net, "lat", keep=["last"]).eval()
    packed = lowbit.pack(q, strict=True)  # no layer left unpacked
    assert isinstance(packed.lstm, PackedLSTM)
    arch = {"name": "char_lstm", "options": {"input_shape": [100], "num_classes": 96}}
    info = lowbit.save(packed, tmp_path / "c.lowbit", architecture=arch)
    # float32: 4 * 4H * (In + H) weights + both biases; stored: 2-bit tiles, 4 gate scales per
    # matrix and the folded bias.
    h = 512
    assert info["layer_float32_bytes"] == 4 * 4 * h * (96 + h) + 2 * 4 * 4 * h
    assert info["layer_compression"] >= 15.0
    x = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    loaded = lowbit.load(tmp_path / "c.lowbit")
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
        # int8 activations: close to the simulated model (lossy by design).
        assert (packed(x) - q(x)).abs().max() < 1e-3
