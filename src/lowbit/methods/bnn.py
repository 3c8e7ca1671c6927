"""Binarized and quantized neural networks: BNN (1-bit) and QNN (k-bit) weights *and* activations.

Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Quantized Neural Networks: Training Neural
Networks with Low Precision Weights and Activations", JMLR 18(187) 2018, arXiv 1609.07061; its
1-bit core is BNN, arXiv 1602.02830. Section numbers ``§`` refer to ``reference/papers.md``.

What a BNN layer does (§2.1-2.3, Algorithm 1; the Theano code that produced 0.96 % on MNIST):

* latent float weights ``w`` (optionally initialised ``U(-1, 1)``), binarized ``w_b = Sign(w)``
  (eq. 1, ``sign(0) = +1``) or stochastically ``+1`` with probability ``hard_sigmoid(w)`` (eq. 2-3);
  the gradient reaches ``w`` unchanged (identity STE, §2.2) and ``w`` is clipped to ``[-1, 1]``
  after every optimizer step (:meth:`BNNMethod.after_step`, :func:`clip_latent`);
* the layer's *input* is binarized by its ``input_quantizer`` (Larq's ``input_quantizer``):
  ``Sign(x)`` forward, ``g * 1{|x| <= 1}`` backward (eq. 4-5, the gradient of ``Htanh``). With
  ``lowbit.quantize``'s default ``keep=("first", "last")`` the float first layer sees real inputs
  and every hidden quantized layer sees ±1; with ``keep=()`` every layer, the first included,
  binarizes its input (use ``overrides={"<first>": {"activations": "uint8"}}`` to feed it 8-bit
  inputs instead; :func:`bitplane_linear` is the exact binary-engine form of that layer, §2.5);
* per-layer learning rates ``lr * gamma`` with ``gamma = 1/sqrt(1.5/(fan_in + fan_out))``
  (Glorot scaling of the Theano code, §2.3; :meth:`BNNMethod.param_groups`).

QNN (§2.7) replaces Sign by k-bit levels: weights ``kbit_linear`` (levels ``{0, ±1/q, ..., ±1}``,
``q = 2^(k-1) - 1``, on latent weights clipped to [-1, 1]) or ``kbit_log``, activations uniform
k-bit in [-1, 1] (``"int4"``) or logarithmic (``"log4"``), and optionally k-bit gradients
(:func:`quantize_gradient`, ``grad_bits=6``).

Also here, as options: shift-based batch norm (:class:`ShiftBatchNorm`, :func:`use_shift_batchnorm`)
and shift-based AdaMax (:class:`ShiftAdaMax`), both built on AP2 (§2.4).

Methods and options (``lowbit.quantize(model, "bnn", **options)``):

``bnn``: ``stochastic`` (False: stochastic weight binarization while training), ``stochastic_act``
(False), ``act_ste`` ("htanh": the ``1{|x|<=1}`` gate; "identity" when the model already has a
Hardtanh in front, as BinaryNet.pytorch), ``dropout`` (0.0: the rate of an ``nn.Dropout`` in front
of the binary layers; in training dropped units stay 0 and kept ones are ``±1/(1-p)``, the values
of the Theano code whose dropout follows the sign; see :class:`SignInput`), ``init`` ("keep" or "uniform"),
``clip`` (1.0, the latent range H), ``lr_scale`` ("glorot" or None), ``grad_bits`` (None),
``activations`` ("binary"; any :func:`lowbit.nn.make_act_quantizer` name).

``qnn``: the same plus ``weight_bits`` (4; 1 gives binary weights), ``weight_format``
("linear" or "log"), ``weight_scale`` ("fixed": linear levels on ``[-clip, clip]``; "max": on
``max|w|`` per unit, for LSTMs), ``activations`` ("int4"; "binary", "log4", "uint2", ...).

Your own training loop (the Trainer does the same through the Method hooks)::

    model = lowbit.quantize(net, "bnn", init="uniform")
    method = lowbit.methods.get("bnn")
    opt = torch.optim.Adam(method.param_groups(model, lr=3e-3), lr=3e-3)  # Glorot-scaled groups
    bnn.clip_after_step(opt, model)            # or call method.after_step(model) after opt.step()
    for x, y in loader:
        opt.zero_grad()
        squared_hinge(model(x), y).backward()
        opt.step()                             # latent weights are back in [-1, 1] here
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

from lowbit import functional as F
from lowbit.methods import Method, register
from lowbit.nn import (
    BinaryAct,
    KBitLinearWeight,
    KBitLogWeight,
    QuantModule,
    SignWeight,
    WeightQuantizer,
    make_act_quantizer,
)

__all__ = [
    "BNNMethod",
    "BinaryWeight",
    "ClippedKBitLinearWeight",
    "ClippedKBitLogWeight",
    "ShiftAdaMax",
    "ShiftBatchNorm",
    "SignInput",
    "bitplane_linear",
    "bitplanes",
    "clip_after_step",
    "clip_latent",
    "fans",
    "glorot_lr_scale",
    "latent_weights",
    "quantize_gradient",
    "use_shift_batchnorm",
]


# ----------------------------------------------------------------------------------------------
# Pure functions


def fans(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight as Lasagne/Theano count them (§2.3).

    Linear ``(out, in)``: ``(in, out)``. Conv ``(out, in/groups, kh, kw)``:
    ``(in/groups * kh * kw, out * kh * kw)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"fans() needs a weight of at least 2 dims, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def glorot_lr_scale(fan_in: int, fan_out: int) -> float:
    """BNN's per-layer LR factor ``gamma = 1 / H`` with ``H = sqrt(1.5 / (fan_in + fan_out))``.

    The Theano code's ``W_LR_scale = "Glorot"`` (§2.3): e.g. 784->4096 gives 57.0, 4096->4096 73.9.
    """
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def quantize_gradient(
    g: torch.Tensor,
    bits: int = 6,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """k-bit gradient quantization (QNN's 6-bit gradients, §2.7; DoReFa-style, an interpretation).

    Per tensor, ``m = max|g|`` and ``q = 2^(k-1) - 1``; the gradient becomes
    ``m/q * round_s(g * q / m)`` where ``round_s`` is stochastic rounding
    (``floor(y + u)``, ``u ~ U[0, 1)``: unbiased, ``E[result] = g``) or, with
    ``stochastic=False``, half-to-even rounding (error <= m / (2q)). DoReFa-Net uses an offset
    grid of ``2^k - 1`` levels on ``[-m, m]``; lowbit uses the symmetric k-bit grid of its weight
    codes, so a zero gradient stays exactly zero.
    """
    if bits < 2:
        raise ValueError(f"gradient quantization needs bits >= 2, got {bits}")
    m = g.abs().amax() if g.numel() else g.new_zeros(())
    if not bool(torch.isfinite(m)) or float(m) == 0.0:
        return g.clone()
    q = 2 ** (bits - 1) - 1
    y = g * (q / m)
    if stochastic:
        u = torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device)
        codes = torch.floor(y + u)
    else:
        codes = torch.round(y)
    return codes.clamp(-q, q) * (m / q)


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient by :func:`quantize_gradient`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: int, stochastic: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.bits, ctx.stochastic = bits, stochastic
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return quantize_gradient(g, ctx.bits, ctx.stochastic), None, None


def bitplanes(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The bit-planes of integer ``x``: ``(bits, *x.shape)`` int64 in {0, 1}, plane ``n-1`` = bit ``n-1``.

    Signed inputs are read in two's complement (plane ``bits-1`` is the sign bit).
    """
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise TypeError(f"bitplanes() needs an integer tensor, got {x.dtype}")
    xi = x.to(torch.int64) & ((1 << bits) - 1)
    shifts = torch.arange(bits, dtype=torch.int64, device=x.device).reshape(-1, *([1] * x.dim()))
    return (xi.unsqueeze(0) >> shifts) & 1


def bitplane_linear(
    x: torch.Tensor, w_codes: torch.Tensor, bits: int = 8, signed: bool = False
) -> torch.Tensor:
    """First-layer dot products from binary ones only (QNN §2.5): ``s = sum_n 2^(n-1) (x^n . w_b)``.

    ``x``: integer inputs ``(N, K)`` (uint8 pixels 0..255, or signed two's complement with
    ``signed=True``, whose top plane then weighs ``-2^(bits-1)``); ``w_codes``: ±1 codes
    ``(out, K)``. Each plane product ``x^n . w_b`` is a {0,1} x {±1} dot product, i.e.
    ``2 * popcount(x^n AND [w_b > 0]) - popcount(x^n)`` on a binary engine. Returns int64
    ``(N, out)`` equal to ``x @ w_b.T`` exactly.
    """
    planes = bitplanes(x, bits)  # (bits, N, K)
    wb = w_codes.to(torch.int64)
    pos = (wb > 0).to(torch.int64)  # the weight's packed bits
    out = torch.zeros(x.shape[0], w_codes.shape[0], dtype=torch.int64, device=x.device)
    for n in range(bits):
        p = planes[n]
        plane_dot = 2 * (p @ pos.T) - p.sum(1, keepdim=True)  # popcount form of x^n . w_b
        weight = -(1 << (bits - 1)) if (signed and n == bits - 1) else (1 << n)
        out += weight * plane_dot
    return out


# ----------------------------------------------------------------------------------------------
# Quantizers


class _Latent:
    """Mixin: a weight quantizer whose latent weights are clipped to ``[-clip, clip]`` and Glorot-scaled."""

    latent_clip: float = 1.0


def _uniform_init_(layer: Any, clip: float) -> None:
    with torch.no_grad():
        layer.weight.uniform_(-clip, clip)


class BinaryWeight(SignWeight, _Latent):
    """BNN weights ``Sign(w)`` (eq. 1; scale 1), or stochastic ``+1`` w.p. ``hard_sigmoid(w)`` (eq. 2-3).

    Identity straight-through gradient to the latent ``w`` (§2.2); the method clips ``w`` to
    ``[-clip, clip]`` after each step. Stochastic sampling happens only in training mode;
    ``export()`` (and eval mode) use the deterministic sign, the inference rule.
    ``grad_bits`` quantizes the gradient reaching ``w`` (:func:`quantize_gradient`).
    """

    def __init__(
        self, stochastic: bool = False, clip: float = 1.0, grad_bits: int | None = None, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.stochastic = bool(stochastic)
        self.latent_clip = float(clip)
        self.grad_bits = grad_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.stochastic and self.training:
            self.__dict__["_last_weight"] = w.detach()
            out = F.binarize(w, stochastic=True, gate=False)
        else:
            out = super().forward(w)
        if self.grad_bits:
            out = _QuantizeGrad.apply(out, int(self.grad_bits), True)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stochastic={self.stochastic}, clip={self.latent_clip}"


class ClippedKBitLinearWeight(KBitLinearWeight, _Latent):
    """QNN k-bit weights: levels ``{0, ±1/q, ..., ±1} * range`` (§2.7 LinearQuant), ``q = 2^(k-1) - 1``.

    ``scale="fixed"``: ``range = clip`` (the latent weights are clipped to ``[-clip, clip]``
    after each step, so the grid never moves; the reading for BN-followed MLPs/CNNs started from
    ``U(-1, 1)``). ``scale="max"``: ``range = max|w|`` per unit, for small-initialised layers
    without a BN after them (LSTMs).
    """

    def __init__(
        self,
        bits: int = 4,
        clip: float = 1.0,
        grad_bits: int | None = None,
        scale: str = "fixed",
        **kw: Any,
    ) -> None:
        if scale not in ("fixed", "max"):
            raise ValueError(f"weight_scale must be 'fixed' or 'max', got {scale!r}")
        super().__init__(bits=bits, clip=clip if scale == "fixed" else None, **kw)
        self.latent_clip = float(clip)
        self.scale = scale
        self.grad_bits = grad_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = super().forward(w)
        return _QuantizeGrad.apply(out, int(self.grad_bits), True) if self.grad_bits else out


class ClippedKBitLogWeight(KBitLogWeight, _Latent):
    """QNN logarithmic k-bit weights (§2.7 LogQuant, scale ``max|w|``) on latent weights clipped to [-1, 1]."""

    def __init__(
        self, bits: int = 4, clip: float = 1.0, grad_bits: int | None = None, **kw: Any
    ) -> None:
        super().__init__(bits=bits, **kw)
        self.latent_clip = float(clip)
        self.grad_bits = grad_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = super().forward(w)
        return _QuantizeGrad.apply(out, int(self.grad_bits), True) if self.grad_bits else out


def _warn_if_never_negative(x: torch.Tensor) -> None:
    """Warn once when a binary layer's first training batch has no negative input.

    Sign() of a ReLU output is +1 everywhere, so the layer sees a constant and the network cannot
    learn (a common mistake when quantizing a float CNN/MLP with "bnn"). BNN nets put BatchNorm
    and Hardtanh, not ReLU, in front of binary layers (``lowbit.models`` ``mlp_bnn``/``convnet``).
    """
    if x.numel() > 1 and bool((x.detach() >= 0).all()):
        warnings.warn(
            "a binarized layer's inputs are all >= 0 (is there a ReLU in front of it?): sign() "
            "makes them all +1 and the layer learns nothing. Use BatchNorm + Hardtanh before "
            "binary layers (as lowbit.models 'mlp_bnn' and 'convnet' do) or keep this layer float.",
            stacklevel=3,
        )


class SignInput(BinaryAct):
    """Binary input activations (BNN eq. 1-5): ``Sign(x)``, or stochastic ``+1`` w.p. ``hard_sigmoid(x)``.

    Backward ``g * 1{|x| <= 1}`` (``ste="htanh"``, eq. 4-5) or ``g`` (``ste="identity"``, when a
    Hardtanh in the model already gates, as in BinaryNet.pytorch).

    ``dropout = p > 0`` says an ``nn.Dropout(p)`` sits in front of this layer. In training an
    exact 0 (a dropped unit) then stays 0 and kept units become ``±1/(1-p)``: the values of the
    Theano code, whose dropout follows the sign. Without it a dropped unit would become
    ``Sign(0) = +1`` and kept units would lose dropout's ``1/(1-p)`` rescaling, so BatchNorm's
    running statistics (gathered in training) would not match eval inputs. Eval always gives ±1.
    """

    def __init__(self, stochastic: bool = False, ste: str = "htanh", dropout: float = 0.0) -> None:
        super().__init__(stochastic)
        if ste not in ("htanh", "identity"):
            raise ValueError(f"act_ste must be 'htanh' or 'identity', got {ste!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(
                f"dropout must be in [0, 1) (the rate of the nn.Dropout before the layer), got {dropout!r}"
            )
        self.ste = ste
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.__dict__.get("_checked_inputs", False):
            self.__dict__["_checked_inputs"] = True
            _warn_if_never_negative(x)
        stochastic, gate = self.stochastic and self.training, self.ste == "htanh"
        if not (self.dropout and self.training):
            return F.binarize(x, stochastic=stochastic, gate=gate)
        # x = z * mask / (1 - p) from the dropout: the sign (and the |z| <= 1 gate, and the
        # stochastic probability) read z itself, and the 1/(1-p) comes back once after the sign,
        # so dL/dz = g * 1{|z| <= 1} * mask / (1 - p) as in Theano's sign-then-dropout. (Binarizing
        # x gated on the scaled value and counted the 1/(1-p) twice in the gradient.)
        keep = 1.0 - self.dropout
        b = F.binarize(x * keep, stochastic=stochastic, gate=gate)
        return b * ((x.detach() != 0).to(b.dtype) / keep)

    def extra_repr(self) -> str:
        return f"sign, ste={self.ste}, stochastic={self.stochastic}, dropout={self.dropout}"


# ----------------------------------------------------------------------------------------------
# Finding the latent weights of a model


def latent_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, _Latent]]:
    """``(name, latent weight view, quantizer)`` for every weight quantized by this module's quantizers.

    LSTM gate blocks are yielded one by one (views into ``weight_ih_l0`` etc.).
    """
    for mod_name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        wq = getattr(module, "weight_quantizer", None)
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(wq, _Latent):
            yield f"{prefix}weight", module.weight, wq  # type: ignore[attr-defined]
        elif isinstance(wq, nn.ModuleDict):  # QuantLSTM: 4 gate blocks per matrix
            h = module.hidden_size  # type: ignore[attr-defined]
            for key, qs in wq.items():
                w = getattr(module, f"weight_{key}")
                for j, q in enumerate(cast(nn.ModuleList, qs)):
                    if isinstance(q, _Latent):
                        yield f"{prefix}weight_{key}.{'ifgo'[j]}", w[j * h : (j + 1) * h], q


@torch.no_grad()
def clip_latent(model: nn.Module) -> None:
    """Clip every BNN/QNN latent weight to ``[-clip, clip]`` (Algorithm 1's ``clip(W - gamma*step, -1, 1)``)."""
    for _, w, q in latent_weights(model):
        w.clamp_(-q.latent_clip, q.latent_clip)


def clip_after_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Make ``optimizer.step()`` clip ``model``'s latent weights itself (a step post-hook).

    For training loops you do not control. Returns the hook handle (``.remove()`` undoes it).
    """
    return optimizer.register_step_post_hook(lambda *_: clip_latent(model))


# ----------------------------------------------------------------------------------------------
# Shift-based batch norm and AdaMax (§2.4)


def _ap2_ste(x: torch.Tensor) -> torch.Tensor:
    """``AP2(x)`` forward, identity gradient (the shift factors are trained as their float values)."""
    return F.ste(x, F.ap2(x))


class ShiftBatchNorm(nn.Module):
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    """Shift-based batch normalization (QNN §2.4, the paper's SBN algorithm), for (N, C, ...) inputs.

    With ``C(x) = x - mean(x)`` over the batch (and spatial) dimensions::

        var  = mean(C(x) * AP2(C(x)))
        xhat = C(x) * AP2(1 / sqrt(var + eps))
        y    = AP2(gamma) * xhat + beta

    so the only multiplications are by powers of two (shifts). The printed algorithm has no
    ``beta``; we keep it (one note writes it, and the model's BN had one). Backward: every
    ``AP2`` has an identity straight-through gradient. Eval uses running statistics (momentum
    as ``nn.BatchNorm``, the shift variance estimate) through the same AP2 factors.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-4, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = (
            num_features,
            eps,
            momentum,
            affine,
        )
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> ShiftBatchNorm:
        new = cls(
            bn.num_features, bn.eps, bn.momentum if bn.momentum is not None else 0.1, bn.affine
        )
        if bn.running_mean is not None:
            new = new.to(bn.running_mean.device)
        with torch.no_grad():
            if new.weight is not None and new.bias is not None:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            if bn.running_mean is not None and bn.running_var is not None:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ShiftBatchNorm({self.num_features}) got input of shape {tuple(x.shape)}"
            )
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        if self.training:
            mu = x.mean(dims, keepdim=True)
            c = x - mu
            var = (c * _ap2_ste(c)).mean(dims, keepdim=True)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mu.detach().reshape(-1), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach().reshape(-1), alpha=m)
        else:
            c = x - self.running_mean.reshape(shape)
            var = self.running_var.reshape(shape)
        xhat = c * _ap2_ste(torch.rsqrt(var + self.eps))
        if self.weight is not None and self.bias is not None:
            xhat = _ap2_ste(self.weight).reshape(shape) * xhat + self.bias.reshape(shape)
        return xhat

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )


def use_shift_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d`` of ``model`` by a :class:`ShiftBatchNorm` in place; returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(model, name, ShiftBatchNorm.from_batchnorm(child))
        else:
            use_shift_batchnorm(child)
    return model


class ShiftAdaMax(torch.optim.Optimizer):
    """Shift-based AdaMax (QNN §2.4): AdaMax with every multiply/divide by a power of two.

    Per parameter, with gradient ``g`` and step ``t``::

        m_t   = m + AP2(1 - beta1) * (g - m)              # beta1 = 1 - 2^-3: m - m>>3 + g>>3
        v_t   = max(v - AP2(1 - beta2) * v, |g|)          # beta2 = 1 - 2^-10
        theta = theta - AP2(lr / (1 - beta1^t)) * m_t * AP2(1 / (v_t + eps))

    i.e. ``(alpha >> (1 - beta1^t)) * (m <<>> v^-1)``; with the paper's power-of-two defaults
    (``lr = 2^-10``) ``m`` and ``v`` are exactly AdaMax's and the update differs from AdaMax's by
    a factor in ``[1/2, 2]`` (two AP2 roundings). Parameter groups may carry per-group ``lr``
    (Glorot scaling: ``lr * gamma`` is AP2-rounded like any step size).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 2.0**-10,
        betas: tuple[float, float] = (1 - 2.0**-3, 1 - 2.0**-10),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"ShiftAdaMax needs lr > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"ShiftAdaMax betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            k1 = F.ap2(torch.tensor(1.0 - b1, dtype=torch.float64)).item()
            k2 = F.ap2(torch.tensor(1.0 - b2, dtype=torch.float64)).item()
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_inf"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_inf"]
                m.add_(g - m, alpha=k1)
                torch.maximum(v - v * k2, g.abs(), out=v)
                size = group["lr"] / (1 - b1 ** state["step"])
                size = F.ap2(torch.tensor(size, dtype=torch.float64)).item()
                p.sub_(m * F.ap2(1.0 / (v + group["eps"])), alpha=size)
        return loss


# ----------------------------------------------------------------------------------------------
# The methods


def _gran_kw(o: dict[str, Any]) -> dict[str, Any]:
    return {
        "granularity": o["granularity"],
        "group_size": o["group_size"],
        "group_axis": o["group_axis"],
    }


def _check_init(init: str) -> None:
    if init not in ("keep", "uniform"):
        raise ValueError(
            f"init must be 'keep' (start from the layer's weights) or 'uniform' (U(-clip, clip)), got {init!r}"
        )


def _bnn_weight(layer: Any, **o: Any) -> WeightQuantizer:
    _check_init(o["init"])
    if o["init"] == "uniform":
        _uniform_init_(layer, float(o["clip"]))
    return BinaryWeight(
        stochastic=bool(o["stochastic"]),
        clip=float(o["clip"]),
        grad_bits=o["grad_bits"],
        **_gran_kw(o),
    )


def _qnn_weight(layer: Any, **o: Any) -> WeightQuantizer:
    bits = int(o["weight_bits"])
    if bits == 1:
        return _bnn_weight(layer, **o)
    _check_init(o["init"])
    if o["init"] == "uniform":
        _uniform_init_(layer, float(o["clip"]))
    fmt = o["weight_format"]
    if fmt == "linear":
        return ClippedKBitLinearWeight(
            bits,
            clip=float(o["clip"]),
            grad_bits=o["grad_bits"],
            scale=str(o["weight_scale"]),
            **_gran_kw(o),
        )
    if fmt == "log":
        return ClippedKBitLogWeight(
            bits, clip=float(o["clip"]), grad_bits=o["grad_bits"], **_gran_kw(o)
        )
    raise ValueError(f"qnn weight_format must be 'linear' or 'log', got {fmt!r}")


def _inputs(layer: Any, **o: Any) -> nn.Module | None:
    spec = o["activations"]
    if isinstance(spec, str) and spec.strip().lower() in ("binary", "sign"):
        return SignInput(bool(o["stochastic_act"]), str(o["act_ste"]), float(o["dropout"]))
    return make_act_quantizer(spec)


class BNNMethod(Method):
    """BNN / QNN: the quantizer factories plus Algorithm 1's hooks (Glorot LR groups, latent clipping)."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """One group per latent weight with ``lr * gamma`` (``gamma`` from :func:`glorot_lr_scale`), one for the rest.

        One group of every trainable parameter when the layers were quantized with
        ``lr_scale=None`` (or none by this method). Groups carry ``lr_scale`` and ``name`` for logging; LR schedulers scale every
        group's ``lr`` alike, so the ratio is kept.
        """
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            if not isinstance(module, QuantModule):
                continue
            for pname, param, gamma in self._scaled_params(cast(nn.Module, module)):
                if id(param) in seen or gamma is None:
                    continue
                seen.add(id(param))
                full = f"{name}.{pname}" if name else pname
                groups.append(
                    {"params": [param], "lr": lr * gamma, "lr_scale": gamma, "name": full}
                )
        if not groups:
            return super().param_groups(model, lr)
        rest = [p for p in model.parameters() if id(p) not in seen]
        if rest:
            groups.insert(0, {"params": rest, "lr": lr, "lr_scale": 1.0, "name": "other"})
        return groups

    @staticmethod
    def _scaled_params(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, float | None]]:
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, _Latent):
            w = cast(nn.Parameter, module.weight)
            yield "weight", w, _lr_gamma(wq, w.shape)
        elif isinstance(wq, nn.ModuleDict):
            h = module.hidden_size  # type: ignore[attr-defined]
            for key, qs in wq.items():
                first = cast(nn.ModuleList, qs)[0]
                if isinstance(first, _Latent):
                    w = getattr(module, f"weight_{key}")
                    yield f"weight_{key}", w, _lr_gamma(first, (int(h), int(w.shape[1])))  # type: ignore[arg-type]

    def after_step(self, model: nn.Module) -> None:
        """Clip the latent weights to ``[-clip, clip]`` (Algorithm 1)."""
        clip_latent(model)

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Share of latent weights at the clip boundary (saturated: they no longer flip easily)."""
        total, sat = 0, 0
        with torch.no_grad():
            for _, w, q in latent_weights(model):
                total += w.numel()
                sat += int((w.abs() >= q.latent_clip).sum())
        return {f"{self.name}/saturated": sat / total} if total else {}


def _lr_gamma(q: _Latent, shape: tuple[int, ...] | torch.Size) -> float | None:
    if getattr(q, "lr_scale", "glorot") is None:
        return None
    return glorot_lr_scale(*fans(shape))


def _with_lr_scale(factory: Callable[..., WeightQuantizer]) -> Callable[..., WeightQuantizer]:
    def make(layer: Any, **o: Any) -> WeightQuantizer:
        scale = None if o["lr_scale"] in (None, "none", "None", "") else o["lr_scale"]
        if scale not in ("glorot", None):
            raise ValueError(
                f"lr_scale must be 'glorot' or None ('none' in TOML), got {o['lr_scale']!r}"
            )
        q = factory(layer, **o)
        q.lr_scale = scale  # type: ignore[assignment]
        return q

    return make


_SHARED = {
    "stochastic": False,
    "stochastic_act": False,
    "act_ste": "htanh",
    "dropout": 0.0,
    "init": "keep",
    "clip": 1.0,
    "lr_scale": "glorot",
    "grad_bits": None,
}

register(
    BNNMethod(
        "bnn",
        weight=_with_lr_scale(_bnn_weight),
        inputs=_inputs,
        options={**_SHARED, "activations": "binary"},
        description="binary weights and activations Sign(.), clipped latent weights, Htanh STE, Glorot LR",
        paper="Hubara et al., Quantized Neural Networks (BNN), arXiv 1609.07061 / 1602.02830",
    )
)
register(
    BNNMethod(
        "qnn",
        weight=_with_lr_scale(_qnn_weight),
        inputs=_inputs,
        options={
            **_SHARED,
            "activations": "int4",
            "weight_bits": 4,
            "weight_format": "linear",
            "weight_scale": "fixed",
        },
        description="k-bit linear/log weights and activations (QNN), clipped latent weights, optional k-bit gradients",
        paper="Hubara et al., Quantized Neural Networks, arXiv 1609.07061",
    )
)
