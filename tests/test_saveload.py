""".lowbit files: round trips (quantized, packed, registry, Sequential, skeleton), and refusal of
corrupt, truncated, future-version and mismatched files before anything is touched."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import models
from lowbit.nn import QuantModule
from lowbit.pack import PackedConv2d, PackedLinear
from lowbit.saveload import LowbitFileError, read_manifest


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 33),
        nn.BatchNorm1d(33),
        nn.ReLU(),
        nn.Linear(33, 10),
    ).eval()


def _x(n: int = 7) -> torch.Tensor:
    return torch.randn(n, 20, generator=torch.Generator().manual_seed(1))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method", ["ttq", "twn", "bnn", "fgq", "qnn"])
def test_quantized_and_packed_sequential_round_trip(tmp_path: Path, method: str) -> None:
    model = lowbit.quantize(_seq(), method, keep=()).eval()
    x = _x()
    expected = _outputs(model, x)  # also decides FGQ's signed/unsigned inputs
    lowbit.save(model, tmp_path / "q.lowbit")
    loaded = lowbit.load(tmp_path / "q.lowbit")
    # Stored codes replay the same weights bit for bit; same input quantizers.
    assert torch.equal(_outputs(loaded, x), expected)
    qw0, qw1 = model[1].quantized_weight(), loaded[1].quantized_weight()
    assert torch.equal(qw0.codes, qw1.codes) and torch.equal(qw0.scales, qw1.scales)
    packed = lowbit.pack(model)
    info = lowbit.save(packed, tmp_path / "p.lowbit")
    assert info["bytes"] == os.path.getsize(tmp_path / "p.lowbit")
    loaded_packed = lowbit.load(tmp_path / "p.lowbit")
    assert isinstance(loaded_packed[1], PackedLinear)
    assert torch.equal(_outputs(loaded_packed, x), _outputs(packed, x))
    assert loaded_packed.packing_report == packed.packing_report


def test_file_is_plain_safetensors_and_needs_no_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open

    model = lowbit.pack(lowbit.quantize(_seq(), "ttq", keep=()))
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    with safe_open(str(path), framework="pt") as f:  # any safetensors reader can open it
        assert torch.equal(f.get_tensor("1.tiles"), model[1].tiles)
        manifest = json.loads(f.metadata()["lowbit.manifest"])
    assert manifest["format"] == "lowbit" and manifest["version"] == 2
    assert manifest["architecture"]["kind"] == "modules"

    def no_pickle(*_: object, **__: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    lowbit.load(path)


def test_registry_model_with_convolutions_loads_standalone(tmp_path: Path) -> None:
    net = models.create("lenet5").eval()
    quant = lowbit.quantize(net, "twn", keep=())
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    arch = {"name": "lenet5", "options": {}}
    lowbit.save(quant, tmp_path / "q.lowbit", architecture=arch)
    assert torch.equal(_outputs(lowbit.load(tmp_path / "q.lowbit"), x), _outputs(quant, x))
    packed = lowbit.pack(quant, activations="float")
    assert isinstance(packed.features.conv1, PackedConv2d)
    info = lowbit.save(packed, tmp_path / "p.lowbit", architecture=arch)
    loaded = lowbit.load(tmp_path / "p.lowbit")
    assert type(loaded).__name__ == "LeNet5" and isinstance(loaded.features.conv2, PackedConv2d)
    assert torch.equal(_outputs(loaded, x), _outputs(packed, x))
    assert loaded.lowbit_architecture == arch
    # Ternary conv + linear weights at 2 bits: the file is much smaller than float32.
    assert info["compression"] > 5


class Custom(nn.Module):
    def __init__(self, hidden: int = 33) -> None:
        super().__init__()
        self.body = nn.Linear(20, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)) * 2)


def test_custom_module_needs_and_uses_a_skeleton(tmp_path: Path) -> None:
    torch.manual_seed(3)
    quant = lowbit.quantize(Custom(), "twn", keep=())
    packed = lowbit.pack(quant)
    path = tmp_path / "c.lowbit"
    lowbit.save(packed, path)
    with pytest.raises(
        LowbitFileError, match=r"Custom: the model is a Custom, not an nn.Sequential.*model=MyNet"
    ):
        lowbit.load(path)
    loaded = lowbit.load(path, model=Custom())  # a fresh float skeleton
    x = _x()
    assert isinstance(loaded.body, PackedLinear)
    assert torch.equal(_outputs(loaded, x), _outputs(packed, x))


def test_sequential_with_an_unknown_module_names_it_and_save_checks_the_path(
    tmp_path: Path,
) -> None:
    seq = nn.Sequential(
        nn.Linear(20, 8), nn.Sequential(nn.ReLU(), nn.LayerNorm(8)), nn.Linear(8, 10)
    )
    quant = lowbit.quantize(seq, "twn", keep=())
    lowbit.save(quant, tmp_path / "s.lowbit")
    with pytest.raises(LowbitFileError, match="module '1.1' is a LayerNorm, which a .lowbit file"):
        lowbit.load(tmp_path / "s.lowbit")
    with pytest.raises(
        IsADirectoryError, match=r"is a directory: give a file path, e.g. .*model.lowbit"
    ):
        lowbit.save(quant, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lowbit"]  # no temp file left


def test_mismatched_skeleton_is_refused_and_left_untouched(tmp_path: Path) -> None:
    torch.manual_seed(4)
    path = tmp_path / "c.lowbit"
    lowbit.save(lowbit.quantize(Custom(), "twn", keep=()), path)
    other = Custom(hidden=34)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LowbitFileError, match=r"does not fit the model at 'body'.*\(20, 33\)"):
        lowbit.load(path, model=other)
    assert isinstance(other.body, nn.Linear) and type(other.body) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(LowbitFileError, match="does not fit"):
        lowbit.load(path, model=_seq())


def _saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = lowbit.pack(lowbit.quantize(_seq(), "ttq", keep=()))
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    return path, model


def test_plain_safetensors_and_a_damaged_manifest_entry_are_told_apart(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(LowbitFileError, match="not a .lowbit file: a safetensors file without"):
        lowbit.load(plain)
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    assert data.count(b'"lowbit.manifest"') == 1
    path.write_bytes(data.replace(b'"lowbit.manifest"', b'"lowbit.manifesT"'))  # one byte flipped
    with pytest.raises(
        LowbitFileError, match="corrupt header: its lowbit manifest entry is damaged"
    ):
        lowbit.load(path)


def test_corrupted_tensor_byte_fails_its_checksum(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(LowbitFileError, match="SHA-256"):
        lowbit.load(path)


def test_any_flipped_byte_is_refused_or_harmless(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    good = path.read_bytes()
    x = _x()
    expected = _outputs(model, x)
    bad = tmp_path / "bad.lowbit"
    refused = 0
    positions = list(range(0, len(good), 13)) + list(range(8))
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 0x04
        bad.write_bytes(bytes(data))
        try:
            loaded = lowbit.load(bad)
        except LowbitFileError:
            refused += 1
            continue
        # Header bytes are guarded by JSON syntax, the byte-range checks and the manifest's
        # SHA-256, data bytes by the tensors' SHA-256: a flip that still loads must be harmless.
        assert torch.equal(_outputs(loaded, x), expected), pos
    assert refused == len(positions)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_files_are_refused(tmp_path: Path, keep: int) -> None:
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(LowbitFileError, match="truncated|corrupt"):
        lowbit.load(path)


def _rewrite_manifest(path: Path, edit: object) -> None:
    """Re-encode the manifest (with a valid manifest checksum) after ``edit(manifest)``."""
    import hashlib

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["lowbit.manifest"])
    edit(manifest)  # type: ignore[operator]
    text = json.dumps(manifest)
    header["__metadata__"] = {
        "lowbit.manifest": text,
        "lowbit.manifest.sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_future_format_version_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    _rewrite_manifest(path, lambda m: m.update(version=3))
    with pytest.raises(LowbitFileError, match="version 3.*upgrade lowbit"):
        lowbit.load(path)
    _rewrite_manifest(path, lambda m: m.update(version=2))
    lowbit.load(path)  # the rewrite itself is sound
    _rewrite_manifest(path, lambda m: m.update(version=1))
    lowbit.load(path)  # version 1 is still read


def test_layer_spec_that_disagrees_with_its_tensors_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)

    def grow(m: dict) -> None:
        m["layers"]["1"]["config"]["out_features"] = 50  # 4 row blocks: the 3 stored no longer fit

    _rewrite_manifest(path, grow)
    with pytest.raises(LowbitFileError, match="does not fit"):
        lowbit.load(path)


def test_failed_save_keeps_the_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = _saved(tmp_path)
    before = path.read_bytes()

    def broken_replace(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(lowbit.quantize(_seq(), "twn", keep=()), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit"]  # no temp file left
    assert read_manifest(path)["layers"]["1"]["type"] == "PackedLinear"
    assert model is not None


def test_a_single_packed_layer_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(5)
    layer = lowbit.pack(lowbit.quantize(nn.Sequential(nn.Linear(20, 9)), "lat2", keep=()))[0]
    lowbit.save(layer, tmp_path / "l.lowbit")
    loaded = lowbit.load(tmp_path / "l.lowbit")
    assert isinstance(loaded, PackedLinear) and loaded.config() == layer.config()
    assert torch.equal(loaded(_x()), layer(_x()))


def test_layers_without_an_encoding_are_named(tmp_path: Path) -> None:
    class QuantOdd(nn.Module, QuantModule):  # a custom quantized layer lowbit cannot encode
        def quantized_weights(self) -> dict:
            return {}

    with pytest.raises(ValueError, match="layer '0'.*QuantOdd has no .lowbit encoding"):
        lowbit.save(nn.Sequential(QuantOdd()), tmp_path / "x.lowbit")
    assert not (tmp_path / "x.lowbit").exists()


def test_huge_modules_in_a_crafted_manifest_are_refused_before_allocation(tmp_path: Path) -> None:
    model = lowbit.pack(lowbit.quantize(_seq(), "ttq", keep=("last",)))
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    big = {"in_features": 1 << 24, "out_features": 1 << 24, "bias": True}  # 2^48 floats

    def inflate(m: dict) -> None:
        m["architecture"]["tree"]["children"][4][1]["args"] = big
        m["leaves"]["4"]["args"] = big

    _rewrite_manifest(path, inflate)
    with pytest.raises(LowbitFileError, match="does not fit"):
        lowbit.load(path)


def test_registry_models_load_standalone_without_naming_their_architecture(tmp_path) -> None:
    # lowbit.models.create records name + options, so the file alone rebuilds the model.
    import lowbit
    from lowbit import models

    torch.manual_seed(0)
    model = models.create("mlp", input_shape=(1, 6, 6), num_classes=4, widths=(16, 8))
    lowbit.quantize(model, "twn", keep=())
    model.eval()
    path = tmp_path / "m.lowbit"
    lowbit.save(model, path)
    again = lowbit.load(path)
    assert type(again) is type(model)
    x = torch.randn(3, 1, 6, 6)
    assert torch.equal(again(x), model(x))


def test_load_refuses_a_skeleton_whose_float_layers_differ(tmp_path: Path) -> None:
    def net(classes: int, eps: float = 1e-5) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16, eps=eps), nn.Linear(16, 16), nn.Linear(16, classes)
        )

    q = lowbit.quantize(net(10), "twn").eval()  # first and last layers stay float
    for m in (q, lowbit.pack(q)):
        lowbit.save(m, tmp_path / "m.lowbit")
        wrong = net(5)
        last = wrong[3]
        with pytest.raises(
            lowbit.saveload.LowbitFileError, match=r"at '3'.*out_features=10 \(the model's 5\)"
        ):
            lowbit.load(tmp_path / "m.lowbit", model=wrong)
        assert wrong[3] is last and last.out_features == 5  # untouched
    lowbit.save(q, tmp_path / "q.lowbit")
    with pytest.raises(lowbit.saveload.LowbitFileError, match="eps"):
        lowbit.load(tmp_path / "q.lowbit", model=net(10, eps=0.1))
    # a replayed quantized layer's latent weight no longer sets its forward weight: frozen
    loaded = lowbit.load(tmp_path / "q.lowbit", model=net(10))
    assert not loaded[2].weight.requires_grad and loaded[0].weight.requires_grad


class _BiasFreeCNN(nn.Module):
    """Conv(bias=False) + BatchNorm: lowbit.ptq.fgq folds each BN into its conv, giving it a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def test_folded_batchnorm_bias_loads_into_a_fresh_bias_free_skeleton(tmp_path: Path) -> None:
    import lowbit.ptq

    torch.manual_seed(0)
    net = _BiasFreeCNN()
    with torch.no_grad():
        for bn in (net.bn0, net.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    quant = lowbit.ptq.fgq(net.eval(), torch.randn(64, 3, 8, 8), group_size=4)
    assert quant.conv0.bias is not None  # the kept float first conv got the folded BN's bias
    x = torch.randn(4, 3, 8, 8)
    for name, model in (("quant", quant), ("packed", lowbit.pack(quant))):
        lowbit.save(model, tmp_path / f"{name}.lowbit")
        loaded = lowbit.load(tmp_path / f"{name}.lowbit", model=_BiasFreeCNN())
        assert loaded.conv0.bias is not None and isinstance(loaded.bn0, nn.Identity)
        assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    # any other difference is still refused: a wider first conv is another model
    other = _BiasFreeCNN()
    other.conv0 = nn.Conv2d(3, 8, 5, padding=2, bias=False)
    with pytest.raises(LowbitFileError, match="does not fit the model at 'conv0'"):
        lowbit.load(tmp_path / "quant.lowbit", model=other)
