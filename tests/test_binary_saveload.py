"""XNOR-packed models (lowbit.binary.pack_bnn) in .lowbit files: round trips against the
simulated model, the documented byte layout decoded independently, exact file sizes, refusal of
corrupt / truncated / crafted files before anything is built, and `lowbit pack --xnor`."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lowbit
from lowbit import binary as B
from lowbit.saveload import LowbitFileError, read_manifest


def _randomize_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-20, 20, generator=gen)
                mod.running_var.uniform_(1, 50, generator=gen)
                mod.weight.uniform_(-1, 1, generator=gen)  # negative γ too: flipped thresholds
                mod.bias.uniform_(-1, 1, generator=gen)
            elif isinstance(getattr(mod, "bias", None), torch.Tensor):
                mod.bias.uniform_(-3, 3, generator=gen)  # type: ignore[operator]


def _bnn_mlp(widths: tuple[int, ...] = (96, 130, 70), seed: int = 0) -> nn.Module:
    from lowbit.models.mlp import MLP

    torch.manual_seed(seed)
    model = lowbit.quantize(MLP(widths=widths, act="hardtanh", bn_output=True), "bnn")
    _randomize_bn(model, seed + 1)
    return model.eval()


def _bnn_convnet() -> nn.Module:
    from lowbit.models.convnet import ConvNet

    torch.manual_seed(0)
    model = ConvNet(input_shape=(3, 12, 12), width=8, fc=40, act="hardtanh")
    model = lowbit.quantize(
        model, "bnn", keep=(), overrides={"features.conv0": {"activations": "float"}}
    )
    _randomize_bn(model, 2)
    return model.eval()


def _header(path: Path) -> tuple[int, dict, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["lowbit.manifest"])
    return n, header, manifest


def _rewrite(
    path: Path,
    edit_manifest: Callable[[dict], None] | None = None,
    tensor: str | None = None,
    edit_bytes: Callable[[bytearray], None] | None = None,
) -> None:
    """Re-encode a file after editing its manifest and/or one tensor's bytes, with every
    checksum recomputed: what a crafted (not merely damaged) file looks like."""
    data = path.read_bytes()
    n, header, manifest = _header(path)
    body = bytearray(data[8 + n :])
    if tensor is not None and edit_bytes is not None:
        b, e = header[tensor]["data_offsets"]
        chunk = bytearray(body[b:e])
        edit_bytes(chunk)
        body[b:e] = chunk
        manifest["tensors"][tensor]["sha256"] = hashlib.sha256(bytes(chunk)).hexdigest()
    if edit_manifest is not None:
        edit_manifest(manifest)
    text = json.dumps(manifest)
    header["__metadata__"] = {
        "lowbit.manifest": text,
        "lowbit.manifest.sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(body))


# ----------------------------------------------------------------------------------------------
# Round trips


def test_bnn_mlp_round_trip_predicts_like_packed_and_simulated(tmp_path: Path) -> None:
    model = _bnn_mlp()
    packed = B.pack_bnn(model)
    path = tmp_path / "mlp.lowbit"
    lowbit.save(packed, path)
    loaded = lowbit.load(path)
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in packed]
    kinds = [(m.input_kind, m.out_kind) for m in loaded if isinstance(m, B.PackedBinaryLinear)]
    assert kinds == [("float", "bits"), ("bits", "float")]
    x = torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, mem, got = model(x), packed(x), loaded(x)
        # The hidden bits are the simulated sign activations, bit for bit.
        net = model.net
        h = net.act1(net.bn1(net.fc1(net.act0(net.bn0(net.fc0(net.flatten(x)))))))
        bits = loaded[:5](x)
    assert torch.equal(B.unpack_bits(bits, 130), B.signs(h))
    assert torch.equal(got, mem)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_bnn_convnet_round_trip_predicts_like_packed_and_simulated(tmp_path: Path) -> None:
    model = _bnn_convnet()
    packed = B.pack_bnn(model)
    path = tmp_path / "conv.lowbit"
    lowbit.save(packed, path)
    types = {spec["type"] for spec in read_manifest(path)["layers"].values()}
    assert {"PackedBinaryConv2d", "BinaryMaxPool2d", "PackedBinaryLinear"} <= types
    loaded = lowbit.load(path)
    assert sum(isinstance(m, B.PackedBinaryConv2d) for m in loaded) == 5
    assert sum(isinstance(m, B.BinaryMaxPool2d) for m in loaded) == 3
    assert sum(isinstance(m, B.FlattenBits) for m in loaded) == 1
    for a, b in zip(packed, loaded, strict=True):  # tap sums recomputed from the stored bits
        if isinstance(a, B.PackedBinaryConv2d):
            assert isinstance(b, B.PackedBinaryConv2d) and torch.equal(a.tap_sums, b.tap_sums)
    x = torch.randn(100, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref, mem, got = model(x), packed(x), loaded(x)
    assert torch.equal(got, mem)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_single_binary_layers_with_float_epilogues_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(70, 100, generator=gen)
    scale, bias = torch.rand(70, generator=gen) + 0.5, torch.randn(70, generator=gen)
    layer = B.PackedBinaryLinear(w, scale=scale, bias=bias, out="int8")
    lowbit.save(layer, tmp_path / "l.lowbit")
    loaded = lowbit.load(tmp_path / "l.lowbit")
    assert isinstance(loaded, B.PackedBinaryLinear) and loaded.config() == layer.config()
    x = torch.randn(9, 100, generator=gen)
    expected = B.binary_linear_reference(B.signs(x), B.signs(w), out="int8", scale=scale, bias=bias)
    assert torch.equal(loaded(x), expected)
    wc = torch.randn(6, 5, 3, 2, generator=gen)
    conv = B.PackedBinaryConv2d(wc, (2, 1), (1, 2), (1, 2), bias=torch.randn(6, generator=gen))
    lowbit.save(conv, tmp_path / "c.lowbit")
    loaded_conv = lowbit.load(tmp_path / "c.lowbit")
    xc = torch.randn(2, 5, 9, 8, generator=gen)
    ref = B.binary_conv2d_reference(B.signs(xc), B.signs(wc), (2, 1), (1, 2), (1, 2))
    assert torch.equal(loaded_conv(xc), ref.float() + conv.bias[:, None, None])


def test_bitplane_first_layer_round_trip(tmp_path: Path) -> None:
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    model = lowbit.quantize(
        MLP(widths=(64, 70, 30), act="hardtanh", bn_output=True),
        "bnn",
        keep=("last",),
        overrides={"net.fc0": {"activations": "uint8"}},
    )
    _randomize_bn(model, 9)
    model.eval()
    packed = B.pack_bnn(model)
    assert isinstance(packed[1], B.PackedBitplaneLinear)
    path = tmp_path / "bp.lowbit"
    lowbit.save(packed, path)
    spec = read_manifest(path)["layers"]["1"]
    assert spec["type"] == "PackedBitplaneLinear" and spec["config"]["act_bits"] == 8
    loaded = lowbit.load(path)
    assert isinstance(loaded[1], B.PackedBitplaneLinear)
    assert torch.equal(loaded[1].w_sum, packed[1].w_sum)  # recomputed from the stored bits
    x = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref, mem, got = model(x), packed(x), loaded(x)
    assert torch.equal(got, mem)
    assert torch.equal(got.argmax(1), ref.argmax(1))


# ----------------------------------------------------------------------------------------------
# The bytes: docs/format.md "Binary (XNOR) layers", decoded here without lowbit's code


def _decode_w_bits(raw: bytes, n: int, k: int) -> np.ndarray:
    """±1 (n, k) from the documented layout: block b = rows 8b..8b+7 is 64 * words bytes; word
    i of row 8b + r is the little-endian uint64 at byte b*64*words + 64*i + 8*r; element j is
    bit j % 64 of word j // 64, 1 meaning -1."""
    words = (k + 63) // 64
    out = np.empty((n, k), dtype=np.int64)
    for row in range(n):
        b, r = divmod(row, 8)
        for j in range(k):
            i = j // 64
            off = b * 64 * words + 64 * i + 8 * r
            word = int.from_bytes(raw[off : off + 8], "little")
            out[row, j] = -1 if (word >> (j % 64)) & 1 else 1
    return out


def test_stored_bits_follow_the_documented_layout(tmp_path: Path) -> None:
    model = _bnn_mlp(widths=(40, 70, 30))
    packed = B.pack_bnn(model)
    path = tmp_path / "m.lowbit"
    lowbit.save(packed, path)
    n_hdr, header, manifest = _header(path)
    data = path.read_bytes()[8 + n_hdr :]
    path_of = {id(m): name for name, m in packed.named_children()}
    fc1 = model.net.fc1  # the first binary layer: 40 -> 70
    name = path_of[id(packed[4])]
    assert manifest["layers"][name]["type"] == "PackedBinaryLinear"
    b, e = header[f"{name}.w_bits"]["data_offsets"]
    assert header[f"{name}.w_bits"]["shape"] == [9, 64]  # ceil(70/8) blocks, 64 * 1 word
    decoded = _decode_w_bits(data[b:e], 70, 40)
    assert np.array_equal(decoded, fc1.quantized_weight().codes.numpy().astype(np.int64))
    # Thresholds: bit n of the output is d < thr[n] (d > thr[n] where flip[n]); the simulated
    # layer's sign at every reachable integer dot product d in [-40, 40] must agree.
    b, e = header[f"{name}.thr"]["data_offsets"]
    thr = np.frombuffer(data[b:e], dtype="<i4")
    b, e = header[f"{name}.flip"]["data_offsets"]
    flip = np.frombuffer(data[b:e], dtype=np.uint8)
    net = model.net
    d = torch.arange(-40, 41, dtype=torch.float32)[:, None].expand(81, 70).contiguous()
    with torch.no_grad():
        neg = (net.act1(net.bn1(d + fc1.bias)) < 0).numpy()
    dd = d.numpy().astype(np.int64)
    assert np.array_equal(neg, np.where(flip.astype(bool), dd > thr, dd < thr))


def test_file_size_is_the_hand_computed_byte_count(tmp_path: Path) -> None:
    from lowbit.models.mlp import MLP

    torch.manual_seed(0)
    model = lowbit.quantize(
        MLP(input_shape=(1, 8, 8), widths=(1024, 1024, 1000), act="hardtanh"), "bnn"
    )
    packed = B.pack_bnn(model.eval())
    path = tmp_path / "m.lowbit"
    info = lowbit.save(packed, path)
    n_hdr, header, manifest = _header(path)

    def nbytes(*dims: int, item: int = 4) -> int:
        return int(np.prod(dims)) * item

    # Binary layers: 1024 -> 1024 (bits out: thr I32 + flip U8) and 1024 -> 1000 (float out,
    # bias F32). w_bits: ceil(N/8) blocks of 8 rows x 8 * ceil(K/64) bytes.
    bin1 = nbytes(128 * 8, 8 * 16, item=1) + nbytes(1024) + nbytes(1024, item=1)
    bin2 = nbytes(125 * 8, 8 * 16, item=1) + nbytes(1000)
    # Everything else (float first / last layers, batch norms) is stored as its state_dict.
    binary = {name for name, m in packed.named_children() if isinstance(m, B.PackedBinaryLinear)}
    assert len(binary) == 2
    floats = sum(
        t.numel() * t.element_size()
        for key, t in packed.state_dict().items()
        if key.split(".")[0] not in binary
    )
    expected_data = bin1 + bin2 + floats
    header_data = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert header_data == expected_data
    assert path.stat().st_size == 8 + n_hdr + expected_data == info["bytes"]
    # Binary layers alone vs their float32 weights and biases (8,298,400 bytes): 30.9x smaller.
    assert info["layer_bytes"] == bin1 + bin2 == 268_192
    assert info["layer_float32_bytes"] == 4 * (1024 * 1024 + 1024 * 1000 + 1000)
    assert 4 * (1024 * 1024 + 1024 + 1024 * 1000 + 1000) / (bin1 + bin2) > 30


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def saved_bnn(tmp_path: Path) -> tuple[Path, nn.Module]:
    packed = B.pack_bnn(_bnn_mlp(widths=(40, 70, 30)))
    path = tmp_path / "m.lowbit"
    lowbit.save(packed, path)
    return path, packed


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a tensor is materialised from the file or a binary layer is built."""

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("allocated before the file was refused")

    monkeypatch.setattr(torch, "frombuffer", boom)
    monkeypatch.setattr(B.PackedBinaryLinear, "from_packed", classmethod(boom))
    monkeypatch.setattr(B.PackedBinaryConv2d, "from_packed", classmethod(boom))


@pytest.mark.parametrize("keep", [0, 7, 8, 200, -1, -100])
def test_truncated_bnn_files_are_refused_before_allocation(
    saved_bnn: tuple[Path, nn.Module], keep: int, no_allocation: None
) -> None:
    path, _ = saved_bnn
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(LowbitFileError, match="truncated|corrupt"):
        lowbit.load(path)


def test_flipped_weight_bit_fails_its_checksum_before_allocation(
    saved_bnn: tuple[Path, nn.Module], no_allocation: None
) -> None:
    path, packed = saved_bnn
    n_hdr, header, _ = _header(path)
    name = next(k for k in header if k.endswith(".w_bits"))
    b, _e = header[name]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[8 + n_hdr + b] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LowbitFileError, match="SHA-256"):
        lowbit.load(path)


def _first(manifest: dict, kind: str) -> dict:
    return next(s for s in manifest["layers"].values() if s["type"] == kind)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: _first(m, "PackedBinaryLinear")["config"].update(out_features=80),
            "does not fit",
        ),
        (
            lambda m: _first(m, "PackedBinaryLinear")["config"].update(in_features=200),
            "does not fit",
        ),
        (
            lambda m: _first(m, "PackedBinaryLinear")["config"].update(out_features=1 << 40),
            "must be an int",
        ),
        (lambda m: _first(m, "PackedBinaryLinear")["config"].update(out="floaty"), "out must be"),
        (
            lambda m: _first(m, "PackedBinaryLinear")["config"].update(has_threshold=False),
            "threshold|does not fit",
        ),
        (lambda m: _first(m, "PackedBinaryLinear")["config"].update(extra=1), "exactly the keys"),
        (
            lambda m: _first(m, "PackedBinaryLinear")["config"].update(input_layout=[2, 2, 10]),
            "input_layout",
        ),
        (
            lambda m: _first(m, "PackedBinaryLinear").update(type="PackedBinaryThing"),
            "unknown layer type",
        ),
        (lambda m: m.update(version=3), "version 3.*upgrade lowbit"),
    ],
)
def test_crafted_binary_specs_are_refused_before_allocation(
    saved_bnn: tuple[Path, nn.Module],
    edit: Callable[[dict], None],
    message: str,
    no_allocation: None,
) -> None:
    path, _ = saved_bnn
    _rewrite(path, edit)
    with pytest.raises(LowbitFileError, match=message):
        lowbit.load(path)


def test_crafted_bits_with_valid_checksums_are_refused(saved_bnn: tuple[Path, nn.Module]) -> None:
    path, packed = saved_bnn
    good = path.read_bytes()
    _, header, manifest = _header(path)
    name = next(p for p, s in manifest["layers"].items() if s["type"] == "PackedBinaryLinear")

    def pad_bit(chunk: bytearray) -> None:  # K = 40: bit 40 of row 0's only word is padding
        chunk[5] |= 0x01

    def pad_row(chunk: bytearray) -> None:  # N = 70: rows 70, 71 of the last block are padding
        chunk[len(chunk) - 64 + 8 * 7] |= 0x01

    def bad_flip(chunk: bytearray) -> None:
        chunk[3] = 2

    for tensor, edit, message in (
        (f"{name}.w_bits", pad_bit, "padding bits"),
        (f"{name}.w_bits", pad_row, "padding rows"),
        (f"{name}.flip", bad_flip, "flip must hold 0 or 1"),
    ):
        path.write_bytes(good)
        _rewrite(path, None, tensor, edit)
        with pytest.raises(LowbitFileError, match=message):
            lowbit.load(path)
    path.write_bytes(good)
    _rewrite(path, None, f"{name}.thr", lambda c: None)  # the rewrite itself is sound
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), packed(x))


# ----------------------------------------------------------------------------------------------
# `lowbit pack --xnor` and `lowbit run`


def _fake_bnn_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    from lowbit import models
    from lowbit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    opts = {"widths": [64, 70, 64], "act": "hardtanh", "bn_output": True}
    net = lowbit.quantize(models.create("mlp", **opts), "bnn")
    _randomize_bn(net, 4)
    net.eval()
    run = tmp_path / "run-bnn"
    run.mkdir()
    spec = {
        "model": {"name": "mlp", **opts},
        "data": {"name": "synthetic", "source": "/nowhere"},
        "method": {"name": "bnn", "options": {}},
    }
    (run / "config.json").write_text(json.dumps(spec))
    save_checkpoint(run / "checkpoints", {"model": net.state_dict(), "epoch": 1}, 1, kind="best")
    return run, net


def test_cli_pack_xnor_then_run(tmp_path: Path) -> None:
    from lowbit.cli import app

    run, net = _fake_bnn_run(tmp_path)
    out = tmp_path / "bnn.lowbit"
    runner = CliRunner()
    result = runner.invoke(app, ["pack", str(run), "-o", str(out), "--xnor", "--eval", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["simulated_acc"] == info["packed_acc"]
    assert any("PackedBinaryLinear" in line for line in info["packing_report"].values())
    loaded = lowbit.load(out)
    assert any(isinstance(m, B.PackedBinaryLinear) and m.out_kind == "bits" for m in loaded)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), net(x).argmax(1))
    result = runner.invoke(app, ["run", str(out), "--reps", "20", "--batch-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    ran = json.loads(result.output)
    assert ran["dataset"] == "synthetic" and ran["accuracy"] == info["packed_acc"]
    result = runner.invoke(app, ["pack", str(run), "-o", str(out), "--xnor", "--quantized"])
    assert result.exit_code == 2 and "pass one of them" in result.output
    # a run without binary layers is refused (not written as a chain of float stages)
    from lowbit import models
    from lowbit.train.checkpoint import save_checkpoint

    spec = json.loads((run / "config.json").read_text())
    spec["method"] = {"name": "twn"}
    twn = lowbit.quantize(models.create("mlp", widths=[64, 70, 64]), "twn")
    spec["model"] = {"name": "mlp", "widths": [64, 70, 64]}
    run2 = tmp_path / "run-twn"
    (run2 / "checkpoints").mkdir(parents=True)
    (run2 / "config.json").write_text(json.dumps(spec))
    save_checkpoint(run2 / "checkpoints", {"model": twn.state_dict(), "epoch": 1}, 1, kind="best")
    other = tmp_path / "twn.lowbit"
    result = runner.invoke(app, ["pack", str(run2), "-o", str(other), "--xnor"])
    assert (
        result.exit_code == 2
        and "no layer of" in result.output
        and "without --xnor" in result.output
    )
    assert not other.exists()


def test_any_flipped_byte_of_a_bnn_file_is_refused_or_harmless(tmp_path: Path) -> None:
    torch.manual_seed(2)
    seq = nn.Sequential(
        nn.Linear(20, 70), nn.BatchNorm1d(70), nn.Hardtanh(),
        nn.Linear(70, 65), nn.BatchNorm1d(65), nn.Hardtanh(),
        nn.Linear(65, 10),
    )  # fmt: skip
    model = lowbit.quantize(seq, "bnn", keep=())
    _randomize_bn(model, 11)
    packed = B.pack_bnn(model.eval())
    assert sum(isinstance(m, B.PackedBinaryLinear) for m in packed) == 3
    path = tmp_path / "m.lowbit"
    lowbit.save(packed, path)
    good = path.read_bytes()
    x = torch.randn(9, 20, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = packed(x)
    bad = tmp_path / "bad.lowbit"
    positions = [*range(0, len(good), 11), *range(8)]
    refused = 0
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 0x10
        bad.write_bytes(bytes(data))
        try:
            loaded = lowbit.load(bad)
        except LowbitFileError:
            refused += 1
            continue
        with torch.no_grad():  # header bytes guarded by JSON, ranges and checksums
            assert torch.equal(loaded(x), expected), pos
    assert refused == len(positions)


def test_casting_a_packed_bnn_keeps_its_layers_working() -> None:
    # .double() / .half() of a whole XNOR-packed model: the binary layers compute in float32 on
    # their float32 buffers and answer in the model's dtype, also when they are fed packed bits
    # (before, the layer after the first binary one got float32 and the cast float layers failed).
    torch.manual_seed(0)
    model = _bnn_convnet()
    packed = B.pack_bnn(model)
    x = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        want = packed(x)
        for dtype, tol in ((torch.float64, 1e-5), (torch.float16, 2e-2)):
            cast = packed.to(dtype)
            got = cast(x.to(dtype))
            assert got.dtype == dtype
            assert (got.double() - want.double()).abs().max().item() <= tol * (
                1 + want.abs().max().item()
            )
            packed = cast.float()
