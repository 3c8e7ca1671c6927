"""lowbit.summary against hand-computed sizes and MAC counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import BinaryAct, DFPAct, KBitLinearWeight, QuantLinear, SignWeight


def hand_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


def test_hand_computed_mlp() -> None:
    model = lowbit.quantize(hand_model(), "twn")
    s = lowbit.summary(model, input_shape=(3, 4))
    assert [r.name for r in s.layers] == ["0", "2", "4"]
    first, mid, last = s.layers
    # float Linear(4, 8): 32 + 8 params at 4 bytes
    assert (first.params, first.bytes, first.float32_bytes) == (40, 160, 160)
    # ternary 6x8: 48 codes * 2 bits = 12 bytes, 1 float32 scale, 6 float32 biases
    assert (mid.params, mid.bytes, mid.float32_bytes) == (54, 12 + 4 + 24, 216)
    assert (last.params, last.bytes) == (14, 56)
    assert s.total_bytes == 256 and s.float32_bytes == 432
    assert s.compression == pytest.approx(432 / 256)
    # MACs for a batch of 3: 3*4*8 float, 3*8*6 add/sub (ternary weights), 3*6*2 float
    assert s.macs == {"xnor": 0, "addsub": 144, "int": 0, "float": 96 + 36}
    assert mid.macs == {"addsub": 144}
    assert s.mult_free == pytest.approx(144 / 276)
    codes = model[2].quantized_weight().codes
    assert mid.sparsity == pytest.approx((codes == 0).float().mean().item())
    text = str(s)
    assert (
        "ternary/tensor" in text
        and "1.69x smaller" in text
        and "52.2% need no multiplication" in text
    )


def test_without_input_shape_there_are_no_macs() -> None:
    s = lowbit.summary(lowbit.quantize(hand_model(), "bwn"))
    assert s.macs is None and s.mult_free is None and all(r.macs is None for r in s.layers)
    assert "MACs" not in str(s)
    # binary 6x8: 48 bits = 6 bytes + scale 4 + bias 24
    assert s.layers[1].bytes == 34 and s.layers[1].sparsity is None


def test_mac_kinds_xnor_and_int() -> None:
    model = nn.Sequential(
        QuantLinear(10, 7, weight_quantizer=SignWeight(), input_quantizer=BinaryAct()),
        QuantLinear(
            7,
            5,
            bias=False,
            weight_quantizer=KBitLinearWeight(bits=4, granularity="channel"),
            input_quantizer=DFPAct(8),
        ),
    )
    s = lowbit.summary(model, (2, 10))
    assert s.macs == {"xnor": 140, "addsub": 0, "int": 70, "float": 0}
    assert s.mult_free == pytest.approx(140 / 210)
    # 70 binary codes -> 9 bytes, 1 scale, 7 biases; 35 4-bit codes -> 18 bytes, 5 scales
    assert [r.bytes for r in s.layers] == [9 + 4 + 28, 18 + 20]
    assert [r.act for r in s.layers] == ["sign", "dfp8"]


def test_conv_bn_and_lstm_macs_and_buffers() -> None:
    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(4)
    )
    s = lowbit.summary(conv, (1, 2, 8, 8))
    # output 1x4x4x4 = 64 elements, each (2/2)*3*3 = 9 MACs
    assert s.layers[0].macs == {"float": 576}
    # BatchNorm2d: 8 parameters + 8 running stats at 4 bytes, num_batches_tracked as int64
    assert (s.layers[1].params, s.layers[1].bytes) == (8, 8 * 4 + 8 * 4 + 8)
    lstm = nn.Sequential(nn.LSTM(3, 5))
    s = lowbit.summary(lowbit.quantize(lstm, "twn", keep=()), (4, 2, 3))
    # T*B = 8 tokens, 4 gates * 5 hidden * (3 + 5) = 160 MACs each
    assert s.macs["addsub"] == 1280
    # 8 ternary 5x3 / 5x5 gate blocks: 4*(15+25) = 160 codes -> 4*(4+7) = 44 bytes, 8 scales, 40 biases
    assert s.layers[0].bytes == 44 + 32 + 160 and s.layers[0].params == 160 + 40


def test_float_layers_of_other_kinds_count_their_macs() -> None:
    """Conv1d/Conv3d/ConvTranspose2d/GRU/RNN MACs by hand, so the 'need no multiplication' share
    is taken over all of them."""
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 8, 6))
    s = lowbit.summary(lowbit.quantize(m, "twn", keep=()), (1, 2, 10))
    assert s.layers[0].macs == {"float": 4 * 8 * 2 * 3}  # 32 outputs x (2 in x 3 taps)
    assert s.macs == {"xnor": 0, "addsub": 32 * 6, "int": 0, "float": 192}
    assert s.mult_free == pytest.approx(0.5)
    t = lowbit.summary(nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2)), (1, 3, 5, 5))
    assert t.total_macs == 3 * 5 * 5 * 4 * 2 * 2  # every input element meets 4 x 2x2 weights
    c3 = lowbit.summary(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, groups=1)), (1, 2, 4, 4, 4))
    assert c3.total_macs == 3 * 64 * 2 * 27
    gru = lowbit.summary(nn.Sequential(nn.GRU(5, 7, num_layers=2, bidirectional=True)), (3, 2, 5))
    # 6 tokens; layer 0: 2 dirs x 3 gates x 7 x (5 + 7); layer 1: input 14
    assert gru.total_macs == 6 * (2 * 3 * 7 * (5 + 7) + 2 * 3 * 7 * (14 + 7))
    rnn = lowbit.summary(nn.Sequential(nn.RNN(4, 6, batch_first=True)), (2, 5, 4))
    assert rnn.total_macs == 10 * 6 * (4 + 6)


def test_embedding_model_uses_long_input_and_training_mode_is_restored() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    model.train()
    s = lowbit.summary(model, (2, 5))
    assert s.macs["float"] == 2 * 5 * (4 * 3 + 3 * 2)
    assert model.training


def test_to_dict_is_json_ready() -> None:
    import json

    d = lowbit.summary(lowbit.quantize(hand_model(), "twn"), (1, 4)).to_dict()
    again = json.loads(json.dumps(d))
    assert again["total_bytes"] == 256 and again["layers"][1]["weight"] == "ternary/tensor"


def test_cli_summary_matches_library() -> None:
    import json

    from typer.testing import CliRunner

    from lowbit import models
    from lowbit.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["summary", "lenet5", "-m", "twn", "-o", "granularity=channel", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    net = lowbit.quantize(models.create("lenet5"), "twn", granularity="channel")
    expected = lowbit.summary(net, (1, *net.input_shape))
    assert data["total_bytes"] == expected.total_bytes and data["macs"] == expected.macs
    res = runner.invoke(app, ["summary", "no_such_model"])
    assert res.exit_code == 2 and "unknown model" in res.output
    res = runner.invoke(app, ["summary", "lenet5", "-m", "twn", "-o", "bits=3"])
    assert res.exit_code == 2 and "no option 'bits'" in res.output


def test_cli_summary_loads_a_checkpoint(tmp_path) -> None:
    from typer.testing import CliRunner

    from lowbit import models
    from lowbit.cli import app

    net = lowbit.quantize(models.create("lenet5"), "twn")
    torch.save({"model": net.state_dict(), "epoch": 1}, tmp_path / "ck.pt")
    res = CliRunner().invoke(
        app, ["summary", "lenet5", "-m", "twn", "--state", str(tmp_path / "ck.pt"), "--no-macs"]
    )
    assert res.exit_code == 0, res.output
    assert f"{lowbit.summary(net).total_bytes:,}" in res.output
    torch.save({"nonsense": torch.zeros(2)}, tmp_path / "bad.pt")
    res = CliRunner().invoke(app, ["summary", "lenet5", "--state", str(tmp_path / "bad.pt")])
    assert res.exit_code == 2 and "does not fit" in res.output


def test_cli_summary_of_a_run_directory_and_model_options(tmp_path) -> None:
    from typer.testing import CliRunner

    from lowbit import models
    from lowbit.cli import app
    from lowbit.train.runs import make_spec, train_spec

    spec = make_spec(
        model="mlp",
        dataset="synthetic",
        method="twn",
        model_options={"widths": [24, 24]},
        data_options={"n_train": 64, "n_valid": 16, "n_test": 16, "shape": [1, 6, 6]},
        train={"epochs": 1, "batch_size": 32},
    )
    train_spec(spec, tmp_path / "run", progress=False)
    runner = CliRunner()
    # the run directory: its widths, its method (twn), its best weights
    res = runner.invoke(app, ["summary", "mlp", "--state", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    net = lowbit.quantize(models.create("mlp", input_shape=(1, 6, 6), widths=[24, 24]), "twn")
    assert data["method"] == "twn" and data["total_bytes"] == lowbit.summary(net).total_bytes
    res = runner.invoke(app, ["summary", "lenet5", "--state", str(tmp_path / "run")])
    assert res.exit_code == 2 and "is a run of model 'mlp', not 'lenet5'" in res.output
    # a state dict needs the options it was trained with: -M, and a short error without them
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    args = ["summary", "mlp", "-m", "twn", "--state", str(tmp_path / "sd.pt"), "--no-macs"]
    res = runner.invoke(app, [*args, "-M", "widths=[24,24]", "-M", "input_shape=[1,6,6]"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "pass the model options it was trained with (-M" in res.output
    assert len(res.output.strip().splitlines()) <= 3
    res = runner.invoke(app, ["summary", "mlp", "-M", "width=3"])
    assert res.exit_code == 2 and "cannot build model 'mlp'" in res.output
    # the run directory itself as MODEL; a .lowbit file (packed): its stored bytes
    res = runner.invoke(app, ["summary", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["total_bytes"] == data["total_bytes"]
    packed = lowbit.pack(net.eval())
    lowbit.save(
        packed,
        tmp_path / "m.lowbit",
        architecture={"name": "mlp", "options": {"input_shape": [1, 6, 6], "widths": [24, 24]}},
    )
    res = runner.invoke(app, ["summary", str(tmp_path / "m.lowbit"), "--json"])
    assert res.exit_code == 0, res.output
    from_file = json.loads(res.output)
    expected = lowbit.summary(lowbit.load(tmp_path / "m.lowbit"), (1, 1, 6, 6))
    assert from_file["total_bytes"] == expected.total_bytes == lowbit.summary(packed).total_bytes
    assert from_file["macs"] == expected.macs
    (tmp_path / "bad.lowbit").write_bytes(b"nonsense")
    res = runner.invoke(app, ["summary", str(tmp_path / "bad.lowbit")])
    assert res.exit_code == 2 and "bad.lowbit" in res.output


def test_summary_of_packed_models_counts_their_packed_bytes_and_macs() -> None:
    from lowbit import models

    for name, method, shape in (("mlp", "ttq", (1, 1, 28, 28)), ("lenet5", "twn", (1, 1, 28, 28))):
        q = lowbit.quantize(models.create(name), method).eval()
        packed = lowbit.pack(q)
        s_q, s_p = lowbit.summary(q, shape), lowbit.summary(packed, shape)
        # the same arithmetic: every MAC of the quantized model is counted once after packing
        assert s_p.total_macs == s_q.total_macs
        assert s_p.macs["addsub"] == s_q.macs["addsub"]
        # bytes: exactly the tensors the packed model holds (BN folded away) and nothing else
        assert s_p.total_bytes == state_bytes(packed)
        assert s_p.compression > 1.0
    # the XNOR chain of a BNN: its linear layers are xnor MACs
    bnn = lowbit.quantize(models.create("mlp_bnn", widths=[64, 64, 64]), "bnn", keep=()).eval()
    chain = lowbit.pack(bnn, xnor=True)
    s = lowbit.summary(chain, (1, 1, 28, 28))
    assert s.macs["xnor"] >= 2 * 64 * 64 and s.compression > 10
    # a binary ConvNet on the XNOR chain (convolutions with packed-bit outputs included): every
    # MAC of the quantized model, each of the same kind
    conv = lowbit.quantize(models.create("convnet", act="hardtanh"), "bnn").eval()
    shape = (1, *conv.input_shape)
    packed = lowbit.pack(conv, xnor=True)
    s_q, s_p = lowbit.summary(conv, shape), lowbit.summary(packed, shape)
    assert s_p.macs == s_q.macs and s_p.macs["xnor"] > 0
    # its packed max-pools' uint8 padding masks are counted too: every byte the model holds but
    # the convolutions' tap sums, which loading derives from the weight bits
    assert any(isinstance(m, lowbit.binary.BinaryMaxPool2d) for m in packed.modules())
    assert s_p.total_bytes == state_bytes(packed, skip=".tap_sums")


def state_bytes(model: nn.Module, skip: str = "") -> int:
    return sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if not (skip and name.endswith(skip))
    )
