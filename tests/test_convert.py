"""lowbit.quantize on an MLP, a ResNet-style CNN, a transformer block and an LSTM: selection
rules, weight/device/dtype preservation, outputs against float models running the dequantized
weights, training steps, and state-dict round trips with ``weights_only=True``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import lowbit
from lowbit.convert import method_of, quantized_layers
from lowbit.nn import QuantConv2d, QuantLinear, QuantLSTM, QuantModule


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(TF.relu(self.bn1(self.conv1(x)))))
        return TF.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(TF.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.ln1(x))
            .reshape(b, t, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


class CharLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lstm = nn.LSTM(5, 7, num_layers=2, batch_first=True)
        self.out = nn.Linear(7, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(x))[0])


def dequantized_reference(model: nn.Module, float_model: nn.Module) -> nn.Module:
    """A float copy whose weights are the exported dequantized weights (independent forward path)."""
    ref = copy.deepcopy(float_model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in quantized_layers(model).items():
            for pname, qw in layer.quantized_weights().items():
                if isinstance(layer, QuantLSTM):
                    base, gate = pname.split(".")
                    j = "ifgo".index(gate)
                    h = layer.hidden_size
                    getattr(modules[name], base)[j * h : (j + 1) * h].copy_(qw.dequantize())
                else:
                    getattr(modules[name], pname).copy_(qw.dequantize())
    return ref


def test_mlp_keeps_first_and_last_by_default() -> None:
    torch.manual_seed(0)
    model = mlp()
    float_model = copy.deepcopy(model)
    weights = [model[i].weight for i in (1, 3, 5, 7)]
    out = lowbit.quantize(model, "twn")
    assert out is model
    assert [type(model[i]) for i in (1, 3, 5, 7)] == [
        nn.Linear,
        QuantLinear,
        QuantLinear,
        nn.Linear,
    ]
    assert [model[i].weight for i in (1, 3, 5, 7)] == weights  # the same Parameter objects
    assert method_of(model) == "twn"
    x = torch.randn(4, 3, 4)
    torch.testing.assert_close(
        model(x), dequantized_reference(model, float_model)(x), rtol=0, atol=0
    )


def test_keep_include_exclude_overrides() -> None:
    m = lowbit.quantize(mlp(), "bwn", keep=())
    assert sorted(quantized_layers(m)) == ["1", "3", "5", "7"]
    m = lowbit.quantize(mlp(), "bwn", keep=("last",), exclude=["3"])
    assert sorted(quantized_layers(m)) == ["1", "5"]
    m = lowbit.quantize(mlp(), "bwn", keep=(), include=["[35]"])
    assert sorted(quantized_layers(m)) == ["3", "5"]
    m = lowbit.quantize(
        mlp(), "twn", keep=(), overrides={"5": {"granularity": "channel", "rule": "exact"}}
    )
    assert (
        m[5].weight_quantizer.granularity.kind == "channel"
        and m[5].weight_quantizer.rule == "exact"
    )
    assert (
        m[3].weight_quantizer.granularity.kind == "tensor" and m[3].weight_quantizer.rule == "0.7"
    )
    assert m[5].quantized_weight().scales.shape == (8,)


def test_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="unknown quantization method 'nope'; available: .*twn"):
        lowbit.quantize(mlp(), "nope")
    with pytest.raises(TypeError, match="no option 'bits'.*granularity"):
        lowbit.quantize(mlp(), "twn", bits=4)
    m = lowbit.quantize(mlp(), "twn")
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize(m, "twn")
    conv1d = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Conv1d.*cannot quantize"):
        lowbit.quantize(conv1d, "twn", include=["0"])
    # A wildcard that also covers the Conv1d just skips it.
    assert sorted(quantized_layers(lowbit.quantize(conv1d, "twn", keep=(), include=["*"]))) == ["1"]
    with pytest.raises(ValueError, match="include pattern 'encoder.\\*' matches no module"):
        lowbit.quantize(mlp(), "twn", include=["encoder.*"])
    # a typo in keep/exclude/overrides would quantize the layer it meant to protect: refused too
    for option in ({"keep": ["first", "fc_1"]}, {"exclude": ["fc_1"]}, {"overrides": {"fc_1": {}}}):
        name = next(iter(option))
        with pytest.raises(
            ValueError, match=f"{name} pattern 'fc_1' matches no module; module names: "
        ):
            lowbit.quantize(mlp(), "twn", **option)
    with pytest.raises(TypeError, match="bare Linear"):
        lowbit.quantize(nn.Linear(3, 3), "twn")
    with pytest.raises(ValueError, match="granularity"):
        lowbit.quantize(mlp(), "twn", granularity="row")


def test_resnet_style_cnn() -> None:
    torch.manual_seed(1)
    model = ResNetish().eval()
    float_model = copy.deepcopy(model)
    lowbit.quantize(model, "twn", rule="exact", granularity="channel")
    q = quantized_layers(model)
    assert sorted(q) == [
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.down.0",
    ]
    assert all(isinstance(m, QuantConv2d) for m in q.values())
    assert isinstance(model.stem, nn.Conv2d) and not isinstance(model.stem, QuantModule)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(
        model(x), dequantized_reference(model, float_model)(x), rtol=1e-6, atol=1e-6
    )


def test_transformer_block_and_multihead_attention_is_left_alone() -> None:
    torch.manual_seed(2)
    model = TransformerBlock()
    float_model = copy.deepcopy(model)
    lowbit.quantize(model, "bwn", granularity="group", group_size=4)
    assert sorted(quantized_layers(model)) == ["mlp.0", "mlp.2", "proj", "qkv"]
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(
        model(x), dequantized_reference(model, float_model)(x), rtol=1e-5, atol=1e-5
    )
    model(x).square().mean().backward()
    assert model.qkv.weight.grad is not None and model.qkv.weight.grad.abs().sum() > 0

    mha = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    lowbit.quantize(mha, "twn", keep=())
    assert isinstance(mha[0], QuantLinear) and isinstance(mha[2], QuantLinear)
    assert not isinstance(mha[1].out_proj, QuantModule)


def test_lstm_model() -> None:
    torch.manual_seed(3)
    model = CharLSTM()
    float_model = copy.deepcopy(model)
    lowbit.quantize(model, "twn", keep=("last",))
    assert isinstance(model.lstm, QuantLSTM) and not isinstance(model.out, QuantModule)
    assert model.lstm.batch_first and model.lstm.num_layers == 2
    x = torch.randint(0, 11, (3, 6))
    torch.testing.assert_close(
        model(x), dequantized_reference(model, float_model)(x), rtol=1e-5, atol=1e-5
    )


def test_deepcopy_after_forward() -> None:
    model = lowbit.quantize(CharLSTM(), "twn", keep=())
    x = torch.randint(0, 11, (2, 4))
    model(x).sum().backward()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    assert clone.lstm.weight_ih_l0 is not model.lstm.weight_ih_l0


def test_fp_method_is_numerically_the_float_model() -> None:
    torch.manual_seed(4)
    model = ResNetish().eval()
    float_model = copy.deepcopy(model)
    lowbit.quantize(model, "fp", keep=())
    assert len(quantized_layers(model)) == 7
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), float_model(x))


def test_dtype_and_device_preserved_and_optimizer_keeps_working() -> None:
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lowbit.quantize(model, "twn", keep=())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    before = model[3].weight.detach().clone()
    loss = model(torch.randn(4, 12, dtype=torch.float64)).square().sum()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model[3].weight)  # the pre-quantize optimizer still owns it


def test_shared_layer_is_swapped_everywhere() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 2))
    lowbit.quantize(model, "twn")
    assert isinstance(model[1], QuantLinear) and model[1] is model[3]


@pytest.mark.parametrize(
    "factory, method, kw, shape",
    [
        (mlp, "twn", {"granularity": "channel"}, (2, 12)),
        (ResNetish, "bwn", {}, (2, 3, 8, 8)),
        (CharLSTM, "twn", {"keep": ()}, None),
    ],
)
def test_state_dict_round_trip_weights_only(factory, method, kw, shape) -> None:
    torch.manual_seed(5)
    model = lowbit.quantize(factory().eval(), method, **kw)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(6)
    fresh = lowbit.quantize(factory().eval(), method, **kw)
    fresh.load_state_dict(state)
    x = torch.randint(0, 11, (2, 5)) if shape is None else torch.randn(shape)
    assert torch.equal(fresh(x), model(x))
    # A float checkpoint loads into the quantized model too (same parameter names).
    float_state = factory().state_dict()
    fresh.load_state_dict(float_state)


def test_transformer_encoder_layer_fast_path_cannot_bypass_quantized_weights() -> None:
    # In eval mode under no_grad, nn.TransformerEncoderLayer has a fused path that reads
    # linear1/linear2 weights directly; after quantize() the output must use the quantized ones.
    import lowbit

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, 5, 16)
    lowbit.quantize(model, "twn", keep=())
    with torch.no_grad():
        fused = model(x)
    # Reference: the same block with the dequantized weights written into a float copy.
    ref_layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, batch_first=True
    )
    ref_layer.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if "quantizer" not in k}, strict=False
    )
    with torch.no_grad():
        ref_layer.linear1.weight.copy_(layer.linear1.quantized_weight().dequantize())
        ref_layer.linear2.weight.copy_(layer.linear2.quantized_weight().dequantize())
    ref_layer.eval()
    with torch.enable_grad():  # the module path, not the fused one
        expected = ref_layer(x)
    torch.testing.assert_close(fused, expected.detach(), rtol=1e-5, atol=1e-5)


def test_quantize_warns_when_nothing_is_quantized_and_checks_activation_bits() -> None:
    two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="quantized no layer"):
        lowbit.quantize(two, "twn")  # keep=("first", "last") keeps both
    assert not quantized_layers(two)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    for bad in ("int1", "int0", "int33", "log1", "dfp1"):
        with pytest.raises(ValueError, match="activations take"):
            lowbit.quantize(copy.deepcopy(net), "twn", activations=bad)
    q = lowbit.quantize(copy.deepcopy(net), "twn", activations="uint1")
    assert quantized_layers(q)


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("qnn", {"weight_bits": 0}, "kbit_linear supports 2..8 bits, got 0"),
        ("fgq", {"weight_bits": 9}, "FGQ's k-bit quantizer supports 2..8 bits, got 9"),
    ],
)
def test_bad_bit_widths_are_refused_by_quantize_not_at_the_first_forward(
    method: str, options: dict, message: str
) -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=message):
        lowbit.quantize(net, method, **options)
    assert not any(isinstance(m, QuantModule) for m in net.modules())  # nothing half-swapped


def test_a_model_without_quantizable_layers_is_said_so() -> None:
    with pytest.warns(UserWarning, match="found no layer to quantize.*ReLU, Sequential"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "ttq")
