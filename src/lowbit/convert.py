"""``lowbit.quantize(model, method, ...)``: swap nn.Linear / nn.Conv2d / nn.LSTM for Quant* layers in place.

Rules, in order:

1. Candidates are the supported layers in ``model.named_modules()`` order (registration order):
   ``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM`` (subclasses included). Linear layers inside an
   ``nn.MultiheadAttention`` are skipped (MHA reads their weights directly, a swap would be
   ignored); build attention from plain ``nn.Linear`` layers to quantize it.
2. ``include`` (module-name globs, ``fnmatch`` style): only matching candidates; naming an
   unsupported weight layer exactly (Conv1d, GRU, Embedding, ...) raises ``TypeError`` (a
   wildcard just skips it); a pattern that matches nothing raises ``ValueError``.
3. ``keep`` (default ``("first", "last")``): these stay float. ``"first"``/``"last"`` are the
   first and last candidates; other entries are globs. ``keep=()`` quantizes everything.
4. ``exclude`` (globs): also stay float.
5. ``overrides``: ``{glob: {option: value}}`` merged into the options of matching layers
   (later globs win), e.g. ``{"features.0": {"granularity": "channel"}}``.

A glob in ``include``, ``keep``, ``exclude`` or ``overrides`` that matches no module name raises
``ValueError`` (a typo would otherwise quantize the layer it was meant to protect).

The new layers reuse the original Parameter objects (weights, device, dtype and any optimizer
holding them are preserved); quantizer state is created on the weight's device and dtype.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from lowbit import methods as _methods
from lowbit.nn import QuantConv2d, QuantLinear, QuantLSTM, QuantModule

__all__ = ["SUPPORTED", "UNSUPPORTED", "method_of", "quantize", "quantized_layers"]

SUPPORTED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LSTM: QuantLSTM,
}
# Layers with weights that lowbit does not quantize (named in errors, warned about never).
UNSUPPORTED: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.GRU,
    nn.RNN,
    nn.LSTMCell,
    nn.GRUCell,
    nn.RNNCell,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
)


def _quant_class(module: nn.Module) -> type[nn.Module] | None:
    if isinstance(module, QuantModule):
        return None
    for base, quant in SUPPORTED.items():
        if isinstance(module, base):
            return quant
    return None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    skip_prefixes: list[str] = []
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, nn.MultiheadAttention):
            skip_prefixes.append(name + ".")
            continue
        if _quant_class(module) is not None:
            found.append((name, module))
    return found


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _build(method: _methods.Method, module: nn.Module, options: dict[str, Any]) -> nn.Module:
    quant_cls = _quant_class(module)
    weight = next(module.parameters())
    device, dtype = weight.device, weight.dtype
    if quant_cls is QuantLSTM:
        assert isinstance(module, nn.LSTM)
        if module.proj_size:
            raise ValueError(
                "nn.LSTM with proj_size > 0 is not supported; keep it float with exclude=[<its name>]"
            )
        tmp = QuantLSTM.from_float(module, nn.ModuleDict())
        wq = nn.ModuleDict(
            {
                key: nn.ModuleList(
                    method.make_weight_quantizer(slot, **options).to(device=device, dtype=dtype)
                    for slot in tmp.gate_slots(key)
                )
                for key in tmp.matrix_keys()
            }
        )
        iq = method.make_input_quantizer(module, **options)
        new = QuantLSTM.from_float(
            module, wq, iq.to(device=device, dtype=dtype) if iq is not None else None
        )
        return new
    weight_q = method.make_weight_quantizer(module, **options).to(device=device, dtype=dtype)
    iq = method.make_input_quantizer(module, **options)
    builder: Any = quant_cls
    return builder.from_float(
        module, weight_q, iq.to(device=device, dtype=dtype) if iq is not None else None
    )


def quantize(
    model: nn.Module,
    method: str | _methods.Method,
    keep: Sequence[str] | str | None = ("first", "last"),
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> nn.Module:
    """Swap supported layers of ``model`` for quantized ones, in place; returns ``model``.

    Args:
        model: any ``nn.Module`` containing nn.Linear / nn.Conv2d / nn.LSTM layers.
        method: a registered name (``lowbit.methods.available()``) or a ``Method``.
        keep: layers left float: ``"first"``, ``"last"`` and/or name globs (default first and last).
        include: only these layers (globs); default all supported layers.
        exclude: never these layers (globs).
        overrides: per-layer option overrides, ``{glob: {option: value}}``.
        **options: method options (``granularity``, ``group_size``, ``group_axis``,
            ``activations`` and the method's own, see ``lowbit.methods.get(name).defaults()``).

    Example::

        model = lowbit.quantize(torchvision.models.resnet18(), "twn", granularity="channel")
    """
    m = _methods.get(method)
    base_options = m.resolve_options(options)
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            raise ValueError(
                f"model is already quantized (layer {name or '<root>'} is {type(module).__name__}); "
                "start from the float model"
            )
    cands = _candidates(model)
    if any(name == "" for name, _ in cands):
        raise TypeError(
            f"quantize() swaps layers inside a model; got a bare {type(model).__name__}. "
            "Wrap it first, e.g. nn.Sequential(layer)."
        )
    names = [n for n, _ in cands]

    all_named = dict(model.named_modules())
    include_p = _as_patterns(include)
    keep_p = _as_patterns(keep)
    exclude_p = _as_patterns(exclude)
    # A pattern that names nothing is a typo: in keep/exclude it would quantize the very layer
    # it was meant to protect, so every option refuses it, not only include.
    for option, patterns in (
        ("include", include_p),
        ("keep", [p for p in keep_p if p not in ("first", "last")]),
        ("exclude", exclude_p),
        ("overrides", list(overrides or {})),
    ):
        for pattern in patterns:
            if not any(n and fnmatch.fnmatchcase(n, pattern) for n in all_named):
                raise ValueError(
                    f"{option} pattern {pattern!r} matches no module; module names: "
                    f"{', '.join(list(all_named)[1:20])}{' ...' if len(all_named) > 20 else ''}"
                )
    if include_p:
        for pattern in include_p:
            hits = [n for n in all_named if n and fnmatch.fnmatchcase(n, pattern)]
            for n in hits:
                mod = all_named[n]
                # A layer named exactly (not through a wildcard) must be quantizable.
                if n == pattern and isinstance(mod, UNSUPPORTED) and n not in names:
                    raise TypeError(
                        f"layer {n!r} is a {type(mod).__name__}, which lowbit cannot quantize "
                        f"(supported: nn.Linear, nn.Conv2d, nn.LSTM). Remove it from include=."
                    )
        selected = [n for n in names if _matches(n, include_p)]
    else:
        selected = list(names)

    kept: set[str] = set()
    for entry in keep_p:
        if entry == "first" and names:
            kept.add(names[0])
        elif entry == "last" and names:
            kept.add(names[-1])
        else:
            kept.update(n for n in names if fnmatch.fnmatchcase(n, entry))
    selected = [n for n in selected if n not in kept and not _matches(n, exclude_p)]

    modules = dict(cands)
    # All (parent, attribute) places each module sits in (a shared layer is swapped everywhere).
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, child_name))
    done: dict[int, nn.Module] = {}
    for name in selected:
        module = modules[name]
        if id(module) in done:
            continue
        layer_options = dict(base_options)
        for pattern, extra in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                layer_options = m.resolve_options({**layer_options, **extra})
        new = _build(m, module, layer_options)
        for parent, attr in places.get(id(module), []):
            setattr(parent, attr, new)
        done[id(module)] = new
    if not names and m.name != "fp":
        warnings.warn(
            f"lowbit.quantize(..., {m.name!r}) found no layer to quantize: the model has no "
            "nn.Linear, nn.Conv2d or nn.LSTM (its layers: "
            f"{', '.join(sorted({type(x).__name__ for x in model.modules()}))})",
            stacklevel=2,
        )
    if names and not selected and m.name != "fp":
        warnings.warn(
            f"lowbit.quantize(..., {m.name!r}) quantized no layer: every candidate "
            f"({', '.join(names)}) is kept float by keep={keep!r} / exclude / include "
            "(the default keep=('first', 'last') keeps both layers of a 2-layer net); "
            "pass keep=() to quantize them",
            stacklevel=2,
        )
    _disable_transformer_fastpath(model)
    model.__dict__["_lowbit_quantization"] = {
        "method": m.name,
        "options": base_options,
        "layers": [n for n in selected],
        "kept": sorted(set(names) - set(selected)),
    }
    return model


def _disable_transformer_fastpath(model: nn.Module) -> None:
    """Keep nn.TransformerEncoder(Layer)s on the module path once their Linear layers are quantized.

    In eval mode under ``no_grad`` PyTorch's fused "fast path" reads ``linear1.weight`` and
    ``linear2.weight`` directly, which would silently run the latent float weights. The fast path
    is only taken when ``activation_relu_or_gelu`` is truthy, so clearing it (it is read nowhere
    else) forces the ordinary forward, which calls the quantized layers.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            isinstance(child, QuantModule) for child in (module.linear1, module.linear2)
        ):
            module.activation_relu_or_gelu = 0


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> Quant* layer for every quantized layer in ``model``."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantModule)}  # type: ignore[misc]


def method_of(model: nn.Module) -> str | None:
    """Name of the method ``model`` was quantized with by :func:`quantize` (None if not)."""
    info = model.__dict__.get("_lowbit_quantization")
    return None if info is None else str(info["method"])
