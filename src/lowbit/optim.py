"""Optimizer wrappers needed by quantization methods.

:class:`LossAwareOptimizer` — the loss-aware (LAB / LAT / LAQ) training step, in the spirit of
torchao PARQ's ``QuantOptimizer``: it wraps an ordinary optimizer (Adam in the papers) and after
every ``step()``

1. clips the quantized layers' latent weights to ``[-clip, clip]`` (``[-1, 1]``, BinaryConnect
   heritage; §3.6 step 3),
2. reads Adam's second moment ``v = state["exp_avg_sq"]`` *without* bias correction — the official
   code's ``acc_t = 0.999 acc_{t-1} + 0.001 g^2`` is numerically the same thing (§3.6 step 4) —
   and forms the curvature ``d = sqrt(v) + eps`` (§3.1, ``eps = 1e-8``),
3. re-solves each quantized weight ``w_hat = Prox_D(w)`` (:meth:`LossAwareWeight.prox_update
   <lowbit.methods.loss_aware.LossAwareWeight.prox_update>`), warm-started from the previous
   codes, so the next forward pass (training or evaluation) uses the new ``w_hat``.

Optimizers without ``exp_avg_sq`` (SGD, Adamax, ...) work too: the wrapper keeps the same EMA
itself (``beta2 = 0.999``) in the base optimizer's per-parameter state under
``"lowbit_exp_avg_sq"``, so it is saved with ``state_dict()``.

The wrapper *is* a ``torch.optim.Optimizer`` (LR schedulers accept it) whose ``param_groups`` and
``state`` are the base optimizer's. Use it in your own loop::

    import torch, lowbit
    model = lowbit.quantize(MyNet(), "lat2")                   # or "lab", "lat", "laq"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = lowbit.methods.get("lat2").wrap_optimizer(model, opt)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [15, 25], 0.1)
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()                                          # Adam, clip, re-solve w_hat
        sched.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LossAwareOptimizer", "ProxTarget", "prox_targets"]


@dataclass
class ProxTarget:
    """One quantized weight: the latent ``param``, the rows of it the ``quantizer`` owns (``None`` =
    all; an LSTM gate block is ``slice(j*H, (j+1)*H)``) and a name for messages."""

    param: nn.Parameter
    quantizer: nn.Module
    rows: slice | None
    name: str

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]


def _is_prox(q: Any) -> bool:
    return callable(getattr(q, "prox_update", None))


def prox_targets(model: nn.Module) -> list[ProxTarget]:
    """Every weight of ``model`` whose quantizer has a ``prox_update(w, d)`` (the loss-aware ones).

    Linear / Conv2d layers give one target; a :class:`lowbit.nn.QuantLSTM` gives one per gate
    block (4 per matrix, 8 per layer and direction), each with its own scale.
    """
    from lowbit.nn import QuantLSTM

    out: list[ProxTarget] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLSTM):
            h = module.hidden_size
            for key in module.matrix_keys():
                pname = module.param_name(key)
                p = getattr(module, pname)
                quantizers: Any = module.weight_quantizer[key]
                for j, q in enumerate(quantizers):
                    if _is_prox(q):
                        out.append(
                            ProxTarget(p, q, slice(j * h, (j + 1) * h), f"{name}.{pname}[{j}]")
                        )
            continue
        q = getattr(module, "weight_quantizer", None)
        p = getattr(module, "weight", None)
        if _is_prox(q) and isinstance(p, torch.Tensor):
            out.append(ProxTarget(p, q, None, f"{name}.weight" if name else "weight"))  # type: ignore[arg-type]
    return out


class LossAwareOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; ``step()`` = base step, clip latents, re-solve ``w_hat`` with ``d = sqrt(v) + eps``.

    Args:
        optimizer: the base optimizer over (at least) every quantized latent weight; Adam as in the
            papers (AdamW, NAdam, ... also provide ``exp_avg_sq``).
        targets: the quantized weights (:func:`prox_targets`); build with :meth:`from_model`.
        beta2: EMA factor for the wrapper's own second moment when the base optimizer keeps none.

    ``clip`` and ``eps`` are read from each quantizer (method options ``clip`` and ``eps``).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, targets: Iterable[ProxTarget], beta2: float = 0.999
    ) -> None:
        # Deliberately no super().__init__: param_groups/state/defaults are the base optimizer's.
        self.optimizer = optimizer
        self.beta2 = float(beta2)
        self.targets = list(targets)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [t.name for t in self.targets if id(t.param) not in held]
        if missing:
            raise ValueError(
                "the optimizer does not hold the latent weights of "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; build it over "
                "model.parameters() after lowbit.quantize(model, ...)"
            )
        self._by_param: dict[int, list[ProxTarget]] = {}
        for t in self.targets:
            self._by_param.setdefault(id(t.param), []).append(t)
            t.quantizer.__dict__["_attached"] = True

    @classmethod
    def from_model(
        cls, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
    ) -> LossAwareOptimizer:
        """Wrap ``optimizer`` for every loss-aware quantized weight of ``model``."""
        if isinstance(optimizer, LossAwareOptimizer):
            return optimizer
        targets = prox_targets(model)
        if not targets:
            raise ValueError(
                "the model has no loss-aware quantized weights; call lowbit.quantize(model, 'lat') "
                "(or 'lab', 'lat2', 'laq') before wrapping the optimizer"
            )
        return cls(optimizer, targets, **kwargs)

    # -- the base optimizer's state, shared --------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LossAwareOptimizer({len(self.targets)} quantized weights, base={self.optimizer!r})"

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Base step, then :meth:`prox` (clip + re-solve). Returns the closure's loss, if any."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.prox()
        return loss

    def second_moment(self, p: torch.Tensor) -> torch.Tensor | None:
        """Adam's un-bias-corrected ``exp_avg_sq`` of ``p`` (or the wrapper's own EMA), updated this step."""
        state = self.optimizer.state.get(p)
        if state is not None and isinstance(state.get("exp_avg_sq"), torch.Tensor):
            return state["exp_avg_sq"]
        if p.grad is None:
            return None
        state = self.optimizer.state[p]
        v = state.get("lowbit_exp_avg_sq")
        if v is None:
            v = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["lowbit_exp_avg_sq"] = v
        v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
        return v

    @torch.no_grad()
    def prox(self) -> None:
        """Clip every quantized latent weight, then re-solve its ``w_hat`` with the fresh curvature.

        Weights without a gradient this step (unused branches) keep their latent value and ``w_hat``.
        """
        for targets in self._by_param.values():
            p = targets[0].param
            if p.grad is None:
                continue
            v = self.second_moment(p)
            if v is None:
                continue
            for t in targets:
                clip = getattr(t.quantizer, "clip", None)
                if clip is not None:
                    t.view(p).clamp_(-clip, clip)
            for t in targets:
                q: Any = t.quantizer
                if callable(getattr(q, "prox_update_moment", None)):
                    q.prox_update_moment(t.view(p), t.view(v))
                else:
                    q.prox_update(t.view(p), t.view(v).sqrt().add_(float(getattr(q, "eps", 1e-8))))
