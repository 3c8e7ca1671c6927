"""Quantizer modules and quantized layers: the state half of the function -> quantizer -> layer split.

* :class:`WeightQuantizer` — base class of every weight quantizer. A subclass sets ``format`` and
  implements ``quantize(w) -> (codes, scales)``; the base class turns that into a forward pass
  (the dequantized weight, straight-through gradient) and an :meth:`~WeightQuantizer.export` to
  :class:`~lowbit.qtypes.QuantizedWeight` that dequantizes to exactly the forward weight.
  Quantizers with learned scales or their own gradients (TTQ) override ``forward`` too.
* :class:`ActQuantizer` — base class of input-activation quantizers (:class:`BinaryAct`,
  :class:`LinearAct`, :class:`LogAct`, :class:`DFPAct`), each describing itself as an
  :class:`~lowbit.qtypes.ActSpec`.
* :class:`QuantLinear`, :class:`QuantConv2d`, :class:`QuantLSTM` — drop-in subclasses of the torch
  layers with the same parameter names (``weight``/``bias``, ``weight_ih_l0``, ...), holding the
  latent float weights, a ``weight_quantizer`` and an optional ``input_quantizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as TF
from torch import nn

from lowbit import functional as F
from lowbit.qtypes import FORMAT_BITS, ActSpec, Granularity, QuantizedWeight

__all__ = [
    "ActQuantizer",
    "BinaryAct",
    "DFPAct",
    "FloatWeight",
    "KBitLinearWeight",
    "KBitLogWeight",
    "LinearAct",
    "LogAct",
    "QuantConv2d",
    "QuantLSTM",
    "QuantLinear",
    "QuantModule",
    "SignWeight",
    "WeightQuantizer",
    "WeightSlot",
    "make_act_quantizer",
]


# ----------------------------------------------------------------------------------------------
# Weight quantizers


class _QuantizeSTE(torch.autograd.Function):
    """Forward: ``dequantize(*quantizer.quantize(w))``; backward: ``g * grad_mask(w)`` (or ``g``).

    One autograd node instead of the ``w_q + (w - w.detach())`` arithmetic: no extra passes over
    the weight in the forward, none in the backward when there is no mask (QAT step overhead).
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:  # type: ignore[override]
        w_q = quantizer.dequantized(w)
        mask = quantizer.grad_mask(w)
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)
        return w_q.to(w.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            return g * mask, None
        return g, None


class WeightQuantizer(nn.Module):
    """Base weight quantizer: ``forward(w) -> quantized float weight``, ``export(w) -> QuantizedWeight``.

    Subclasses set the class attribute ``format`` (a :data:`~lowbit.qtypes.WEIGHT_FORMATS` name)
    and implement :meth:`quantize`. Optionally override :meth:`grad_mask` (a per-element factor
    for the latent gradient; default identity STE). The forward weight is
    ``functional.dequantize(*quantize(w))``, and ``export`` calls the same function's inputs, so
    ``export(w).dequantize()`` equals ``forward(w)`` bit for bit (float32 models).

    ``export()`` without an argument uses the weight this quantizer saw in its last forward pass;
    layers call ``export(self.weight)`` (see ``QuantLinear.quantized_weight``).

    Gradients: with no trainable parameters of its own, the forward is a single autograd node
    (value ``dequantize(*quantize(w))``, gradient ``g * grad_mask(w)``). If the quantizer owns
    trainable parameters (learned scales) that ``quantize`` uses differentiably, the forward
    keeps autograd through ``quantize`` so they receive their gradient (:func:`functional.ste`).
    """

    format: str = "float"

    def __init__(
        self,
        *,
        bits: int | None = None,
        granularity: Any = None,
        group_size: int | None = None,
        group_axis: str | None = None,
    ) -> None:
        super().__init__()
        if bits is None:
            bits = FORMAT_BITS.get(self.format)
            if bits is None:
                raise ValueError(f"{type(self).__name__} ({self.format}) needs bits=")
        self.bits = int(bits)
        self.granularity = Granularity.of(granularity, group_size, group_axis)

    # -- to implement ----------------------------------------------------------------------
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes of w.shape, scales in granularity shape)`` for the detached weight ``w``.

        Codes may be returned in ``w``'s float dtype (saves two casts per training step);
        :meth:`export` converts them to int8.
        """
        raise NotImplementedError

    def grad_mask(self, w: torch.Tensor) -> torch.Tensor | None:
        """Per-element factor applied to the gradient reaching the latent weight (None = identity)."""
        return None

    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """The forward weight of the detached ``w``: ``functional.dequantize(*quantize(w))``.
        A quantizer may compute the same values faster (the loss-aware one does, in C++)."""
        codes, scales = self.quantize(w)
        return F.dequantize(codes, scales, self.format, self.bits, self.granularity, w.shape)

    # -- provided --------------------------------------------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.__dict__["_last_weight"] = w.detach()  # shares storage; deepcopy-safe
        if any(p.requires_grad for p in self.parameters(recurse=False)) and torch.is_grad_enabled():
            # Learned scales: keep autograd through quantize() so they get their gradient.
            wd = w.detach()
            codes, scales = self.quantize(wd)
            w_q = F.dequantize(codes, scales, self.format, self.bits, self.granularity, wd.shape)
            return F.ste(w, w_q, self.grad_mask(wd))
        return _QuantizeSTE.apply(w, self)

    def _resolve(self, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            w = self.__dict__.get("_last_weight")
            if w is None:
                raise RuntimeError(
                    f"{type(self).__name__}.export() needs the latent weight: pass it "
                    "(export(layer.weight)) or call layer.quantized_weight()"
                )
        return w

    def export(self, w: torch.Tensor | None = None) -> QuantizedWeight:
        """The :class:`QuantizedWeight` of ``w`` (dequantizes to exactly this quantizer's forward)."""
        w = self._resolve(w)
        with torch.no_grad():
            codes, scales = self.quantize(w.detach())
        return QuantizedWeight(
            codes=codes.to(torch.int8),
            scales=scales.detach().to(torch.float32),
            format=self.format,
            bits=self.bits,
            granularity=self.granularity.kind,
            group_size=self.granularity.group_size,
            group_axis=self.granularity.axis,
            shape=tuple(w.shape),
        )

    def describe(self) -> str:
        """Short precision label for reprs and the summary, e.g. ``ternary/channel``."""
        bits = "" if self.format in FORMAT_BITS else str(self.bits)
        return f"{self.format}{bits}/{self.granularity.describe()}"

    def extra_repr(self) -> str:
        return f"format={self.format}, bits={self.bits}, granularity={self.granularity.describe()}"


class FloatWeight(WeightQuantizer):
    """Identity (method ``fp``): the weight stays float32; exports the ``float`` format."""

    format = "float"

    def __init__(self, **_: Any) -> None:
        super().__init__(bits=32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.__dict__["_last_weight"] = w.detach()  # shares storage; deepcopy-safe
        return w

    def export(self, w: torch.Tensor | None = None) -> QuantizedWeight:
        w = self._resolve(w)
        return QuantizedWeight(
            codes=torch.empty(0, dtype=torch.int8, device=w.device),
            scales=w.detach().to(torch.float32).clone(),
            format="float",
            bits=32,
            shape=tuple(w.shape),
        )

    def describe(self) -> str:
        return "fp32"


class SignWeight(WeightQuantizer):
    """Unscaled binary weights ``sign(w)`` with the identity STE (BNN weights, §2.2; scale 1)."""

    format = "binary"

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales = torch.ones(self.granularity.scale_shape(w.shape), dtype=w.dtype, device=w.device)
        return F.sign(w), scales

    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """``sign(w)`` itself: the scale is 1, so the general ``codes * scale`` would be one more
        pass over the weight (and one more allocation) at every training step."""
        return F.sign(w)


def check_kbit_bits(bits: int, what: str) -> None:
    """k-bit weight quantizers take 2..8 bits: said when the quantizer is made, not at its first
    forward pass."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{what} supports 2..8 bits, got {bits!r}")


class KBitLinearWeight(WeightQuantizer):
    """Symmetric uniform k-bit weights, range ``max|w|`` per unit (or a fixed ``clip``), identity STE."""

    format = "kbit_linear"

    def __init__(self, bits: int = 4, clip: float | None = None, **kw: Any) -> None:
        check_kbit_bits(bits, self.format)
        super().__init__(bits=bits, **kw)
        self.clip = clip

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step, codes = F.kbit_linear(w, self.bits, self.granularity, self.clip, codes_dtype=w.dtype)
        return codes, step

    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """``codes * step`` in one C++ pass for one step per tensor on large CPU float32 weights
        (the step computed as in :func:`functional.kbit_linear`; the same values)."""
        if self.granularity.kind != "tensor" or not F._sign_ops_apply(w):
            return super().dequantized(w)
        from lowbit import kernels

        q = 2 ** (self.bits - 1) - 1
        step = F.kbit_step(w, self.bits, self.granularity, self.clip)
        out, _ = kernels.kbit_fake(w, float(step.reshape(())), -q, q, 0.0, 0.0)
        return out

    def grad_mask(self, w: torch.Tensor) -> torch.Tensor | None:
        return None if self.clip is None else (w.abs() <= self.clip).to(w.dtype)


class KBitLogWeight(WeightQuantizer):
    """Logarithmic k-bit weights, scale ``max|w|`` per unit (nearest power-of-two level), identity STE."""

    format = "kbit_log"

    def __init__(self, bits: int = 3, **kw: Any) -> None:
        check_kbit_bits(bits, self.format)
        super().__init__(bits=bits, **kw)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, codes = F.kbit_log(w, self.bits, self.granularity)
        return codes, scale


@dataclass
class WeightSlot:
    """What a quantizer factory sees for one LSTM gate matrix: ``weight`` (that slice), its name, the LSTM."""

    weight: torch.Tensor
    name: str
    parent: nn.Module


# ----------------------------------------------------------------------------------------------
# Activation quantizers


class ActQuantizer(nn.Module):
    """Base input-activation quantizer: ``forward(x) -> quantized float x``; ``spec()`` says what it is."""

    def spec(self) -> ActSpec:
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec().describe()

    def extra_repr(self) -> str:
        return self.describe()


class BinaryAct(ActQuantizer):
    """Sign activations with the Htanh STE (BNN eq. 4-5): ±1 forward, ``g * 1{|x| <= 1}`` backward."""

    def __init__(self, stochastic: bool = False) -> None:
        super().__init__()
        self.stochastic = stochastic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.binarize(x, stochastic=self.stochastic and self.training)

    def spec(self) -> ActSpec:
        return ActSpec("binary")


def _check_act_bits(kind: str, bits: int, lowest: int) -> None:
    """Activation bit widths outside what the format can represent fail when the layer is built,
    not at its first forward (``int1`` has no nonzero symmetric level)."""
    if not lowest <= bits <= 16:
        raise ValueError(f"{kind} activations take {lowest} to 16 bits, got {bits}")


class LinearAct(ActQuantizer):
    """Uniform k-bit activations in ``[-clip, clip]`` (or ``[0, clip]`` unsigned), STE with saturation."""

    def __init__(self, bits: int = 8, clip: float = 1.0, signed: bool = True) -> None:
        super().__init__()
        self.bits, self.clip, self.signed = int(bits), float(clip), bool(signed)
        _check_act_bits("uniform k-bit", self.bits, 2 if self.signed else 1)
        if not self.clip > 0:
            raise ValueError(f"activation clip must be positive, got {clip}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear_fake_quantize(x, self.bits, self.clip, self.signed)

    def spec(self) -> ActSpec:
        _, hi = F.linear_qrange(self.bits, self.signed)
        return ActSpec("kbit_linear", self.bits, self.signed, scale=self.clip / hi, clip=self.clip)


class LogAct(ActQuantizer):
    """Power-of-two activations ``scale * {0, ±2^-(n-1), ..., ±1}`` (QNN LogQuant, §2.7)."""

    def __init__(self, bits: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.bits, self.scale = int(bits), float(scale)
        _check_act_bits("logarithmic", self.bits, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_fake_quantize(x, self.bits, self.scale)

    def spec(self) -> ActSpec:
        return ActSpec("kbit_log", self.bits, True, scale=self.scale, clip=self.scale)


class DFPAct(ActQuantizer):
    """k-bit dynamic fixed point (DFP §4.2): one power-of-two exponent per tensor and batch.

    ``exponent=None`` picks it from ``max|x|`` every call (recorded in ``last_exponent``);
    an int fixes it (calibrated), saturating values out of range.
    """

    def __init__(self, bits: int = 8, signed: bool = True, exponent: int | None = None) -> None:
        super().__init__()
        self.bits, self.signed, self.exponent = int(bits), bool(signed), exponent
        if self.signed is not None:
            _check_act_bits("dynamic fixed point", self.bits, 2 if self.signed else 1)
        self.last_exponent: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.dfp_exponent(x, self.bits, self.signed) if self.exponent is None else self.exponent
        self.last_exponent = e
        return F.dfp_fake_quantize(x, self.bits, self.signed, e)

    def spec(self) -> ActSpec:
        return ActSpec("dfp", self.bits, self.signed, exponent=self.exponent)


def make_act_quantizer(spec: str | ActSpec | None) -> ActQuantizer | None:
    """An activation quantizer from a short name or an :class:`ActSpec`; ``None`` for float.

    Names: ``"float"``/``"fp32"``, ``"binary"``/``"sign"``, ``"dfp8"`` (any bits; ``"udfp8"``
    unsigned), ``"int8"``/``"uint4"`` (uniform k-bit in [-1, 1] / [0, 1]), ``"log4"``.
    """
    if spec is None or isinstance(spec, ActQuantizer):
        return spec
    if isinstance(spec, ActSpec):
        if spec.kind == "float":
            return None
        if spec.kind == "binary":
            return BinaryAct()
        if spec.kind == "dfp":
            return DFPAct(spec.bits, spec.signed, spec.exponent)
        if spec.kind == "kbit_linear":
            return LinearAct(spec.bits, spec.clip if spec.clip is not None else 1.0, spec.signed)
        return LogAct(spec.bits, spec.scale if spec.scale is not None else 1.0)
    name = str(spec).strip().lower()
    if name in ("float", "fp32", "fp", "none", ""):
        return None
    if name in ("binary", "sign"):
        return BinaryAct()
    for prefix, build in (
        ("udfp", lambda b: DFPAct(b, signed=False)),
        ("dfp", lambda b: DFPAct(b)),
        ("uint", lambda b: LinearAct(b, 1.0, signed=False)),
        ("int", lambda b: LinearAct(b, 1.0)),
        ("log", lambda b: LogAct(b)),
    ):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return build(int(name[len(prefix) :]))
    raise ValueError(
        f"unknown activation spec {spec!r}: use 'float', 'binary', 'dfp<bits>', 'udfp<bits>', "
        "'int<bits>', 'uint<bits>', 'log<bits>' or a lowbit.qtypes.ActSpec"
    )


def _describe_input(q: nn.Module | None) -> str:
    if q is None:
        return "fp32"
    describe = getattr(q, "describe", None)
    return describe() if callable(describe) else type(q).__name__


def _describe_weight(q: nn.Module) -> str:
    describe = getattr(q, "describe", None)
    return describe() if callable(describe) else type(q).__name__


# ----------------------------------------------------------------------------------------------
# Layers


class QuantModule:
    """Mixin marking lowbit's quantized layers (``isinstance(m, QuantModule)``)."""

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """Every quantized weight of the layer, by parameter name (``{"weight": ...}`` for Linear/Conv)."""
        raise NotImplementedError

    def weight_pairs(self) -> list[tuple[torch.Tensor, Any]]:
        """``(latent weight, its quantizer)`` for every quantized weight (LSTM: each gate block)."""
        raise NotImplementedError


# Quantizers that cache a solution for the latent weight they were solved for (the loss-aware
# ones: the forward weight is the stored solution of the last proximal step, not a function of
# the weight alone) must keep that solution when the layer is reloaded or copied: re-solving from
# the warm start can land elsewhere (LAQ's alternation), so a reloaded, copied or packed model
# would no longer be the model that was trained and evaluated. The layer, which sees both the
# weight and the quantizer, hands the quantizer its new weight after a load (a
# load_state_dict post-hook), after a copy or unpickling (__getstate__ / __setstate__) and after a
# cast or move (``.to()``, ``.double()``, ``.cuda()``: ``_apply`` gives the weight new storage).


def _adopt_after_load(module: Any, incompatible_keys: Any) -> None:
    for w, q in module.weight_pairs():
        adopt = getattr(q, "adopt_loaded", None)
        if adopt is not None:
            adopt(w)


def _solved_flags(module: Any) -> list[bool]:
    return [bool(getattr(q, "solved_for", lambda w: False)(w)) for w, q in module.weight_pairs()]


def _state_with_solutions(module: Any, state: dict[str, Any]) -> dict[str, Any]:
    state["_lowbit_solved_for"] = _solved_flags(module)
    return state


def _adopt_after_copy(module: Any, flags: list[bool] | None) -> None:
    if not flags:
        return
    for (w, q), ok in zip(module.weight_pairs(), flags, strict=False):
        if ok and hasattr(q, "adopt_copied"):
            q.adopt_copied(w)


def _apply_keeping_solutions(module: Any, apply: Any, fn: Any, recurse: bool) -> Any:
    """``Module._apply`` (a cast or move) that hands each cached solution to the new weight."""
    flags = _solved_flags(module)
    out = apply(fn, recurse)
    _adopt_after_copy(module, flags)
    return out


_Q = TypeVar("_Q", bound=nn.Module)


def _take_params(new: _Q, module: nn.Module) -> _Q:
    """Give ``new`` ``module``'s own Parameter objects (optimizers holding them stay valid)."""
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


class _OneWeightQuant(QuantModule):
    """What QuantLinear and QuantConv2d share: one ``weight`` and its ``weight_quantizer``.

    Listed before the torch layer in the bases, so ``super().extra_repr()`` is the torch layer's.
    """

    weight_quantizer: Any
    input_quantizer: Any

    def _set_quantizers(
        self, weight_quantizer: nn.Module | None, input_quantizer: nn.Module | None
    ) -> None:
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else FloatWeight()
        self.input_quantizer = input_quantizer
        self.register_load_state_dict_post_hook(_adopt_after_load)  # type: ignore[attr-defined]

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> QuantizedWeight:
        return self.weight_quantizer.export(self.weight)  # type: ignore[attr-defined]

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {"weight": self.quantized_weight()}

    def weight_pairs(self) -> list[tuple[torch.Tensor, Any]]:
        return [(self.weight, self.weight_quantizer)]  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        return _state_with_solutions(self, super().__getstate__())  # type: ignore[misc, arg-type]

    def __setstate__(self, state: dict[str, Any]) -> None:
        flags = state.pop("_lowbit_solved_for", None)
        super().__setstate__(state)  # type: ignore[misc]
        _adopt_after_copy(self, flags)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        return _apply_keeping_solutions(self, super()._apply, fn, recurse)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight={_describe_weight(self.weight_quantizer)}, "  # type: ignore[misc]
            f"input={_describe_input(self.input_quantizer)}"
        )


class QuantLinear(_OneWeightQuant, nn.Linear):
    """``nn.Linear`` whose forward uses ``weight_quantizer(weight)`` and ``input_quantizer(x)``."""

    weight_quantizer: Any  # a WeightQuantizer (any module with forward(w) and export(w))
    input_quantizer: Any  # an ActQuantizer or None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_quantizer: nn.Module | None = None,
        input_quantizer: nn.Module | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._set_quantizers(weight_quantizer, input_quantizer)

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_quantizer: nn.Module,
        input_quantizer: nn.Module | None = None,
    ) -> QuantLinear:
        """Wrap ``module``'s own Parameter objects (optimizers holding them stay valid)."""
        new = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            weight_quantizer,
            input_quantizer,
            device="meta",
        )
        return _take_params(new, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(self._quantized_input(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(_OneWeightQuant, nn.Conv2d):
    """``nn.Conv2d`` (any stride/padding/dilation/groups/padding_mode) with quantized weight and input.

    Zero padding is applied to the *quantized* input, so binary activations see 0 at the border
    (the packed kernels reproduce this).
    """

    weight_quantizer: Any  # a WeightQuantizer (any module with forward(w) and export(w))
    input_quantizer: Any  # an ActQuantizer or None

    def __init__(
        self,
        *args: Any,
        weight_quantizer: nn.Module | None = None,
        input_quantizer: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._set_quantizers(weight_quantizer, input_quantizer)

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        weight_quantizer: nn.Module,
        input_quantizer: nn.Module | None = None,
    ) -> QuantConv2d:
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
        )
        return _take_params(new, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self._quantized_input(x), self.weight_quantizer(self.weight), self.bias
        )


def lstm_inputs(
    kind: str, lstm: Any, input: Any, hx: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Checked LSTM arguments, as :class:`QuantLSTM` and ``PackedLSTM`` use them: the input
    time-major ``(T, B, input_size)``, ``h0`` and ``c0`` ``(layers * dirs, B, hidden_size)``
    (zeros when ``hx`` is None) and whether the input was unbatched ``(T, input_size)``.
    Shapes are checked the way ``nn.LSTM`` checks them (the fused kernel does not)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise TypeError(
            f"{kind} does not take PackedSequence inputs; pad the batch "
            "(nn.utils.rnn.pad_packed_sequence)"
        )
    if input.dim() not in (2, 3) or input.shape[-1] != lstm.input_size:
        order = "(B, T" if lstm.batch_first else "(T, B"
        raise ValueError(
            f"{kind} expects (T, {lstm.input_size}) or {order}, {lstm.input_size}) inputs "
            f"(input_size={lstm.input_size}); got {tuple(input.shape)}"
        )
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if lstm.batch_first else input)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    want = (states, x.shape[1], lstm.hidden_size)
    if hx is None:
        zeros = x.new_zeros(want)
        return x, zeros, zeros, unbatched
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{kind}: hx must be a pair (h0, c0)")
    h0, c0 = hx
    shown = (states, lstm.hidden_size) if unbatched else want
    if tuple(h0.shape) != shown or tuple(c0.shape) != shown:
        raise ValueError(
            f"{kind}: h0 and c0 must be {shown} (layers x directions, "
            f"{'' if unbatched else 'batch, '}hidden_size); got {tuple(h0.shape)}, {tuple(c0.shape)}"
        )
    if unbatched:
        h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    return x, h0, c0, unbatched


GATES = ("i", "f", "g", "o")  # PyTorch's row order inside weight_ih / weight_hh


class QuantLSTM(nn.LSTM, QuantModule):
    """``nn.LSTM`` whose 8 gate matrices per layer and direction are quantized separately.

    ``weight_ih_l{k}`` and ``weight_hh_l{k}`` (4H rows in the order i, f, g, o) are each cut
    into their 4 gate blocks; each block has its own weight quantizer and therefore its own
    scale(s), as in the LAQ char-LSTMs (§3.6). ``weight_quantizer`` is a ModuleDict keyed
    ``"ih_l0"``, ``"hh_l0"``, ``"ih_l0_reverse"``, ... of 4-quantizer ModuleLists.
    ``input_quantizer`` (if any) quantizes the module's input sequence; hidden states stay float.

    The cell loop runs in PyTorch; with float quantizers it matches ``nn.LSTM`` to rounding.
    Supports num_layers, bias, batch_first, dropout, bidirectional, unbatched input and (h0, c0);
    not ``proj_size`` or PackedSequence.
    """

    weight_quantizer: nn.ModuleDict
    input_quantizer: Any  # an ActQuantizer or None

    def __init__(
        self,
        *args: Any,
        weight_quantizer: nn.ModuleDict | None = None,
        input_quantizer: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise ValueError(
                "QuantLSTM does not support proj_size > 0; quantize this LSTM with exclude=[...] to keep it float"
            )
        if weight_quantizer is None:
            weight_quantizer = nn.ModuleDict(
                {key: nn.ModuleList([FloatWeight() for _ in GATES]) for key in self.matrix_keys()}
            )
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.register_load_state_dict_post_hook(_adopt_after_load)

    def weight_pairs(self) -> list[tuple[torch.Tensor, Any]]:
        h = self.hidden_size
        return [
            (getattr(self, self.param_name(key))[j * h : (j + 1) * h], self._gate_quantizer(key, j))
            for key in self.matrix_keys()
            for j in range(len(GATES))
        ]

    def __getstate__(self) -> dict[str, Any]:
        return _state_with_solutions(self, super().__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:
        flags = state.pop("_lowbit_solved_for", None)
        super().__setstate__(state)
        _adopt_after_copy(self, flags)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        return _apply_keeping_solutions(self, super()._apply, fn, recurse)

    def matrix_keys(self) -> list[str]:
        keys = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                keys += [f"ih_l{layer}{suffix}", f"hh_l{layer}{suffix}"]
        return keys

    @staticmethod
    def param_name(key: str) -> str:
        return f"weight_{key}"

    @classmethod
    def from_float(
        cls,
        module: nn.LSTM,
        weight_quantizer: nn.ModuleDict,
        input_quantizer: nn.Module | None = None,
    ) -> QuantLSTM:
        if module.proj_size:
            raise ValueError(
                "QuantLSTM does not support nn.LSTM(proj_size > 0); keep this LSTM float with exclude=[<its name>]"
            )
        new = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device="meta",
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
        )
        for name in module._flat_weights_names:
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new

    def gate_slots(self, key: str) -> list[WeightSlot]:
        w = getattr(self, self.param_name(key))
        h = self.hidden_size
        return [
            WeightSlot(w[j * h : (j + 1) * h].detach(), f"{self.param_name(key)}.{g}", self)
            for j, g in enumerate(GATES)
        ]

    def quantized_matrix(self, key: str) -> torch.Tensor:
        w = getattr(self, self.param_name(key))
        h = self.hidden_size
        return torch.cat(
            [self._gate_quantizer(key, j)(w[j * h : (j + 1) * h]) for j in range(4)], dim=0
        )

    def _gate_quantizer(self, key: str, gate: int) -> Any:
        quantizers = self.weight_quantizer[key]
        assert isinstance(quantizers, nn.ModuleList)
        return quantizers[gate]

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        out = {}
        h = self.hidden_size
        for key in self.matrix_keys():
            w = getattr(self, self.param_name(key))
            for j, g in enumerate(GATES):
                out[f"{self.param_name(key)}.{g}"] = self._gate_quantizer(key, j).export(
                    w[j * h : (j + 1) * h]
                )
        return out

    def forward(  # type: ignore[override]
        self, input: Any, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x, h0, c0, unbatched = lstm_inputs("QuantLSTM", self, input, hx)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        # PyTorch's fused LSTM with the quantized gate matrices in place of the latent ones: the
        # same math as the cell loop in `reference_forward` (hidden states stay float), ~6x faster;
        # gradients reach the latent weights through each gate quantizer's straight-through path.
        flat: list[torch.Tensor] = []
        for name in self._flat_weights_names:
            key = name[len("weight_") :] if name.startswith("weight_") else None
            flat.append(self.quantized_matrix(key) if key else getattr(self, name))
        output, hn, cn = torch._VF.lstm(  # type: ignore[attr-defined]
            x,
            (h0, c0),
            flat,
            self.bias,
            self.num_layers,
            float(self.dropout),
            self.training,
            self.bidirectional,
            False,
        )
        if unbatched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)

    def reference_forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The LSTM written out step by step (tests check :meth:`forward` against it)."""
        x, h0, c0, unbatched = lstm_inputs("QuantLSTM", self, input, hx)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        steps, batch = x.shape[0], x.shape[1]
        dirs = 2 if self.bidirectional else 1
        h_size = self.hidden_size
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(dirs):
                suffix = "_reverse" if d else ""
                w_ih = self.quantized_matrix(f"ih_l{layer}{suffix}")
                w_hh = self.quantized_matrix(f"hh_l{layer}{suffix}")
                b_ih = getattr(self, f"bias_ih_l{layer}{suffix}") if self.bias else None
                b_hh = getattr(self, f"bias_hh_l{layer}{suffix}") if self.bias else None
                xw = TF.linear(layer_input, w_ih, b_ih)
                idx = layer * dirs + d
                h, c = h0[idx], c0[idx]
                out: list[Any] = [None] * steps
                order = range(steps - 1, -1, -1) if d else range(steps)
                for t in order:
                    gates = xw[t] + TF.linear(h, w_hh, b_hh)
                    i, f, g, o = gates.chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    out[t] = h
                outputs.append(torch.stack(out, 0) if steps else xw.new_zeros(0, batch, h_size))
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if dirs == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = TF.dropout(layer_input, self.dropout, True)
        output = layer_input
        hn, cn = torch.stack(h_n, 0), torch.stack(c_n, 0)
        if unbatched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)

    def extra_repr(self) -> str:
        first = self._gate_quantizer(self.matrix_keys()[0], 0)
        return f"{super().extra_repr()}, weight={_describe_weight(first)} x{4 * len(self.matrix_keys())} gate blocks, input={_describe_input(self.input_quantizer)}"
