"""Micro-benchmark of the native ops (torch.ops.dynexec.*) vs their PyTorch compositions.

    python benchmarks/kernels.py [--quick] [--json PATH] [--threads N] [--rounds R] [--stat median|min]

For every op and shape, the native kernel and the best PyTorch composition of the same
work run side by side (torch.utils.benchmark.Timer.blocked_autorange medians); the
table shows both times and ratio = baseline / native (> 1: native is faster).

Baselines (the reference ones are imported from dynexec.ops.reference):
  partition    nonzero + cat                       (reference.partition)
  gather_rows  index_select                        (reference.gather_rows)
  scatter      index_select + add + relu + index_copy_  (reference.scatter_residual_relu_)
               and the same with in-place add_/relu_ on the selected rows; the faster
               of the two is the baseline
  downsample_b avg_pool2d + cat                    (reference.downsample_b)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch.utils.benchmark import Timer

from dynexec import _native
from dynexec.ops import reference as ref

CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
CIFAR_FULL = CIFAR + [(64, 16, 32, 32), (256, 16, 32, 32), (256, 64, 8, 8)]
IMAGENET = [(32, 256, 56, 56), (32, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
IMAGENET_QUICK = [(32, 512, 28, 28), (64, 2048, 7, 7)]
FRACTIONS = [0.1, 0.5, 0.9]


STAT = "median"


def median_us(fn, min_run_time: float, threads: int) -> float:
    """blocked_autorange median in microseconds (with --stat min: the fastest block)."""
    t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return (m.median if STAT == "median" else min(m.times)) * 1e6


def compare_us(fns: list, min_run_time: float, threads: int, rounds: int) -> list[float]:
    """Median time of each fn, measured in `rounds` interleaved rounds (baseline and
    native alternate); the best round's median is kept, which filters out bursts of
    load from other processes on a shared machine."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], median_us(fn, min_run_time, threads))
    return best


def scatter_inplace_composition(out, y, idx, count):
    rows = idx[:count]
    tmp = out.index_select(0, rows)
    tmp.add_(y[:count]).relu_()
    out.index_copy_(0, rows, tmp)


def fmt_shape(shape):
    return "x".join(str(s) for s in shape)


def run(args) -> list[dict]:
    nat = torch.ops.dynexec
    threads = args.threads or torch.get_num_threads()
    mrt = 0.1 if args.quick else 0.2
    rounds = args.rounds

    def cmp(*fns):
        return compare_us(list(fns), mrt, threads, rounds)
    gen = torch.Generator().manual_seed(0)
    results = []

    def record(op, shape, layout, frac, base_name, base_us, native_us):
        row = dict(op=op, shape=fmt_shape(shape), layout=layout, active=frac,
                   baseline=base_name, baseline_us=base_us, native_us=native_us,
                   ratio=base_us / native_us)
        results.append(row)
        print(f"{op:<13} {row['shape']:<16} {layout:<5} {'' if frac is None else frac:>6} "
              f"{base_name:<26} {base_us:>11.1f} {native_us:>11.1f} {row['ratio']:>7.2f}x",
              flush=True)

    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}, "
          f"best of {rounds} interleaved rounds of blocked_autorange {STAT}s"
          f"{' (quick)' if args.quick else ''}; load average {load}")
    print(f"{'op':<13} {'shape':<16} {'fmt':<5} {'active':>6} {'baseline':<26} "
          f"{'base [us]':>11} {'native [us]':>11} {'ratio':>8}")
    print("-" * 104)

    # partition
    for n in ([128] if args.quick else [64, 128, 256]):
        for frac in FRACTIONS:
            mask = torch.rand(n, generator=gen) < frac
            b, m = cmp(lambda: ref.partition(mask), lambda: nat.partition(mask))
            record("partition", (n,), "-", frac, "nonzero+cat", b, m)

    shapes = [(s, "nchw") for s in (CIFAR if args.quick else CIFAR_FULL)]
    if not args.quick:
        shapes += [(s, "cl") for s in CIFAR]
    shapes += [(s, "nchw") for s in (IMAGENET_QUICK if args.quick else IMAGENET)]

    for shape, layout in shapes:
        x = torch.randn(shape, generator=gen)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        n = shape[0]
        for frac in FRACTIONS:
            count = max(1, round(frac * n))
            idx = torch.randperm(n, generator=gen)
            # gather_rows
            b, m = cmp(lambda: ref.gather_rows(x, idx, count),
                       lambda: nat.gather_rows(x, idx, count))
            record("gather_rows", shape, layout, frac, "index_select", b, m)
            # scatter_residual_relu_
            y = torch.randn((count, *shape[1:]), generator=gen)
            if layout == "cl":
                y = y.contiguous(memory_format=torch.channels_last)
            out_b, out_n = x.clone(), x.clone()
            b1, b2, m = cmp(lambda: ref.scatter_residual_relu_(out_b, y, idx, count),
                            lambda: scatter_inplace_composition(out_b, y, idx, count),
                            lambda: nat.scatter_residual_relu_(out_n, y, idx, count))
            name = "sel+add+relu+index_copy_" if b1 <= b2 else "sel+add_+relu_+index_copy_"
            record("scatter_relu_", shape, layout, frac, name, min(b1, b2), m)
            del out_b, out_n, y

    # downsample_b (BlockDrop's CIFAR shortcut: channels double at stage boundaries)
    for shape, layout in [(s, "nchw") for s in CIFAR[:2]] + [(s, "cl") for s in CIFAR[:2]]:
        x = torch.randn(shape, generator=gen)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        oc = 2 * shape[1]
        b, m = cmp(lambda: ref.downsample_b(x, oc), lambda: nat.downsample_b(x, oc))
        record("downsample_b", shape, layout, None, "avg_pool2d+cat", b, m)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved measurement rounds, best median kept (default 2 quick, 3 full)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per-measurement statistic: blocked_autorange median (default) or the "
                        "fastest block (more robust on a machine shared with other jobs)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default: torch.get_num_threads())")
    args = p.parse_args(argv)
    global STAT
    STAT = args.stat
    module, reason = _native.load()
    if module is None:
        print(f"native extension not available: {reason}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "quick": args.quick, "rounds": args.rounds, "stat": args.stat, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
