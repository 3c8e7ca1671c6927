"""One row per model for ``lowbit demo`` / ``lowbit reproduce``: accuracy of the simulated
(``Quant*``) model and of its packed form (``lowbit.pack`` -> ``lowbit.save`` -> ``lowbit.load``),
file size, compression and inference speed against float PyTorch, measured in the same process.

Definitions (every number in the table is one of these):

* ``sim_error``: test error (%) of the trained model as it trains (fake quantization in float);
* ``packed_error``: test error (%) of the packed model *after* a round trip through its
  ``.lowbit`` file; ``agreement``: share of test samples on which both predict the same class;
* ``file_bytes``: size of that ``.lowbit`` file; ``float_bytes``: 4 bytes per floating-point
  parameter / buffer of the same architecture in float32 (the model the user started from);
  ``compression = float_bytes / file_bytes``;
* ``layer_compression``: float32 bytes of the quantized layers' weights and biases over the bytes
  of their packed tensors (tiles, scales, bias): what packing does to the layers it packs;
  ``weight_compression``: the same for the weight matrices alone (tiles and scales, no bias);
* ``throughput``: samples/s at batch 256 and ``latency_ms`` the median batch-1 time, both for the
  packed model and for the float32 architecture (``float_*``), same inputs, same threads.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelRow",
    "describe_acts",
    "describe_weights",
    "float_bytes",
    "format_table",
    "markdown_table",
    "measure",
    "predictions",
    "speed",
]

_WEIGHT_NAMES = {
    "binary": "binary 1b",
    "ternary": "ternary 2b",
    "ternary_asym": "ternary Wp/Wn 2b",
    "kbit_linear": "{bits}-bit",
    "kbit_log": "{bits}-bit log",
}


@dataclass
class ModelRow:
    """One model of the results table (see the module docstring for each number)."""

    name: str
    method: str
    weights: str
    acts: str
    float_layers: str
    sim_error: float
    packed_error: float | None = None
    agreement: float | None = None
    packed_note: str = ""
    file_bytes: int | None = None
    float_bytes: int = 0
    compression: float | None = None
    layer_compression: float | None = None
    weight_compression: float | None = None
    throughput: float | None = None
    float_throughput: float | None = None
    latency_ms: float | None = None
    float_latency_ms: float | None = None
    train_seconds: float | None = None
    epochs: str = ""
    protocol_error: float | None = None
    paper_value: float | None = None
    paper_metric: str = ""
    paper_source: str = ""
    model_file: str = ""
    run_dir: str = ""
    packing_report: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.throughput is None or not self.float_throughput:
            return None
        return self.throughput / self.float_throughput

    @property
    def latency_speedup(self) -> float | None:
        if self.latency_ms is None or not self.float_latency_ms:
            return None
        return self.float_latency_ms / self.latency_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        d["latency_speedup"] = self.latency_speedup
        return d


def _quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lowbit.nn import QuantModule

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]  # type: ignore[misc]


def describe_weights(model: nn.Module) -> tuple[str, str]:
    """(``"ternary Wp/Wn 2b"``-style weight formats of the quantized layers, layers kept float)."""
    kinds: list[str] = []
    for _, layer in _quant_layers(model):
        with torch.no_grad():
            qw = layer.quantized_weight()  # type: ignore[operator]
        name = _WEIGHT_NAMES.get(qw.format, qw.format).format(bits=qw.bits)
        if qw.granularity == "group":
            name += f" N={qw.group_size}"
            bits = getattr(layer.weight_quantizer, "scale_bits", None)
            name += f" s{bits}" if bits else ""  # fixed-point group scales (FGQ scale_bits)
        if name not in kinds:
            kinds.append(name)
    floats = [
        n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.LSTM) and n
    ]
    return (", ".join(kinds) or "fp32"), (", ".join(n.split(".")[-1] for n in floats) or "none")


def describe_acts(sim: nn.Module, packed: nn.Module | None) -> str:
    """Input formats of the quantized layers: ``"fp32 -> int8"`` (simulated -> packed)."""
    sim_acts: list[str] = []
    for _, layer in _quant_layers(sim):
        iq = getattr(layer, "input_quantizer", None)
        d = "fp32" if iq is None else str(iq.describe())
        if d not in sim_acts:
            sim_acts.append(d)
    out = ", ".join(sim_acts) or "fp32"
    if packed is None:
        return out
    from lowbit.binary import PackedBinaryConv2d, PackedBinaryLinear
    from lowbit.pack import PackedLinear

    names = {"int8": "int8", "float": "fp32", "sign": "±1"}
    packed_acts: list[str] = []
    for m in packed.modules():
        if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d)) and "±1 bits" not in packed_acts:
            packed_acts.append("±1 bits")
        elif isinstance(m, PackedLinear):
            a = m.activations
            d = names.get(
                a, f"{'' if m.act_signed else 'u'}{'dfp' if a == 'dfp' else 'int'}{m.act_bits}"
            )
            if d not in packed_acts:
                packed_acts.append(d)
    if packed_acts:
        out += " -> " + ", ".join(packed_acts)
    return out


def float_bytes(model: nn.Module) -> int:
    """4 bytes per element of every floating-point parameter and buffer (float32 storage)."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


@torch.inference_mode()
def predictions(model: nn.Module, data: Any, batch_size: int = 1000) -> torch.Tensor:
    """Argmax class of every sample of an ``ArrayDataset`` (eval mode)."""
    model.eval()
    return torch.cat([model(x).argmax(-1) for x, _ in data.batches(batch_size)])


def error_of(pred: torch.Tensor, data: Any) -> float:
    return 100.0 * float((pred != data.y).double().mean())


@torch.inference_mode()
def speed(
    model: nn.Module,
    sample: torch.Tensor,
    batch_size: int = 256,
    reps: int = 20,
    reference: nn.Module | None = None,
) -> tuple[float, float, float, float]:
    """``(samples/s at batch_size, median batch-1 latency ms)`` of ``model`` and then of
    ``reference`` (the float model; ``model`` itself when None). The two are called alternately,
    call by call, so a load change on a shared machine hits both alike; medians after warm-up."""
    ref = model if reference is None else reference
    model.eval()
    ref.eval()
    xb, x1 = sample[:batch_size], sample[:1]
    for _ in range(3):
        for m in (model, ref):
            m(xb)
            m(x1)
    times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in (0, 1) for b in (0, 1)}
    for b, x, n in ((0, xb, reps), (1, x1, max(reps, 40))):
        for _ in range(n):
            for i, m in enumerate((model, ref)):
                t0 = time.perf_counter()
                m(x)
                times[(i, b)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_b = xb.shape[0]
    return n_b / med[(0, 0)], 1e3 * med[(0, 1)], n_b / med[(1, 0)], 1e3 * med[(1, 1)]


def _packed_layer_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """Of the packed layers: (bytes of all their tensors, float32 bytes of weight + bias, bytes of
    their weight tensors (all but the bias), float32 bytes of the weight matrices alone)."""
    from lowbit.summary import packed_layer_bytes

    totals = [0, 0, 0, 0]
    for m in model.modules():
        counts = packed_layer_bytes(m)
        if counts is not None:
            totals = [t + c for t, c in zip(totals, counts, strict=True)]
    return totals[0], totals[1], totals[2], totals[3]


def measure(
    name: str,
    method: str,
    sim: nn.Module,
    float_model: nn.Module,
    test: Any,
    out_file: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    reps: int = 20,
    timing: bool = True,
    xnor: bool = False,
) -> tuple[ModelRow, nn.Module | None]:
    """Evaluate ``sim``, pack it, save + reload the packed model, evaluate and time it against
    ``float_model`` (the float32 architecture). Returns the row and the reloaded packed model
    (``None`` when nothing could be packed). A float ``sim`` (no quantized layers) is saved and
    timed as it is: its packed columns stay empty. ``xnor``: a BNN-trained ``sim`` is packed on
    the fully binary XNOR-popcount path (``lowbit.pack(sim, xnor=True)``)."""
    import lowbit

    sim.eval()
    float_model.eval()
    weights, floats = describe_weights(sim)
    sim_pred = predictions(sim, test)
    row = ModelRow(
        name=name,
        method=method,
        weights=weights,
        acts="fp32",
        float_layers=floats,
        sim_error=error_of(sim_pred, test),
        float_bytes=float_bytes(float_model),
    )
    sample = test.x[:256]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if not _quant_layers(sim):  # the float baseline
        info = lowbit.save(sim, out_file, architecture=architecture)
        row.file_bytes = int(info["bytes"])
        row.compression = row.float_bytes / row.file_bytes
        row.model_file = str(out_file)
        if timing:
            row.throughput, row.latency_ms, _, _ = speed(float_model, sample, reps=reps)
            row.float_throughput, row.float_latency_ms = row.throughput, row.latency_ms
        row.float_layers = "all"
        row.packed_note = "float model (the baseline)"
        return row, None
    xnor_note = ""
    try:
        packed = lowbit.pack(sim, xnor=xnor)
    except ValueError as exc:  # not a chain pack_bnn can fold: the per-layer packing instead
        if not xnor:
            raise
        xnor_note = f"XNOR chain not possible ({str(exc).splitlines()[0]}): packed per layer"
        packed = lowbit.pack(sim)
    on_xnor = xnor and not xnor_note
    report = dict(getattr(packed, "packing_report", {}))
    row.packing_report = report
    row.acts = describe_acts(sim, packed)
    done = [p for p, r in report.items() if r.startswith("packed")]
    if not done:
        reasons = sorted({r.split(": ", 1)[-1] for r in report.values()})
        row.packed_note = "n/a: " + "; ".join(reasons)
        return row, None
    if len(done) < len(report) and not on_xnor:  # an XNOR report also lists float stages
        kept = [p for p in report if p not in done]
        row.packed_note = f"{len(done)}/{len(report)} layers packed; simulated: {', '.join(kept)}"
    if xnor_note:
        row.packed_note = (row.packed_note + "; " if row.packed_note else "") + xnor_note
    try:
        # the XNOR chain is a flat nn.Sequential of stages: stored as a module tree, not as the
        # registry architecture it came from (what `lowbit pack --xnor` does)
        info = lowbit.save(
            packed,
            out_file,
            architecture=None if on_xnor else architecture,
            metadata={"input_shape": [int(d) for d in sample.shape[1:]]} if on_xnor else None,
        )
        loaded = lowbit.load(out_file)
        row.file_bytes = int(info["bytes"])
        row.model_file = str(out_file)
    except (ValueError, TypeError) as exc:  # no .lowbit encoding for some layer: run in memory
        row.packed_note = (row.packed_note + "; " if row.packed_note else "") + f"not saved: {exc}"
        loaded = packed
    packed_bytes, layer_float, weight_bytes, weight_float = _packed_layer_bytes(loaded)
    row.layer_compression = layer_float / packed_bytes if packed_bytes else None
    row.weight_compression = weight_float / weight_bytes if weight_bytes else None
    if row.file_bytes:
        row.compression = row.float_bytes / row.file_bytes
    packed_pred = predictions(loaded, test)
    row.packed_error = error_of(packed_pred, test)
    row.agreement = 100.0 * float((packed_pred == sim_pred).double().mean())
    if timing:
        row.throughput, row.latency_ms, row.float_throughput, row.float_latency_ms = speed(
            loaded, sample, reps=reps, reference=float_model
        )
    return row, loaded


# ----------------------------------------------------------------------------------------------
# Tables


def _f(v: float | None, fmt: str, na: str = "-") -> str:
    return na if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def table_rows(rows: list[ModelRow], paper: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and string cells shared by the console and Markdown tables."""
    header = [
        "method",
        "weights",
        "inputs (sim -> packed)",
        "float layers",
        "test err sim",
        "test err packed",
        "agree",
        "file",
        "compr.",
        "q-layer compr.",
        "samples/s b256",
        "vs fp32",
        "latency b1",
        "vs fp32",
    ]
    if paper:
        header[4:4] = ["paper", "protocol err"]
    cells = []
    for r in rows:
        packed = _f(r.packed_error, ".2f") + ("%" if r.packed_error is not None else "")
        if r.packed_error is None and r.packed_note:
            packed = r.packed_note if r.packed_note.startswith("n/a") else "-"
        line = [
            r.name,
            r.weights,
            r.acts,
            r.float_layers,
            f"{r.sim_error:.2f}%",
            packed,
            _f(r.agreement, ".2f") + ("%" if r.agreement is not None else ""),
            _size(r.file_bytes),
            _f(r.compression, ".1f") + ("x" if r.compression is not None else ""),
            _f(r.layer_compression, ".1f") + ("x" if r.layer_compression is not None else ""),
            _f(r.throughput, ",.0f"),
            _f(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
            _f(r.latency_ms, ".3f") + (" ms" if r.latency_ms is not None else ""),
            _f(r.latency_speedup, ".2f") + ("x" if r.latency_speedup is not None else ""),
        ]
        if paper:
            unit = "%" if "percent" in r.paper_metric or not r.paper_metric else ""
            pv = "-" if r.paper_value is None else f"{r.paper_value:g}{unit}"
            line[4:4] = [
                pv,
                _f(r.protocol_error, ".2f") + (unit if r.protocol_error is not None else ""),
            ]
        cells.append(line)
    return header, cells


def format_table(rows: list[ModelRow], paper: bool = False) -> str:
    """Plain-text table (what the demo prints), with footnotes for partly packed models."""
    header, cells = table_rows(rows, paper)
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)
    ]
    widths = [min(w, 40) for w in widths]

    def line(values: list[str]) -> str:
        return "  ".join(
            (v if len(v) <= w else v[: w - 1] + "…").ljust(w)
            for v, w in zip(values, widths, strict=True)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    if any(r.float_throughput and r.method != "fp" for r in rows):
        out += [
            "",
            "vs fp32: each row against the float model timed alternately with it in the same call "
            "(the float row's own timing is a separate measurement on a shared machine)",
        ]
    notes = [f"  {r.name}: {r.packed_note}" for r in rows if r.packed_note and r.method != "fp"]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def markdown_table(rows: list[ModelRow], paper: bool = False) -> str:
    header, cells = table_rows(rows, paper)
    esc = [[c.replace("|", "\\|") for c in row] for row in cells]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in esc]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Machine facts printed next to every measured number."""
    import platform

    from lowbit import kernels

    feats = kernels.cpu_features()
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": feats.get("active"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
    }
