"""Kernel benchmark: lowbit ternary x int8 vs PyTorch fp32 F.linear and PyTorch dynamic int8.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 1,2] [--reps 30] [--json out.json]

Same as ``lowbit bench kernels`` (the logic lives in ``lowbit.bench`` so the installed command
has it too). Prints medians (ms) and ratios measured in the same run; see docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json

from lowbit import bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per case (>= 20)")
    parser.add_argument("--size", type=int, default=4096, help="N = K of the layer")
    parser.add_argument("--batch", type=int, default=64, help="batch of the GEMM case")
    parser.add_argument(
        "--no-variants", action="store_true", help="skip asym / grouped / custom-op rows"
    )
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: thread CPU time (1 thread)"
    )
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    print(bench.HEADER)
    rows = bench.bench_kernels(
        size=args.size,
        threads=tuple(int(t) for t in args.threads.split(",")),
        reps=args.reps,
        batch=args.batch,
        variants=not args.no_variants,
        clock=args.clock,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(bench.rows_as_dicts(rows), f, indent=1)


if __name__ == "__main__":
    main()
