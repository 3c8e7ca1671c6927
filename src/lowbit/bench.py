"""Kernel benchmarks: lowbit's packed kernels against PyTorch fp32 ``F.linear`` and PyTorch's
dynamic int8 (fbgemm), measured in the same process, at the same thread count, in the same run.

Timing rules (../shared/reference/kernels.md §5, "Benchmarking hygiene"): warm-up first, then the
median of ``reps`` timed calls (>= 20). "Hot" repeats one layer (its weights stay in L2/L3);
"cold" cycles over enough distinct layers to stream at least 64 MiB of weights per cycle, so every
call reads its weights from DRAM, as in a real multi-layer model. Used by ``lowbit bench kernels``
and ``benchmarks/bench_kernels.py``; tests never time anything.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from lowbit import kernels

COLD_BYTES = 64 << 20  # bytes of distinct weights cycled per "cold" round (> the 32 MiB L3)

# DESIGN.md targets: minimum speed-up of lowbit vs (fp32, int8); None = no target.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "ternary b1 hot": (30.0, 3.0),
    "ternary b1 cold": (None, 3.0),
    "ternary b64": (5.0, 1.0),
}


@dataclass
class Row:
    case: str
    threads: int
    fp32_ms: float
    int8_ms: float
    lowbit_ms: float
    vs_fp32: float = field(init=False)
    vs_int8: float = field(init=False)
    target: str = field(init=False)

    def __post_init__(self) -> None:
        self.vs_fp32 = self.fp32_ms / self.lowbit_ms
        self.vs_int8 = self.int8_ms / self.lowbit_ms
        key = " ".join(self.case.split()[:3])
        t32, t8 = (
            TARGETS.get(key, (None, None))
            if self.case.startswith("ternary ") and "(" not in self.case
            else (None, None)
        )
        parts = []
        if t32 is not None:
            parts.append(f">={t32:g}x fp32 {'ok' if self.vs_fp32 >= t32 else 'MISSED'}")
        if t8 is not None:
            parts.append(f">={t8:g}x int8 {'ok' if self.vs_int8 >= t8 else 'MISSED'}")
        self.target = ", ".join(parts)


CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


def median_ms(
    fns: list[Callable[[], object]], reps: int, warmup: int = 5, clock: str = "wall"
) -> float:
    """Median time of one call in ms, cycling over ``fns`` (one per distinct layer).

    ``clock="cpu"`` measures the calling thread's CPU time instead of wall time: on a VM shared
    with other work it leaves out the time the thread waits for a core, which steadies
    single-thread numbers (it is meaningless with more threads: their work runs elsewhere).
    """
    now = CLOCKS[clock]
    for i in range(max(warmup, len(fns))):
        fns[i % len(fns)]()
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times) / 1e6


def _layers_for(bytes_per_layer: int, cold_bytes: int) -> int:
    return max(2, -(-cold_bytes // bytes_per_layer) + 1)


def _int8_linear(weight: torch.Tensor) -> torch.nn.Module:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.ao.quantization (-> torchao)
        q = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
        )
    return q.eval()


class _Ternary:
    """One packed ternary layer: per-row scales and int8 activations, or a variant ("asym",
    "group<G>", "float": the exact path with fp32 activations, "int4": 4-bit weights)."""

    def __init__(self, n: int, k: int, seed: int, variant: str = "row") -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.group = 0
        bits = 4 if variant == "int4" else 2
        if bits == 4:
            self.tiles = kernels.pack_int4(
                torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
            )
        else:
            self.tiles = kernels.pack_ternary(
                torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
            )
        if variant == "asym":
            self.scale, self.scale2 = kernels.pack_ternary_scales(
                torch.tensor([0.7, 0.4]), n, k, asym=True
            )
        elif variant.startswith("group"):
            self.group = int(variant[5:])
            self.scale, self.scale2 = kernels.pack_ternary_scales(
                torch.rand(n, -(-k // self.group), generator=g) + 0.5, n, k, group_size=self.group
            )
        else:
            self.scale, self.scale2 = kernels.pack_ternary_scales(
                torch.rand(n, generator=g) + 0.5, n, k
            )
        self.bias = kernels.pad_bias(torch.zeros(n), n)
        self.kernel = kernels.LinearKernel(
            self.tiles,
            self.scale,
            self.scale2,
            self.bias,
            out_features=n,
            bits=bits,
            group_size=self.group,
            act="float" if variant == "float" else "absmax",
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def op(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.op(x)


def bench_kernels(
    size: int = 4096,
    threads: tuple[int, ...] = (1, 2),
    reps: int = 30,
    batch: int = 64,
    variants: bool = True,
    clock: str = "wall",
    log: Callable[[str], None] = print,
    cold_bytes: int = COLD_BYTES,
) -> list[Row]:
    """Run every case and return the rows (also printed through ``log`` as they finish)."""
    if reps < 20:
        raise ValueError(
            "use at least 20 timed repetitions (medians of fewer runs are too noisy here)"
        )
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    if clock == "cpu" and any(t != 1 for t in threads):
        raise ValueError("clock='cpu' times the calling thread only: use it with threads=(1,)")
    timed = partial(median_ms, clock=clock)
    n = k = size
    rows: list[Row] = []
    previous = torch.get_num_threads()
    rng = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, k, generator=rng)
    xb = torch.randn(batch, k, generator=rng)
    n_cold = {
        "fp32": _layers_for(n * k * 4, cold_bytes),
        "int8": _layers_for(n * k, cold_bytes),
        "t2": _layers_for(n * k // 4, cold_bytes),
    }
    # Build the layers once (packing is not timed); cold sets are distinct weights.
    fp32_w = [torch.randn(n, k, generator=rng) * 0.02 for _ in range(n_cold["fp32"])]
    int8_l = [_int8_linear(fp32_w[i % len(fp32_w)]) for i in range(n_cold["int8"])]
    tern = [_Ternary(n, k, seed=i) for i in range(n_cold["t2"])]
    extra = (
        {
            v: _Ternary(n, k, seed=99, variant=v)
            for v in ("asym", "group64", "group4", "float", "int4")
        }
        if variants
        else {}
    )
    log(
        f"lowbit bench kernels: {n}x{k}, batch 1 and {batch}, medians of {reps} calls ({clock} clock); "
        f"isa={kernels.active_isa()}; "
        f"torch {torch.__version__}; cold = cycling {n_cold['fp32']} fp32 / {n_cold['int8']} int8 / "
        f"{n_cold['t2']} ternary layers (>= {cold_bytes >> 20} MiB each round)"
    )
    # Other processes on a 2-core VM distort every number: say how busy the machine was.
    log(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    try:
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)

                def fp32(x: torch.Tensor, i: int) -> Callable[[], object]:
                    return lambda: F.linear(x, fp32_w[i])

                def i8(x: torch.Tensor, i: int) -> Callable[[], object]:
                    return lambda: int8_l[i](x)

                def t2(x: torch.Tensor, i: int) -> Callable[[], object]:
                    return lambda: tern[i](x)

                cases = [
                    ("ternary b1 hot", x1, 1, 1, 1),
                    ("ternary b1 cold", x1, n_cold["fp32"], n_cold["int8"], n_cold["t2"]),
                    (f"ternary b{batch}", xb, 1, 1, 1),
                ]
                base: dict[tuple[int, int], tuple[float, float]] = {}
                for name, x, nf, ni, nt in cases:
                    f_ms = timed([fp32(x, i) for i in range(nf)], reps)
                    i_ms = timed([i8(x, i) for i in range(ni)], reps)
                    l_ms = timed([t2(x, i) for i in range(nt)], reps)
                    if nt == 1:
                        base[(x.shape[0], t)] = (f_ms, i_ms)
                    row = Row(name, t, f_ms, i_ms, l_ms)
                    rows.append(row)
                    log(format_row(row))
                for name, x in (("b1", x1), (f"b{batch}", xb)):
                    f_ms, i_ms = base[(x.shape[0], t)]
                    variants_ms = {"torch.ops (custom op)": timed([partial(tern[0].op, x)], reps)}
                    for v, layer in extra.items():
                        variants_ms[v] = timed([partial(layer, x)], reps)
                    for v, ms in variants_ms.items():
                        row = Row(f"ternary {name} hot ({v})", t, f_ms, i_ms, ms)
                        rows.append(row)
                        log(format_row(row))
    finally:
        torch.set_num_threads(previous)
    log(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


HEADER = f"{'case':<38} {'thr':>3} {'fp32 ms':>9} {'int8 ms':>9} {'lowbit ms':>10} {'vs fp32':>8} {'vs int8':>8}  target"


def format_row(r: Row) -> str:
    return (
        f"{r.case:<38} {r.threads:>3} {r.fp32_ms:>9.3f} {r.int8_ms:>9.3f} {r.lowbit_ms:>10.4f} "
        f"{r.vs_fp32:>7.1f}x {r.vs_int8:>7.2f}x  {r.target}"
    )


def rows_as_dicts(rows: list[Row]) -> list[dict[str, object]]:
    return [
        {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(r).items()}
        for r in rows
    ]


# ----------------------------------------------------------------------------------------------
# End-to-end model benchmark (``lowbit bench model``)


def float_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a packed / quantized model with plain fp32 ``nn.Linear`` / ``nn.Conv2d`` layers
    of the same shapes (random weights: only the speed of the float baseline matters)."""
    import copy

    from lowbit.nn import QuantConv2d, QuantLinear
    from lowbit.pack import PackedConv2d, PackedLinear

    twin = copy.deepcopy(model)

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, torch.nn.Linear(child.in_features, child.out_features))
            elif isinstance(child, PackedConv2d):
                conv = torch.nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                )
                setattr(parent, name, conv)
            elif isinstance(child, QuantLinear):
                setattr(parent, name, torch.nn.Linear(child.in_features, child.out_features))
            elif isinstance(child, QuantConv2d):
                setattr(
                    parent,
                    name,
                    torch.nn.Conv2d(
                        child.in_channels,
                        child.out_channels,
                        child.kernel_size,  # type: ignore[arg-type]
                        stride=child.stride,  # type: ignore[arg-type]
                        padding=child.padding,  # type: ignore[arg-type]
                        dilation=child.dilation,  # type: ignore[arg-type]
                        groups=child.groups,
                    ),
                )
            else:
                visit(child)

    visit(twin)
    return twin.eval()


def default_mnist_model(widths: tuple[int, ...] = (1024, 1024)) -> torch.nn.Module:
    """The MNIST MLP of the end-to-end target (``lowbit.models`` "mlp", 784-1024-1024-10 with BN),
    ternary (TWN) on every layer, packed with int8 activations. Random weights: speed only."""
    import lowbit
    from lowbit import models

    torch.manual_seed(0)
    net = models.create("mlp", widths=widths).eval()
    return lowbit.pack(lowbit.quantize(net, "twn", keep=()))


@dataclass
class ModelRow:
    batch: int
    threads: int
    fp32_ms: float
    lowbit_ms: float
    speedup: float = field(init=False)
    fp32_samples_s: float = field(init=False)
    lowbit_samples_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.speedup = self.fp32_ms / self.lowbit_ms
        self.fp32_samples_s = 1e3 * self.batch / self.fp32_ms
        self.lowbit_samples_s = 1e3 * self.batch / self.lowbit_ms


MODEL_TARGET = 5.0  # DESIGN.md: packed MNIST model >= 5x the fp32 PyTorch throughput at batch 256


def bench_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batches: tuple[int, ...] = (256, 1),
    threads: tuple[int, ...] = (1, 2),
    reps: int = 30,
    log: Callable[[str], None] = print,
    clock: str = "wall",
) -> list[ModelRow]:
    """Median forward time of ``model`` (packed) against its fp32 twin, same inputs, same run.

    ``clock="cpu"`` (one thread only) times the calling thread's CPU time, which leaves out the
    time spent waiting for a core on a loaded machine (see :func:`median_ms`)."""
    if reps < 20:
        raise ValueError(
            "use at least 20 timed repetitions (medians of fewer runs are too noisy here)"
        )
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    if clock == "cpu" and any(t != 1 for t in threads):
        raise ValueError("clock='cpu' times the calling thread only: use it with threads=(1,)")
    baseline = float_twin(model)
    model = model.eval()
    rows: list[ModelRow] = []
    previous = torch.get_num_threads()
    log(
        f"lowbit bench model: input {tuple(input_shape)}, medians of {reps} forward passes ({clock} clock); "
        f"isa={kernels.active_isa()}; torch {torch.__version__}"
    )
    log(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    try:
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    x = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(b))
                    f_ms = median_ms([partial(baseline, x)], reps, clock=clock)
                    l_ms = median_ms([partial(model, x)], reps, clock=clock)
                    row = ModelRow(b, t, f_ms, l_ms)
                    rows.append(row)
                    target = ""
                    if b == 256:
                        ok = "ok" if row.speedup >= MODEL_TARGET else "MISSED"
                        target = f"  >={MODEL_TARGET:g}x fp32 {ok}"
                    log(
                        f"batch {b:>4} threads {t}: fp32 {f_ms:8.3f} ms ({row.fp32_samples_s:9.0f}/s)  "
                        f"lowbit {l_ms:8.3f} ms ({row.lowbit_samples_s:9.0f}/s)  {row.speedup:5.2f}x{target}"
                    )
    finally:
        torch.set_num_threads(previous)
    log(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows
