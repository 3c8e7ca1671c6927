"""Binary (XNOR-popcount) kernels vs PyTorch fp32 and PyTorch dynamic int8, measured in one run.

    .venv/bin/python benchmarks/bench_binary.py [--threads 1,2] [--reps 30] [--size 4096]
    .venv/bin/python benchmarks/bench_binary.py --mnist RUN_DIR   # end to end, a BNN training run

``--mnist`` (a run directory of ``lowbit train --recipe bnn-mnist-small``): packs the trained model
with :func:`lowbit.binary.pack_bnn`, checks that its predictions equal the simulated model's on
every MNIST test sample, and times batches of 256 (packed vs the simulated fp32 model).

Rows (medians of ``--reps`` timed calls after warm-up, wall clock, weights hot in cache):

* ``linear M=1`` / ``M=64``: a ``size x size`` layer. lowbit ``bits->bits``: packed input,
  threshold epilogue writing packed bits (a hidden layer of a packed BNN); ``float->float``: the
  float input is binarized and packed in the call, float output (first binary layer after a float
  one). Baselines: ``F.linear`` fp32 and ``torch.ao`` ``quantize_dynamic`` int8 (fbgemm).
* ``conv 128->128 3x3 32x32`` (batch 1 and 8): lowbit packed NHWC bits -> bits with exact zero
  padding vs fp32 ``F.conv2d`` (NCHW, MKL-DNN).

Targets (docs/binary.md): M=1 >= 10x faster than int8, M=64 >= 20x faster than fp32, conv >= 10x
faster than fp32. The machine is often shared: report ``uptime`` with the numbers.

The layers and baselines are ``lowbit.bench``'s (``BinaryLinearCase``, ``BinaryConvCase``), the
same ones ``lowbit bench kernels`` times in its ``binary`` rows (which also have an int8 conv
baseline, ``torch.ao``'s static quantized ``Conv2d``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from lowbit import bench, kernels
from lowbit import binary as B

CLOCK = "wall"


def median_ms(fn: Callable[[], object], reps: int) -> float:
    return bench.median_ms([fn], reps, clock=CLOCK)


LINEAR_LABELS = {
    "fp32": "torch fp32 F.linear",
    "int8": "torch dynamic int8",
    "bits->bits": "lowbit binary bits->bits",
    "float->float": "lowbit binary float->float",
    # The same layer without the Python module around it (C++ plan call).
    "plan call": "lowbit kernel call bits->bits",
}


def bench_linear(size: int, m: int, reps: int) -> list[tuple[str, float]]:
    calls = bench.BinaryLinearCase(size, size, m).calls()
    with torch.no_grad():
        ms = bench.time_calls(calls, reps, CLOCK)
    return [(LINEAR_LABELS[k], v) for k, v in ms.items()]


def bench_conv(batch: int, reps: int) -> list[tuple[str, float]]:
    calls = bench.BinaryConvCase(128, 32, batch).calls()
    del calls["int8"]  # this script's table has no int8 conv column (lowbit bench kernels does)
    with torch.no_grad():
        ms = bench.time_calls(calls, reps, CLOCK)
    return [
        ("torch fp32 F.conv2d", ms["fp32"]),
        ("lowbit binary conv bits->bits", ms["bits->bits"]),
    ]


def bench_mnist(run_dir: str, reps: int) -> None:
    import lowbit
    from lowbit.train.checkpoint import load_checkpoint
    from lowbit.train.runs import _locate, _method_parts, build_data, build_model, read_run_spec

    run, path = _locate(run_dir, "best")
    spec = read_run_spec(run)
    data = build_data(spec["data"])
    model = build_model(spec["model"], data)
    method, options = _method_parts(spec.get("method", {}))
    model = lowbit.quantize(model, method, **options)
    model.load_state_dict(load_checkpoint(path)["model"])
    model.eval()
    packed = B.pack_bnn(model)
    print(packed)
    assert data.test is not None
    x, y = data.test.x, data.test.y
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        got = torch.cat([packed(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    pr, pg = ref.argmax(1), got.argmax(1)
    print(
        f"MNIST test samples: {len(x)}; predictions differing: {int((pr != pg).sum())}; "
        f"max |logit difference|: {float((ref - got).abs().max()):.3g}; test error simulated "
        f"{100 * float((pr != y).float().mean()):.2f}% packed {100 * float((pg != y).float().mean()):.2f}%"
    )
    xb = x[:256]
    with torch.no_grad():
        t_sim = median_ms(lambda: model(xb), reps)
        t_packed = median_ms(lambda: packed(xb), reps)
    print(
        f"batch 256, {torch.get_num_threads()} thread(s): simulated fp32 {t_sim:.3f} ms, "
        f"packed {t_packed:.3f} ms ({t_sim / t_packed:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per case (>= 20)")
    parser.add_argument("--size", type=int, default=4096, help="N = K of the linear layer")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: CPU time of the calling thread (1 thread only; every library then computes "
        "in the calling thread), less disturbed by other processes on a shared machine",
    )
    parser.add_argument("--mnist", default="", help="run directory of a BNN MNIST training run")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu" and args.threads != "1":
        parser.error("--clock cpu needs --threads 1")
    CLOCK = args.clock
    if args.mnist:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            bench_mnist(args.mnist, args.reps)
        return
    print(f"lowbit ISA path: {kernels.active_isa()}, clock: {args.clock}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s) ==")
        for m in (1, 64):
            rows = dict(bench_linear(args.size, m, args.reps))
            print(f"linear {args.size}x{args.size} M={m}")
            for name, ms in rows.items():
                print(f"  {name:32s} {ms:9.4f} ms")
            for name in (
                "lowbit binary bits->bits",
                "lowbit binary float->float",
                "lowbit kernel call bits->bits",
            ):
                print(
                    f"  {name}: {rows['torch fp32 F.linear'] / rows[name]:7.1f}x vs fp32, "
                    f"{rows['torch dynamic int8'] / rows[name]:6.1f}x vs int8"
                )
        for batch in (1, 8):
            rows = dict(bench_conv(batch, args.reps))
            print(f"conv 128->128 3x3 pad 1 on 32x32, batch {batch}")
            for name, ms in rows.items():
                print(f"  {name:32s} {ms:9.4f} ms")
            ratio = rows["torch fp32 F.conv2d"] / rows["lowbit binary conv bits->bits"]
            print(f"  lowbit binary conv: {ratio:7.1f}x vs fp32")


if __name__ == "__main__":
    main()
