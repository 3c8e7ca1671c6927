"""Model registry: ``register`` a builder under a name, ``create`` it by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["ModelSpec", "available", "create", "describe", "register"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder, default shapes, task and a one-line description."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str,
    description: str,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    task: str = "classification",
    **defaults: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(input_shape=..., num_classes=..., **kw)`` as ``name``.

    ``defaults`` are keyword arguments applied before the caller's (presets such as ``mlp_laq``).
    """

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name, builder, description, tuple(input_shape), num_classes, task, dict(defaults)
        )
        return builder

    return deco


def available() -> list[str]:
    """Names of the registered models."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create(
    name: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``input_shape`` (one sample) and ``num_classes`` (defaults: the
    model's reference dataset). ``kwargs`` are the model's own options."""
    spec = get_spec(name)
    options = {**spec.defaults, **kwargs}
    valid = _builder_options(spec.builder)
    unknown = sorted(k for k in options if valid is not None and k not in valid)
    if unknown:
        raise TypeError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(valid or ()))}"
        )
    model = spec.builder(
        input_shape=tuple(input_shape) if input_shape is not None else spec.input_shape,
        num_classes=num_classes if num_classes is not None else spec.num_classes,
        **options,
    )
    # What `lowbit.save` records so the file rebuilds this model without the caller's code.
    model.lowbit_architecture = {  # type: ignore[assignment]
        "name": name,
        "options": {
            "input_shape": list(input_shape) if input_shape is not None else None,
            "num_classes": num_classes,
            **kwargs,
        },
    }
    return model


def _builder_options(builder: Any) -> set[str] | None:
    """The keyword options a model builder takes (None when it accepts any: ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name not in ("input_shape", "num_classes")
    }


def describe() -> list[dict[str, Any]]:
    """One row per model for ``lowbit models``: name, task, default shapes, description, presets."""
    return [
        {
            "name": s.name,
            "task": s.task,
            "input_shape": list(s.input_shape),
            "num_classes": s.num_classes,
            "description": s.description,
            "defaults": s.defaults,
        }
        for s in _REGISTRY.values()
    ]
