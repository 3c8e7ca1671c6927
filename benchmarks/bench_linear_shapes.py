"""Packed linear kernels on a few layer shapes: symmetric / asymmetric ternary and int4 x int8.

For A/B comparisons of kernel builds on a noisy machine: run it with each build in alternating
processes and compare the best of several runs. Prints one line per shape, times in ms
(CPU time of the calling thread, minimum over ``--reps`` calls), and torch fp32 ``F.linear``
of the same shape for reference. Random weights and activations (speed only)::

    .venv/bin/python benchmarks/bench_linear_shapes.py --label new
    .venv/bin/python benchmarks/bench_linear_shapes.py --shapes 256x784x512,64x4096x4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit import kernels as K


def best_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes",
        default="256x784x512,256x1024x1024,64x4096x4096,1x4096x4096",
        help="comma list of MxKxN (tokens x in_features x out_features)",
    )
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="", help="printed first on each line (e.g. the build)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.label} isa={K.active_isa()} threads={args.threads} (ms, min of {args.reps})")
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.lower().split("x"))
        x, w = torch.randn(m, k), torch.randn(n, k)
        tiles = K.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8))
        t4 = K.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8))
        sc, _ = K.pack_ternary_scales(torch.tensor(0.1), n, k)
        sa, sa2 = K.pack_ternary_scales(torch.tensor([0.1, 0.2]), n, k, asym=True)
        cases: dict[str, Callable[[torch.Tensor], object]] = {
            "fp32": lambda a, w=w: F.linear(a, w),
            "ternary": K.LinearKernel(tiles, sc, out_features=n),
            "asym": K.LinearKernel(tiles, sa, sa2, out_features=n),
            "int4": K.LinearKernel(t4, sc, out_features=n, bits=4),
        }
        cells = []
        for name, fn in cases.items():
            cells.append(f"{name} {best_ms(lambda f=fn, a=x: f(a), args.reps):8.3f}")
        print(f"{args.label} {shape:>14}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
