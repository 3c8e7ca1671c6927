"""The reference networks: shapes, parameter counts derived by hand, the details the papers pin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import models


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_papers_models_and_rejects_unknown_names() -> None:
    assert {"mlp", "convnet", "resnet_cifar", "lenet5", "alexnet", "char_lstm"} <= set(
        models.available()
    )
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid: mlp, "):
        models.create("vgg")
    rows = {r["name"]: r for r in models.describe()}
    assert rows["char_lstm"]["task"] == "sequence" and rows["alexnet"]["num_classes"] == 1000


def test_mlp_laq_is_3x2048_with_bn_output() -> None:
    m = models.create("mlp_laq")
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (784, 2048),
        (2048, 2048),
        (2048, 2048),
        (2048, 10),
    ]
    assert isinstance(list(m.net)[-1], nn.BatchNorm1d) and list(m.net)[-1].eps == 1e-4
    # 4 linear layers with bias + 4 BN layers (gamma, beta).
    expected = 784 * 2048 + 2048 + 2 * (2048 * 2048 + 2048) + 2048 * 10 + 10 + 3 * 2 * 2048 + 2 * 10
    assert _params(m) == expected
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_bnn_has_the_theano_dropout_and_hardtanh() -> None:
    m = models.create("mlp_bnn")
    drops = [d.p for d in m.modules() if isinstance(d, nn.Dropout)]
    assert drops == [0.2, 0.5, 0.5, 0.5]
    assert sum(isinstance(a, nn.Hardtanh) for a in m.modules()) == 3


def test_mlp_adapts_to_the_input_shape() -> None:
    m = models.create("mlp", input_shape=(3, 32, 32), num_classes=100, widths=(64,))
    assert m.net.fc0.in_features == 3 * 32 * 32 and m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_convnet_geometry_for_cifar_and_svhn_widths() -> None:
    m = models.create("convnet", width=16, fc=32)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert m.classifier.fc0.in_features == 64 * 4 * 4  # 32 -> 16 -> 8 -> 4
    # Pool sits between the second conv of a pair and its BN (BNN's order).
    names = [n for n, _ in m.features.named_children()]
    assert names[:6] == ["conv0", "bn0", "act0", "conv1", "pool0", "bn1"]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(m.classifier.bnout, nn.BatchNorm1d)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_resnet_cifar_parameter_counts(depth: int) -> None:
    n = (depth - 2) // 6
    m = models.create("resnet_cifar", depth=depth)
    conv = 3 * 16 * 9
    bn = 2 * 16  # bn0
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        # first block of the stage: conv c_in->c_out, conv c_out->c_out
        conv += 9 * c_in * c_out + 9 * c_out * c_out + (n - 1) * 2 * 9 * c_out * c_out
        first_bn1 = 0 if c_out == 16 else 2 * c_in  # the very first block has no pre-BN
        bn += first_bn1 + 2 * c_out + (n - 1) * 2 * 2 * c_out
    bn += 2 * 64  # bnlast
    assert _params(m) == conv + bn + 64 * 10 + 10
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_is_the_0_27m_parameter_net() -> None:
    assert abs(_params(models.create("resnet_cifar", depth=20)) - 0.27e6) < 0.01e6


def test_resnet_option_a_shortcut_is_avgpool_plus_zero_channels() -> None:
    from lowbit.models.resnet import PreActBlock

    block = PreActBlock(4, increase_dim=True)
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(1, 4, 6, 6)
    out = block(x)
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    assert out.shape == (1, 8, 3, 3)
    assert torch.equal(out[:, 2:6], pooled)
    assert torch.equal(out[:, :2], torch.zeros(1, 2, 3, 3)) and torch.equal(
        out[:, 6:], torch.zeros(1, 2, 3, 3)
    )
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create("resnet_cifar", depth=21)


def test_resnet_conv_init_std() -> None:
    torch.manual_seed(0)
    m = models.create("resnet_cifar", depth=56)
    w = m.res3[1].conv1.weight  # 64 output channels: std sqrt(2 / (9 * 64))
    assert abs(float(w.detach().std()) - (2 / (9 * 64)) ** 0.5) < 0.005
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))


def test_lenet5_is_the_classic_61706_parameter_net() -> None:
    m = models.create("lenet5")
    assert _params(m) == 61706
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    caffe = models.create("lenet5", channels=(20, 50), fc=(500,))
    assert caffe.classifier.fc1.in_features == 50 * 5 * 5


def test_alexnet_geometry() -> None:
    m = models.create("alexnet", width=0.125, num_classes=7)
    # 224 -> conv0 (12, /4) 54 -> pool 27 -> pool 14 -> pool VALID 6: 6x6 maps feed fc0.
    assert m.classifier.fc0.in_features == 32 * 6 * 6
    assert m.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    biases = [n for n, p in m.named_parameters() if n.endswith("bias") and "bn" not in n]
    assert biases == ["classifier.fct.bias"]
    assert (
        m.features.conv1.groups == 2
        and m.features.conv3.groups == 2
        and m.features.conv4.groups == 2
    )
    assert isinstance(m.features.relu2, torch.nn.ReLU)
    bnn = models.create("alexnet", width=0.125, act="hardtanh")
    acts = [n for n, c in bnn.named_modules() if isinstance(c, torch.nn.Hardtanh)]
    assert len(acts) == 7 and not any(isinstance(c, torch.nn.ReLU) for c in bnn.modules())


def test_char_lstm_init_and_shapes() -> None:
    m = models.create("char_lstm", input_shape=(20,), num_classes=30, hidden=16)
    out = m(torch.randint(0, 30, (3, 20)))
    assert out.shape == (3, 20, 30)
    b = m.lstm.bias_ih_l0
    assert torch.equal(b[16:32], torch.ones(16)) and torch.equal(b[:16], torch.zeros(16))
    assert float(m.lstm.weight_hh_l0.detach().abs().max()) <= 0.08
    with pytest.raises(TypeError, match="integer character ids"):
        m(torch.randn(3, 20))
    with pytest.raises(ValueError, match="input shape \\(T,\\)"):
        models.create("char_lstm", input_shape=(1, 28, 28))
