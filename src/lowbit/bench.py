"""Kernel benchmarks: lowbit's packed kernels against PyTorch fp32 ``F.linear`` / ``F.conv2d`` and
PyTorch's int8 (dynamic ``Linear``, static ``Conv2d``; fbgemm), measured in the same process, at
the same thread count, in the same run. Ternary / int4 layers go through ``kernels.LinearKernel``,
binary (XNOR-popcount) layers through ``lowbit.binary``'s packed modules.

Timing rules (../shared/reference/kernels.md §5, "Benchmarking hygiene"): warm-up first, then the
median of ``reps`` timed calls (>= 20). "Hot" repeats one layer (its weights stay in L2/L3);
"cold" cycles over enough distinct layers to stream at least 64 MiB of weights per cycle, so every
call reads its weights from DRAM, as in a real multi-layer model. Used by ``lowbit bench kernels``,
``benchmarks/bench_kernels.py`` and ``benchmarks/bench_binary.py``; tests never time anything.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lowbit import kernels

COLD_BYTES = 64 << 20  # bytes of distinct weights cycled per "cold" round (> the 32 MiB L3)

TARGET_SIZE = 4096  # the layer size (N = K) the kernel targets are set for
# DESIGN.md / issue #10 targets: minimum speed-up of lowbit vs (fp32, int8); None = no target.
# A row is held to the longest key that starts its case name (whole words); rows whose name has a
# "(" are variants and held to nothing.
BINARY_CONV_CASE = "binary conv 128->128 3x3 32x32"  # CIFAR-size layer of the conv target
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "ternary b1 hot": (30.0, 3.0),
    "ternary b1 cold": (None, 3.0),
    "ternary b64": (5.0, 1.0),
    "binary b1": (None, 10.0),
    "binary b64": (20.0, None),
    BINARY_CONV_CASE: (10.0, None),
}


def target_note() -> str | None:
    """A line saying what the targets assume when this CPU runs another kernel path: they were
    set on the reference machine (AVX-512 VNNI + VPOPCNTDQ, Zen 4; docs/kernels.md)."""
    isa = kernels.active_isa()
    if isa == "avx512":
        return None
    return (
        f"note: the targets (docs/kernels.md) are set for the AVX-512 VNNI/VPOPCNTDQ path of the "
        f"reference machine; this CPU runs the {isa} path (no vpdpbusd / vpopcntq), so a "
        f"MISSED row here says how far this path is from them, not that the avx512 path misses"
    )


def target_of(case: str) -> tuple[float | None, float | None]:
    """The (fp32, int8) speed-up targets a row named ``case`` is held to."""
    if "(" in case:
        return None, None
    words = case.split()
    best: tuple[float | None, float | None] = (None, None)
    best_len = 0
    for key, value in TARGETS.items():
        kw = key.split()
        if len(kw) > best_len and words[: len(kw)] == kw:
            best, best_len = value, len(kw)
    return best


@dataclass
class Row:
    case: str
    threads: int
    fp32_ms: float
    int8_ms: float | None  # None: no PyTorch int8 baseline for this case
    lowbit_ms: float
    # The targets are set for the 4096x4096 layers (and the 128-channel conv): rows of other
    # sizes are held to none.
    targeted: bool = True
    vs_fp32: float = field(init=False)
    vs_int8: float | None = field(init=False)
    target: str = field(init=False)

    def __post_init__(self) -> None:
        self.vs_fp32 = self.fp32_ms / self.lowbit_ms
        self.vs_int8 = None if self.int8_ms is None else self.int8_ms / self.lowbit_ms
        t32, t8 = target_of(self.case) if self.targeted else (None, None)
        parts = []
        if t32 is not None:
            parts.append(f">={t32:g}x fp32 {'ok' if self.vs_fp32 >= t32 else 'MISSED'}")
        if t8 is not None:
            met = self.vs_int8 is not None and self.vs_int8 >= t8
            parts.append(f">={t8:g}x int8 {'ok' if met else 'MISSED'}")
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
    "group<G>", "float": the exact path with fp32 activations, "int4": 4-bit weights, "fgq4":
    FGQ N=4 as ``lowbit.pack`` runs it after a ReLU: unsigned 8-bit DFP inputs and 8-bit
    fixed-point group scales)."""

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
        mantissas = None
        if variant == "fgq4":
            self.group = 4
            m = torch.randint(0, 256, (n, -(-k // 4)), generator=g)
            row_mult = torch.full((n,), 2.0**-8)
            self.scale, self.scale2 = kernels.pack_ternary_scales(
                m * row_mult[:, None], n, k, group_size=4
            )
            mantissas = kernels.pack_group_mantissas(m, row_mult, n, k, group_size=4)
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
            act={"float": "float", "fgq4": "udfp"}.get(variant, "absmax"),
            exponent=-4 if variant == "fgq4" else None,
            group_mantissas=mantissas,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def op(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.op(x)


# ----------------------------------------------------------------------------------------------
# Binary (XNOR-popcount) layers: lowbit.binary's packed modules, timed as a packed BNN runs them


def _int8_conv(weight: torch.Tensor, x: torch.Tensor, padding: int) -> Callable[[], object]:
    """PyTorch's int8 conv (``torch.ao`` static quantized ``Conv2d``, x86/fbgemm): per-channel
    int8 weights, a quint8 channels-last input quantized outside the timed call (as lowbit's
    packed input is packed outside it). There is no dynamic int8 conv in ``torch.ao``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation (-> torchao)
        from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

        n, c, kh, kw = (int(v) for v in weight.shape)
        conv = QuantizedConv2d(c, n, (kh, kw), padding=padding, bias=False)
        w_scale = weight.abs().amax((1, 2, 3)).clamp_min(1e-8) / 127
        conv.set_weight_bias(
            torch.quantize_per_channel(
                weight, w_scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8
            ),
            None,
        )
        conv.scale, conv.zero_point = float(x.abs().max()) / 16, 128
        xq = torch.quantize_per_tensor(
            x.contiguous(memory_format=torch.channels_last),
            max(float(x.abs().max()), 1e-8) / 127,
            128,
            torch.quint8,
        )
    return partial(conv, xq)


class BinaryLinearCase:
    """One ``n x k`` binary layer at batch ``m`` and its baselines, built once (not timed).

    ``calls()``: zero-argument callables, one per timed row: ``fp32`` (``F.linear``), ``int8``
    (``quantize_dynamic``), ``bits->bits`` (packed input, threshold epilogue writing packed bits:
    a hidden layer of a packed BNN), ``float->float`` (the float input binarized and packed in
    the call, float output: a first binary layer) and ``plan call`` (the bits->bits layer's C++
    plan without the module and tensor conversions around it). Thresholds are 0 (bit = sign of
    the dot product), scales 1, biases 0.
    """

    def __init__(self, n: int, k: int, m: int, seed: int = 0) -> None:
        from lowbit import binary

        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(n, k, generator=g)
        self.x = torch.randn(m, k, generator=g)
        self.int8 = _int8_linear(self.weight)
        self.bits_layer = binary.PackedBinaryLinear(
            self.weight,
            threshold=(torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.bool)),
            input="bits",
            out="bits",
        )
        self.float_layer = binary.PackedBinaryLinear(
            self.weight, bias=torch.zeros(n), input="float", out="float"
        )
        self.x_bits = binary.pack_bits(self.x)
        self._plan_args = (
            self.x_bits.numpy(),
            None,
            np.empty((m, binary.packed_bytes(n)), dtype=np.uint8),
        )

    def calls(self) -> dict[str, Callable[[], object]]:
        from lowbit import binary

        plan, (xb_np, corr, out_np) = self.bits_layer.plan(), self._plan_args
        return {
            "fp32": partial(F.linear, self.x, self.weight),
            "int8": partial(self.int8, self.x),
            "bits->bits": partial(self.bits_layer, self.x_bits),
            "float->float": partial(self.float_layer, self.x),
            # torch's thread count at call time, as the module passes it
            "plan call": lambda: plan(xb_np, corr, out_np, binary._threads()),
        }


class BinaryConvCase:
    """A ``c -> c`` 3x3 pad-1 binary conv on ``hw x hw`` maps at ``batch``, and its baselines.

    ``calls()``: ``fp32`` (``F.conv2d``, NCHW), ``int8`` (:func:`_int8_conv`) and ``bits->bits``
    (``PackedBinaryConv2d`` on packed NHWC bits, exact zero padding, threshold 0).
    """

    def __init__(self, channels: int, hw: int, batch: int, seed: int = 1) -> None:
        from lowbit import binary

        g = torch.Generator().manual_seed(seed)
        c = channels
        self.weight = torch.randn(c, c, 3, 3, generator=g)
        self.x = torch.randn(batch, c, hw, hw, generator=g)
        self.conv = binary.PackedBinaryConv2d(
            self.weight,
            1,
            1,
            threshold=(torch.zeros(c, dtype=torch.int32), torch.zeros(c, dtype=torch.bool)),
            input="bits",
            out="bits",
        )
        self.x_bits = binary.pack_conv_input(self.x)
        self.int8 = _int8_conv(self.weight, self.x, padding=1)

    def calls(self) -> dict[str, Callable[[], object]]:
        return {
            "fp32": partial(F.conv2d, self.x, self.weight, padding=1),
            "int8": self.int8,
            "bits->bits": partial(self.conv, self.x_bits),
        }


def time_calls(
    calls: dict[str, Callable[[], object]], reps: int, clock: str = "wall"
) -> dict[str, float]:
    """Median ms of each call (hot: the same inputs and weights every time), in order."""
    return {name: median_ms([fn], reps, clock=clock) for name, fn in calls.items()}


def binary_rows(
    size: int,
    batches: tuple[int, ...],
    threads: int,
    reps: int,
    clock: str = "wall",
    conv_channels: int = 128,
    conv_hw: int = 32,
    conv_batches: tuple[int, ...] = (1, 8),
) -> list[Row]:
    """The binary rows of ``lowbit bench kernels`` at the current thread count (``threads`` is
    only recorded): a ``size x size`` layer at each of ``batches``, then the conv."""
    rows: list[Row] = []
    for m in batches:
        ms = time_calls(BinaryLinearCase(size, size, m).calls(), reps, clock)
        for name, label in (
            ("bits->bits", "bits->bits"),
            ("float->float", "float->float"),
            ("plan call", "(bare C++ plan call)"),
        ):
            rows.append(
                Row(
                    f"binary b{m} {label}",
                    threads,
                    ms["fp32"],
                    ms["int8"],
                    ms[name],
                    targeted=size == TARGET_SIZE,
                )
            )
    for b in conv_batches:
        ms = time_calls(BinaryConvCase(conv_channels, conv_hw, b).calls(), reps, clock)
        case = f"binary conv {conv_channels}->{conv_channels} 3x3 {conv_hw}x{conv_hw} b{b}"
        rows.append(Row(case, threads, ms["fp32"], ms["int8"], ms["bits->bits"]))
    return rows


def _check_timing_args(reps: int, clock: str, threads: Sequence[int]) -> None:
    """The benchmarks' shared argument rules (both ``bench kernels`` and ``bench model``)."""
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"thread counts must be at least 1, got {', '.join(map(str, threads))}")
    if reps < 20:
        raise ValueError(
            "use at least 20 timed repetitions (medians of fewer runs are too noisy here)"
        )
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    if clock == "cpu" and any(t != 1 for t in threads):
        raise ValueError("clock='cpu' times the calling thread only: use it with threads=(1,)")


def bench_kernels(
    size: int = 4096,
    threads: tuple[int, ...] = (1, 2),
    reps: int = 30,
    batch: int = 64,
    variants: bool = True,
    clock: str = "wall",
    log: Callable[[str], None] = print,
    cold_bytes: int = COLD_BYTES,
    binary: bool = True,
    conv_channels: int = 128,
    conv_hw: int = 32,
    conv_batches: tuple[int, ...] = (1, 8),
) -> list[Row]:
    """Run every case and return the rows (also printed through ``log`` as they finish).

    ``binary``: also the XNOR-popcount rows (:func:`binary_rows`: the ``size x size`` layer at
    batch 1 and ``batch``, and a ``conv_channels -> conv_channels`` 3x3 conv on
    ``conv_hw x conv_hw`` maps at ``conv_batches``), each with its own fp32 / int8 baselines."""
    _check_timing_args(reps, clock, threads)
    if size < 16 or batch < 1:
        raise ValueError(
            f"size must be at least 16 and batch at least 1; got size={size}, batch={batch}"
        )
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
            for v in ("asym", "group64", "group4", "fgq4", "float", "int4")
        }
        if variants
        else {}
    )
    log(
        f"lowbit bench kernels: {n}x{k}, batch 1 and {batch}, medians of {reps} calls ({clock} clock); "
        f"isa={kernels.active_isa()}; "
        f"torch {torch.__version__}; cold = cycling {n_cold['fp32']} fp32 / {n_cold['int8']} int8 / "
        f"{n_cold['t2']} ternary layers (>= {cold_bytes >> 20} MiB each round)"
        + (
            "; binary rows: lowbit.binary modules, hot, int8 conv = torch.ao static "
            "quantized Conv2d"
            if binary
            else ""
        )
    )
    # Other processes on a 2-core VM distort every number: say how busy the machine was.
    note = target_note()
    if note:
        log(note)
    log(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    log(HEADER)
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
                    row = Row(name, t, f_ms, i_ms, l_ms, targeted=size == TARGET_SIZE)
                    rows.append(row)
                    log(format_row(row))
                for name, x in (("b1", x1), (f"b{batch}", xb)) if variants else ():
                    f_ms, i_ms = base[(x.shape[0], t)]
                    variants_ms = {"torch.ops (custom op)": timed([partial(tern[0].op, x)], reps)}
                    for v, layer in extra.items():
                        variants_ms[v] = timed([partial(layer, x)], reps)
                    for v, ms in variants_ms.items():
                        row = Row(f"ternary {name} hot ({v})", t, f_ms, i_ms, ms)
                        rows.append(row)
                        log(format_row(row))
                if binary:
                    for row in binary_rows(
                        size,
                        (1, batch),
                        t,
                        reps,
                        clock,
                        conv_channels=conv_channels,
                        conv_hw=conv_hw,
                        conv_batches=conv_batches,
                    ):
                        rows.append(row)
                        log(format_row(row))
    finally:
        torch.set_num_threads(previous)
    log(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


HEADER = f"{'case':<40} {'thr':>3} {'fp32 ms':>9} {'int8 ms':>9} {'lowbit ms':>10} {'vs fp32':>8} {'vs int8':>8}  target"


def format_row(r: Row) -> str:
    i8 = f"{'—':>9}" if r.int8_ms is None else f"{r.int8_ms:>9.3f}"
    v8 = f"{'—':>8}" if r.vs_int8 is None else f"{r.vs_int8:>7.2f}x"
    return (
        f"{r.case:<40} {r.threads:>3} {r.fp32_ms:>9.3f} {i8} {r.lowbit_ms:>10.4f} "
        f"{r.vs_fp32:>7.1f}x {v8}  {r.target}"
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
    of the same shapes (random weights: only the speed of the float baseline matters).

    XNOR models (``lowbit pack --xnor``, :func:`lowbit.binary.pack_bnn`) too: packed binary
    linear / bit-plane layers become ``nn.Linear``, packed binary convs ``nn.Conv2d``, max-pools
    on bits ``nn.MaxPool2d`` and ``FlattenBits`` ``nn.Flatten``, so the twin runs NCHW floats
    end to end. The batch norms and activations a bit-output layer folded into its threshold
    are not put back: as for the ternary models (BN folded by ``lowbit.pack``), the twin is the
    packed module tree in fp32, which if anything flatters fp32."""
    import copy

    from lowbit import binary
    from lowbit.nn import QuantConv2d, QuantLinear, QuantLSTM
    from lowbit.pack import PackedConv2d, PackedLinear, PackedLSTM

    twin = copy.deepcopy(model)

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, (PackedLSTM, QuantLSTM)):
                # PyTorch's own fused fp32 LSTM: the baseline a user would otherwise run.
                lstm = torch.nn.LSTM(
                    child.input_size,
                    child.hidden_size,
                    child.num_layers,
                    bias=bool(child.bias),
                    batch_first=child.batch_first,
                    bidirectional=child.bidirectional,
                )
                setattr(parent, name, lstm)
            elif isinstance(child, (binary.PackedBinaryLinear, binary.PackedBitplaneLinear)):
                setattr(parent, name, torch.nn.Linear(child.in_features, child.out_features))
            elif isinstance(child, binary.PackedBinaryConv2d):
                conv = torch.nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    bias=child.bias is not None,
                )
                setattr(parent, name, conv)
            elif isinstance(child, binary.BinaryMaxPool2d):
                pool = torch.nn.MaxPool2d(child.kernel_size, child.stride, child.padding)
                setattr(parent, name, pool)
            elif isinstance(child, binary.FlattenBits):
                setattr(parent, name, torch.nn.Flatten())
            elif isinstance(child, PackedLinear):
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


def stored_input_shape(manifest: dict[str, Any], model: torch.nn.Module) -> tuple[int, ...] | None:
    """The input shape (without the batch) of a ``.lowbit`` file's model: its registry
    architecture's ``input_shape`` option, else ``metadata.input_shape`` (written by
    ``lowbit pack --xnor``, whose flat ``nn.Sequential`` has none), else ``model.input_shape``."""
    arch = manifest.get("architecture") or {}
    stored = (
        (arch.get("options") or {}).get("input_shape")
        or (manifest.get("metadata") or {}).get("input_shape")
        or getattr(model, "input_shape", None)
    )
    return tuple(int(d) for d in stored) if stored else None


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


def _model_input(model: torch.nn.Module, batch: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Random inputs of one batch: character ids for a character LSTM (``lowbit.models``
    ``char_lstm``, vocabulary = its ``num_classes``), standard normal values otherwise."""
    g = torch.Generator().manual_seed(batch)
    from lowbit.models import CharLSTM

    if isinstance(model, CharLSTM):
        return torch.randint(0, model.num_classes, (batch, *input_shape), generator=g)
    return torch.randn(batch, *input_shape, generator=g)


def bench_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batches: tuple[int, ...] = (256, 1),
    threads: tuple[int, ...] = (1, 2),
    reps: int = 30,
    log: Callable[[str], None] = print,
    clock: str = "wall",
    target: bool = False,
) -> list[ModelRow]:
    """Median forward time of ``model`` (packed) against its fp32 twin, same inputs, same run.

    ``clock="cpu"`` (one thread only) times the calling thread's CPU time, which leaves out the
    time spent waiting for a core on a loaded machine (see :func:`median_ms`). ``target``: mark
    the batch-256 rows against the MNIST-model target (:data:`MODEL_TARGET`, set for
    :func:`default_mnist_model`)."""
    _check_timing_args(reps, clock, threads)
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be at least 1; got {batches}")
    baseline = float_twin(model)
    model = model.eval()
    rows: list[ModelRow] = []
    previous = torch.get_num_threads()
    log(
        f"lowbit bench model: input {tuple(input_shape)}, medians of {reps} forward passes ({clock} clock); "
        f"isa={kernels.active_isa()}; torch {torch.__version__}"
    )
    note = target_note() if target else None
    if note:
        log(note)
    log(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    try:
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    x = _model_input(model, b, input_shape)
                    f_ms = median_ms([partial(baseline, x)], reps, clock=clock)
                    l_ms = median_ms([partial(model, x)], reps, clock=clock)
                    row = ModelRow(b, t, f_ms, l_ms)
                    rows.append(row)
                    mark = ""
                    if target and b == 256 and x.is_floating_point():  # the MNIST-model target
                        ok = "ok" if row.speedup >= MODEL_TARGET else "MISSED"
                        mark = f"  >={MODEL_TARGET:g}x fp32 {ok}"
                    log(
                        f"batch {b:>4} threads {t}: fp32 {f_ms:8.3f} ms ({row.fp32_samples_s:9.0f}/s)  "
                        f"lowbit {l_ms:8.3f} ms ({row.lowbit_samples_s:9.0f}/s)  {row.speedup:5.2f}x{mark}"
                    )
    finally:
        torch.set_num_threads(previous)
    log(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows
