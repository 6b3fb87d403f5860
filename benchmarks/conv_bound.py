"""How much realization the convolution library alone allows.

    python benchmarks/conv_bound.py --models skipnet110,blockdrop110 --batch-sizes 8,32,64,128

For each model and batch it takes the routing the engine produces on real images, then
times only the residual branches' convolutions, with no gate, policy, gather, scatter or
Python bookkeeping: once at the full batch for every block (dense) and once at exactly
the sub-batch sizes the routing gives each block (routed). Both sides use the engine's
own lowered convolutions (folded BN, packed weights, channels_last).

    conv realization = (dense conv time / routed conv time) / (blocks / executed blocks)

is what an engine with zero overhead could reach with this convolution library: small
sub-batches run at a lower per-sample throughput (fixed per-call cost, less parallel
work), so it is usually below 1. latency.py's realization also includes gates/policy
(counted in its theoretical speedup) and the regrouping itself.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import dynexec
from dynexec.presets import PRESETS, build_preset
from latency import Timer, load_images


def block_inputs(engine, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block on a dense pass (shapes and realistic values)."""
    prog = engine.program
    with torch.inference_mode():
        h = prog.stem(x.contiguous(memory_format=torch.channels_last))
        inputs = []
        for block in prog.blocks:
            inputs.append(h)
            h = engine._run_block_all(block, h)
    return inputs


def conv_time(engine, inputs: list[torch.Tensor], rows: list[int], timer: Timer) -> float:
    """ms to run every block's branch on the first rows[k] samples of its input."""
    blocks = engine.program.blocks
    pieces = [(b.branch, h[:r].contiguous(memory_format=torch.channels_last))
              for b, h, r in zip(blocks, inputs, rows) if r > 0]

    def run():
        with torch.inference_mode():
            for branch, h in pieces:
                branch(h)
    return timer(run)


def measure(name: str, batch: int, repeats: int, timer: Timer) -> dict:
    images, source = load_images("auto", PRESETS[name].input_size, max(batch, 64))
    model, routing_source = build_preset(name, images[:64])
    engine = dynexec.compile(model)
    x = images[:batch]
    _, routing = engine(x, return_routing=True)
    counts = routing.sum(dim=0).tolist()
    inputs = block_inputs(engine, x)
    dense_rows = [batch] * len(counts)
    dense, routed = [], []
    for _ in range(2):  # warm-up
        conv_time(engine, inputs, dense_rows, timer), conv_time(engine, inputs, counts, timer)
    for _ in range(repeats):  # interleaved
        dense.append(conv_time(engine, inputs, dense_rows, timer))
        routed.append(conv_time(engine, inputs, counts, timer))
    d, r = statistics.median(dense), statistics.median(routed)
    fraction = sum(counts) / (batch * len(counts))
    return {"model": name, "routing_source": routing_source, "data": source, "batch_size": batch,
            "executed_fraction": fraction, "dense_conv_ms": d, "routed_conv_ms": r,
            "conv_realization": (d / r) * fraction}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="skipnet110,blockdrop110")
    p.add_argument("--batch-sizes", default="8,32,64,128")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(torch.device("cpu"))
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'model':14s} {'batch':>5s} {'executed':>8s} {'dense conv ms':>13s} "
          f"{'routed conv ms':>14s} {'conv realization':>16s}")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = measure(name, batch, args.repeats, timer)
            print(f"{name:14s} {batch:5d} {row['executed_fraction']:8.3f} "
                  f"{row['dense_conv_ms']:13.2f} {row['routed_conv_ms']:14.2f} "
                  f"{row['conv_realization']:16.3f}")


if __name__ == "__main__":
    main()
