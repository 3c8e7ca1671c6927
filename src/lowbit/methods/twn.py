"""Baseline methods: ``fp`` (no quantization), ``twn`` (ternary weight networks), ``bwn`` (scaled binary).

* ``twn``: Li & Liu, "Ternary Weight Networks", arXiv 1605.04711. Weights ``alpha * {-1, 0, +1}``
  with ``Delta = 0.7 * mean|w|`` (their eq. 10, ``rule="0.7"``, the default) or the exact
  minimiser of ``||w - alpha * t||²`` (``rule="exact"``, the sorted search of papers.md §4.1).
  Identity straight-through gradient to the latent float weights.
* ``bwn``: BinaryConnect / BWN (Courbariaux et al. 1511.00363; Rastegari et al. 1603.05279):
  ``alpha * sign(w)`` with ``alpha = mean|w|`` per unit, identity straight-through gradient.
* ``fp``: layers are swapped for Quant* layers with float (identity) quantizers, so summaries and
  the training loop see the same structure; numerically identical to the float model.

Options (besides the common ``granularity``/``group_size``/``group_axis``/``activations``):
``twn``: ``rule`` ("0.7" or "exact").
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit import functional as F
from lowbit.methods import Method, register
from lowbit.nn import FloatWeight, WeightQuantizer

__all__ = ["BWNWeight", "TWNWeight"]


class TWNWeight(WeightQuantizer):
    """Ternary ``alpha * codes`` per unit from :func:`lowbit.functional.twn` (identity STE)."""

    format = "ternary"

    def __init__(self, rule: str = "0.7", **kw: Any) -> None:
        if rule not in ("0.7", "exact"):
            raise ValueError(f"TWN rule must be '0.7' or 'exact', got {rule!r}")
        super().__init__(**kw)
        self.rule = rule

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, codes = F.twn(w, self.rule, self.granularity, codes_dtype=w.dtype)
        return codes, alpha

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule}"


class BWNWeight(WeightQuantizer):
    """Scaled binary ``mean|w| * sign(w)`` per unit from :func:`lowbit.functional.bwn` (identity STE)."""

    format = "binary"

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, codes = F.bwn(w, self.granularity, codes_dtype=w.dtype)
        return codes, alpha


def _gran_kw(o: dict[str, Any]) -> dict[str, Any]:
    return {
        "granularity": o["granularity"],
        "group_size": o["group_size"],
        "group_axis": o["group_axis"],
    }


register(
    Method(
        "fp",
        weight=lambda layer, **o: FloatWeight(),
        description="full precision (identity quantizers; the float baseline)",
    )
)
register(
    Method(
        "twn",
        weight=lambda layer, **o: TWNWeight(rule=str(o["rule"]), **_gran_kw(o)),
        options={"rule": "0.7"},
        description="ternary weights alpha*{-1,0,1}, Delta = 0.7 mean|w| or the exact optimum",
        paper="Li & Liu, Ternary Weight Networks, arXiv 1605.04711",
    )
)
register(
    Method(
        "bwn",
        weight=lambda layer, **o: BWNWeight(**_gran_kw(o)),
        description="binary weights mean|w|*sign(w) (BinaryConnect / BWN)",
        paper="Courbariaux et al. 1511.00363; Rastegari et al. 1603.05279",
    )
)
