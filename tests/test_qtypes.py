"""QuantizedWeight / ActSpec / level tables: hand-computed values and validation errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.qtypes import ActSpec, Granularity, QuantizedWeight, code_range, level_table


def test_dequantize_hand_computed_formats() -> None:
    codes = torch.tensor([[1, -1, 0], [0, 1, -1]], dtype=torch.int8)
    t = QuantizedWeight(codes, torch.tensor([0.5, 2.0]), "ternary", 2, "channel")
    assert t.dequantize().tolist() == [[0.5, -0.5, 0.0], [0.0, 2.0, -2.0]]
    a = QuantizedWeight(codes, torch.tensor([[0.5, 0.25]]), "ternary_asym", 2)
    assert a.dequantize().tolist() == [[0.5, -0.25, 0.0], [0.0, 0.5, -0.25]]
    b = QuantizedWeight(torch.tensor([[1, -1]], dtype=torch.int8), torch.tensor([3.0]), "binary", 1)
    assert b.dequantize().tolist() == [[3.0, -3.0]]
    lin = QuantizedWeight(
        torch.tensor([[-7, 3, 0, 7]], dtype=torch.int8), torch.tensor([0.5]), "kbit_linear", 4
    )
    assert lin.dequantize().tolist() == [[-3.5, 1.5, 0.0, 3.5]]
    log = QuantizedWeight(
        torch.tensor([[-3, -1, 0, 2, 3]], dtype=torch.int8), torch.tensor([2.0]), "kbit_log", 3
    )
    assert log.dequantize().tolist() == [[-2.0, -0.5, 0.0, 1.0, 2.0]]
    f = QuantizedWeight(torch.empty(0, dtype=torch.int8), torch.tensor([[1.5, -2.0]]), "float", 32)
    assert f.shape == (1, 2) and f.dequantize().tolist() == [[1.5, -2.0]]


def test_group_granularity_with_remainder() -> None:
    # K = 5, groups of 2 along "in": scales (out, 3), the last group has one element.
    codes = torch.ones(2, 5, dtype=torch.int8)
    qw = QuantizedWeight(
        codes, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "binary", 1, "group", 2, "in"
    )
    assert qw.dequantize().tolist() == [[1, 1, 2, 2, 3], [4, 4, 5, 5, 6]]
    out = QuantizedWeight(
        torch.ones(3, 2, dtype=torch.int8), torch.tensor([1.0, 2.0]), "binary", 1, "group", 2, "out"
    )
    assert out.dequantize().tolist() == [[1, 1], [1, 1], [2, 2]]


def test_level_tables() -> None:
    codes, mult = level_table("kbit_log", 3)
    assert codes.tolist() == [-3, -2, -1, 0, 1, 2, 3]
    assert mult.tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert level_table("binary", 1)[0].tolist() == [-1, 1]
    assert level_table("ternary", 2)[1].tolist() == [-1.0, 0.0, 1.0]
    assert code_range("kbit_linear", 4) == (-8, 7)
    assert code_range("kbit_log", 4) == (-7, 7)


def test_packed_bytes_and_sparsity() -> None:
    codes = torch.tensor([[1, 0, 0, -1, 0]] * 3, dtype=torch.int8)  # 15 codes, 9 zeros
    qw = QuantizedWeight(codes, torch.ones(3), "ternary", 2, "channel")
    assert qw.packed_bytes() == 4 + 3 * 4  # ceil(30 bits / 8) = 4, plus 3 float32 scales
    assert qw.sparsity() == pytest.approx(9 / 15)
    b = QuantizedWeight(torch.ones(10, 10, dtype=torch.int8), torch.ones(1), "binary", 1)
    assert b.packed_bytes() == 13 + 4 and b.sparsity() == 0.0


def test_validation_errors() -> None:
    codes = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown weight format"):
        QuantizedWeight(codes, torch.ones(1), "quaternary", 2)
    with pytest.raises(TypeError, match="int8"):
        QuantizedWeight(codes.float(), torch.ones(1), "ternary", 2)
    with pytest.raises(ValueError, match="must have shape"):
        QuantizedWeight(codes, torch.ones(3), "ternary", 2, "channel")
    with pytest.raises(ValueError, match="must have shape"):
        QuantizedWeight(codes, torch.ones(1), "ternary_asym", 2)
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight(codes, torch.ones(1), "ternary", 3)
    with pytest.raises(ValueError, match="2..8"):
        QuantizedWeight(codes, torch.ones(1), "kbit_linear", 12)


def test_metadata_roundtrip() -> None:
    qw = QuantizedWeight(
        torch.tensor([[1, -1, 0]], dtype=torch.int8),
        torch.tensor([[0.5, 0.5]]),
        "ternary",
        2,
        "group",
        2,
        "in",
    )
    again = QuantizedWeight.from_metadata(qw.metadata(), qw.codes, qw.scales)
    assert (
        again.metadata()
        == qw.metadata()
        == {
            "format": "ternary",
            "bits": 2,
            "granularity": "group",
            "group_size": 2,
            "group_axis": "in",
            "shape": [1, 3],
        }
    )
    assert torch.equal(again.dequantize(), qw.dequantize())


def test_actspec() -> None:
    assert ActSpec().describe() == "fp32" and ActSpec().bits == 32
    assert ActSpec("binary", bits=8).bits == 1
    assert ActSpec("dfp", 8).describe() == "dfp8"
    assert ActSpec("kbit_linear", 4, signed=False).describe() == "uint4"
    with pytest.raises(ValueError, match="activation kind"):
        ActSpec("ternary")
    with pytest.raises(ValueError, match="2..16"):
        ActSpec("dfp", 1)


def test_granularity_scale_shapes() -> None:
    assert Granularity("tensor").scale_shape((8, 3, 3, 3)) == (1,)
    assert Granularity("channel").scale_shape((8, 3, 3, 3)) == (8,)
    assert Granularity("group", 4, "in").scale_shape((8, 3, 3, 3)) == (8, 7)
    assert Granularity("group", 3, "out").scale_shape((8, 3, 3, 3)) == (3,)
