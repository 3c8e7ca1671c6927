"""The methods registry: one :class:`Method` per quantization recipe, looked up by name.

A method says which weight quantizer and which input-activation quantizer each swapped layer
gets, and hooks into training (optimizer wrapping, per-parameter learning rates, a step after
``optimizer.step()``, per-epoch metrics). Method modules live in ``lowbit/methods/<family>.py``
and call :func:`register` on import; this package imports every module in it, so adding a file
is all it takes.

Writing a method (see ``methods/twn.py`` for a complete small example)::

    from lowbit.methods import Method, register
    from lowbit.nn import WeightQuantizer

    class MyWeight(WeightQuantizer):
        format = "ternary"
        def quantize(self, w):            # -> (codes int8, scales in granularity shape)
            ...

    register(Method("mine", weight=lambda layer, **o: MyWeight(granularity=o["granularity"]),
                    options={"my_option": 1.0}, description="...", paper="arXiv ..."))

or subclass :class:`Method` and override the hooks. Factories receive ``layer`` (an object with a
``.weight`` tensor: the nn.Linear / nn.Conv2d being replaced, or for LSTMs one gate matrix slot,
see :class:`lowbit.nn.WeightSlot`) and the resolved options. Create quantizer parameters on
``layer.weight``'s device and dtype (``lowbit.quantize`` also moves them there).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["COMMON_OPTIONS", "Method", "available", "get", "register"]

# Options every method accepts (granularity of the weight scales, input activations).
COMMON_OPTIONS: dict[str, Any] = {
    "granularity": "tensor",
    "group_size": None,
    "group_axis": None,
    "activations": "float",
}

Factory = Callable[..., nn.Module | None]


class Method:
    """A quantization method: quantizer factories plus training hooks with do-nothing defaults.

    Args:
        name: registry name (``lowbit.quantize(model, name)``).
        weight: ``factory(layer, **options) -> WeightQuantizer``; ``None`` keeps weights float.
        inputs: ``factory(layer, **options) -> ActQuantizer | None``; ``None`` uses the common
            ``activations`` option (``"float"``, ``"binary"``, ``"dfp8"``, ``"int8"``, an ActSpec).
        options: the method's own options and their defaults (on top of :data:`COMMON_OPTIONS`);
            unknown options are refused by :meth:`resolve_options`.
        description, paper: one line each, shown by ``lowbit`` listings and the docs.
    """

    def __init__(
        self,
        name: str,
        weight: Factory | None = None,
        inputs: Factory | None = None,
        options: dict[str, Any] | None = None,
        description: str = "",
        paper: str = "",
    ) -> None:
        self.name = name
        self._weight = weight
        self._inputs = inputs
        self.options: dict[str, Any] = dict(options or {})
        self.description = description
        self.paper = paper

    # -- options ---------------------------------------------------------------------------
    def defaults(self) -> dict[str, Any]:
        return {**COMMON_OPTIONS, **self.options}

    def resolve_options(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with ``options``; an unknown name raises ``TypeError`` listing the valid ones."""
        merged = self.defaults()
        for key, value in (options or {}).items():
            if key not in merged:
                raise TypeError(
                    f"method {self.name!r} has no option {key!r}; valid options: "
                    f"{', '.join(sorted(merged))}"
                )
            merged[key] = value
        return merged

    # -- quantizers ------------------------------------------------------------------------
    def make_weight_quantizer(self, layer: Any, **options: Any) -> nn.Module:
        """The weight quantizer for ``layer`` (forward(w) -> quantized float weight, export())."""
        from lowbit.nn import FloatWeight

        quantizer = None if self._weight is None else self._weight(layer, **options)
        return quantizer if quantizer is not None else FloatWeight()

    def make_input_quantizer(self, layer: Any, **options: Any) -> nn.Module | None:
        """The input-activation quantizer for ``layer``, or ``None`` for float inputs."""
        if self._inputs is not None:
            return self._inputs(layer, **options)
        from lowbit.nn import make_act_quantizer

        return make_act_quantizer(options.get("activations", "float"))

    # -- training hooks --------------------------------------------------------------------
    def wrap_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> torch.optim.Optimizer:
        """Wrap the optimizer (loss-aware methods do their proximal step here). Default: unchanged."""
        return optimizer

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Parameter groups for the optimizer: per-group learning rates (BNN's Glorot scaling),
        TTQ's scales without weight decay. Default: one group of every trainable parameter, so
        ``torch.optim.Adam(method.param_groups(model, lr), lr=lr)`` works for every method."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def after_step(self, model: nn.Module) -> None:
        """Called after every ``optimizer.step()`` (BNN/LAQ latent clipping). Default: nothing."""

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Numbers to log once per epoch (TTQ's Wp/Wn/sparsity). Default: none."""
        return {}

    def __repr__(self) -> str:
        return f"Method({self.name!r})"


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (a second method with the same name needs ``replace=True``)."""
    if not isinstance(method, Method):
        raise TypeError(f"register() expects a lowbit.methods.Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str | Method) -> Method:
    """The registered method called ``name`` (a :class:`Method` is returned as is)."""
    if isinstance(name, Method):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization method {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def _import_all(names: Iterable[str]) -> None:
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


# The baseline methods first, then every other module in this package (each registers itself).
_import_all(["twn"])
_import_all(
    sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if m.name != "twn" and not m.name.startswith("_")
    )
)
