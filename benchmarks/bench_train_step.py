"""Training-step time of the loss-aware papers' MNIST MLP (784-3x2048-10 with BN), float and
quantized, with PyTorch's per-tensor Adam and its fused kernel (``TrainConfig.fused``).

One step = zero_grad, forward, cross-entropy, backward, the (wrapped) optimizer step; batch 100,
CPU time of the calling thread, minimum over ``--steps`` steps after 3 warm-up steps. Random data
(speed only)::

    .venv/bin/python benchmarks/bench_train_step.py
    .venv/bin/python benchmarks/bench_train_step.py --methods fp,lat2,laq --width 1024
    .venv/bin/python benchmarks/bench_train_step.py --methods fp,lat,lat:solver=exact,lab

A method may carry options after a colon (``lat:solver=exact``, ``laq:bits=2,levels=log`` is
written ``laq:bits=2:levels=log``); values that parse as integers are passed as integers.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lowbit


def mlp(width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 784
    for _ in range(3):
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def parse_method(spec: str) -> tuple[str, dict[str, object]]:
    """``"lat:solver=exact"`` -> ``("lat", {"solver": "exact"})``."""
    name, *opts = spec.split(":")
    options: dict[str, object] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def step_ms(spec: str, fused: bool, width: int, steps: int) -> float:
    method, options = parse_method(spec)
    torch.manual_seed(0)
    net = mlp(width)
    if method != "fp":
        lowbit.quantize(net, method, keep=(), **options)
    opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    if method != "fp":
        opt = lowbit.methods.get(method).wrap_optimizer(net, opt)
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.thread_time()
        step()
        times.append(time.thread_time() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--methods",
        default="fp,lat2",
        help="comma list: fp and lowbit methods, each optionally with :key=value options",
    )
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"MLP 784-3x{args.width}-10, batch 100, {args.threads} thread(s), ms per step (min of {args.steps})"
    )
    for method in args.methods.split(","):
        plain = step_ms(method, False, args.width, args.steps)
        fused = step_ms(method, True, args.width, args.steps)
        print(f"{method:18s} per-tensor Adam {plain:8.1f}   fused Adam {fused:8.1f}", flush=True)


if __name__ == "__main__":
    main()
