"""QAT overhead: training-step time of quantized models vs the same float model (target <= 1.25x).

One step = zero_grad, forward, cross-entropy, backward, optimizer.step(), method.after_step();
the optimizer is Adam over the method's parameter groups, wrapped by ``method.wrap_optimizer``
(so loss-aware proximal steps and BNN clipping are part of the measured step). Every layer is
quantized (``keep=()``), the worst case. Configurations are interleaved round by round; the
ratio to float is computed per round (same machine load) and the median over rounds is reported
with its range, which keeps the ratios meaningful on a shared machine.

    .venv/bin/python benchmarks/bench_qat.py                       # twn, bwn on MLP and CNN
    .venv/bin/python benchmarks/bench_qat.py --methods all --rounds 7
    .venv/bin/python benchmarks/bench_qat.py --methods twn,ttq --threads 1 --json
    .venv/bin/python benchmarks/bench_qat.py --threads 1 --clock cpu   # on a busy machine

Prints one line per (model, method): median step time and the ratio to the float step.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

import lowbit


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-784-1024-1024-10": (mlp, (1, 28, 28)),
    "cnn-32x32-5conv": (cnn, (3, 32, 32)),
}


class Runner:
    """One model + method + optimizer, ready to run steps on a fixed batch."""

    def __init__(
        self, base: nn.Module, method: str | None, shape: tuple[int, ...], batch: int, lr: float
    ) -> None:
        self.model = copy.deepcopy(base).train()
        self.method = None
        if method is not None:
            lowbit.quantize(self.model, method, keep=())
            self.method = lowbit.methods.get(method)
        groups = self.method.param_groups(self.model, lr) if self.method is not None else None
        opt = torch.optim.Adam(groups if groups is not None else self.model.parameters(), lr=lr)
        self.opt = self.method.wrap_optimizer(self.model, opt) if self.method is not None else opt
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn((batch, *shape), generator=gen)
        self.y = torch.randint(0, 10, (batch,), generator=gen)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        if self.method is not None:
            self.method.after_step(self.model)

    def time(self, steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
        t0 = clock()
        for _ in range(steps):
            self.step()
        return (clock() - t0) / steps


def run(
    methods: list[str],
    rounds: int,
    steps: int,
    batch: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    results = []
    for model_name, (factory, shape) in MODELS.items():
        torch.manual_seed(0)
        base = factory()
        runners = {"float": Runner(base, None, shape, batch, 1e-3)}
        for m in methods:
            runners[m] = Runner(base, m, shape, batch, 1e-3)
        for r in runners.values():
            for _ in range(warmup):
                r.step()
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):
            for k, r in runners.items():
                times[k].append(r.time(steps, clock))
        for k in runners:
            # Ratio per round (same load conditions), then the median over rounds.
            ratios = [t / f for t, f in zip(times[k], times["float"], strict=True)]
            results.append(
                {
                    "model": model_name,
                    "method": k,
                    "step_ms": statistics.median(times[k]) * 1e3,
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "batch": batch,
                }
            )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--methods", default="twn,bwn", help="comma list, or 'all' (every registered method but fp)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per round and configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (robust on a loaded machine)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = (
        [m for m in lowbit.methods.available() if m != "fp"]
        if args.methods == "all"
        else args.methods.split(",")
    )
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    results = run(methods, args.rounds, args.steps, args.batch, args.warmup, clock)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {args.clock} clock"
    )
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(
        f"QAT train-step time vs float (median of {args.rounds} rounds x {args.steps} steps, batch {args.batch}; {machine})"
    )
    print(f"{'model':24s} {'method':8s} {'step ms':>9s} {'ratio':>7s}  {'range':>11s}")
    for r in results:
        flag = "" if r["method"] == "float" or r["ratio"] <= 1.25 else "  (> 1.25x target)"
        rng = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
        print(
            f"{r['model']:24s} {r['method']:8s} {r['step_ms']:9.2f} {r['ratio']:6.2f}x  {rng:>11s}{flag}"
        )


if __name__ == "__main__":
    main()
