"""How much realization the convolution library alone allows.

    python benchmarks/conv_bound.py --models skipnet110,blockdrop110 --batch-sizes 8,32,64,128

For each model and batch it takes the routing the engine produces on real images, runs
the engine with that routing forced (so no gate or policy runs) and with every block
forced on (the dense engine), and sums, with torch.profiler, the time spent inside the
convolution operators of each forward — in place, with the engine's own cache state,
folded BN, packed weights and channels_last. Interleaved rounds, medians.

    conv realization = (dense conv time / routed conv time) / (blocks / executed blocks)

is what an engine with zero overhead outside the convolutions could reach with this
convolution library: small sub-batches run at a lower per-sample throughput (fixed
per-call cost, less parallel work). latency.py's realization also includes gates/policy
(counted in its theoretical speedup) and the regrouping itself; the columns
"dense other ms" / "routed other ms" are the forward's time outside convolutions.
The engine runs unsharded (batch_shards=1): with batch shards the profiled convolution
times of the threads would add up to CPU time, not to the forward's wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# The profiler backend (kineto) logs two lines per profiled call at its default level;
# at 6 it is silent. Set before the first profiler starts; a user's own value wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import dynexec
from dynexec.runtime.program import CONV_IMPLS, resolve_conv_impl
from dynexec.tools.presets import PRESETS, build_preset

from latency import load_images


def _conv_ms(prof) -> float:
    """ms spent in convolution operators (self time, so nested dispatch is not counted twice)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key) / 1e3


def profiled(fn) -> tuple[float, float]:
    """(wall ms, conv ms) of one call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    return wall, _conv_ms(prof)


def measure(name: str, batch: int, repeats: int, convolutions: str = "auto") -> dict:
    images, source = load_images("auto", PRESETS[name].input_size, max(batch, 64))
    model, routing_source = build_preset(name, images[:64])
    engine = dynexec.compile(model, convolutions=convolutions, batch_shards=1)
    x = images[:batch]
    _, routing = engine(x, return_routing=True)
    dense_routing = torch.ones_like(routing)
    runs = {"dense": lambda: engine(x, routing=dense_routing), "routed": lambda: engine(x, routing=routing)}
    for fn in runs.values():  # warm-up
        fn(), fn()
    samples = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved
        for k, fn in runs.items():
            samples[k].append(profiled(fn))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in samples.items()}
    fraction = routing.float().mean().item()
    (dw, dc), (rw, rc) = med["dense"], med["routed"]
    return {"model": name, "convolutions": engine.program.convolutions, "routing_source": routing_source,
            "data": source, "batch_size": batch,
            "executed_fraction": fraction, "dense_conv_ms": dc, "routed_conv_ms": rc,
            "dense_other_ms": dw - dc, "routed_other_ms": rw - rc,
            "conv_realization": (dc / rc) * fraction}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="skipnet110,blockdrop110")
    p.add_argument("--batch-sizes", default="8,32,64,128")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--convolutions", default="auto", choices=list(CONV_IMPLS),
                   help="convolution implementation (dynexec.compile's convolutions=)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}  "
          f"convolutions={resolve_conv_impl(args.convolutions)}")
    print(f"{'model':14s} {'batch':>5s} {'executed':>8s} {'dense conv ms':>13s} "
          f"{'routed conv ms':>14s} {'conv realization':>16s} {'dense other ms':>14s} "
          f"{'routed other ms':>15s}")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = measure(name, batch, args.repeats, args.convolutions)
            print(f"{name:14s} {batch:5d} {row['executed_fraction']:8.3f} "
                  f"{row['dense_conv_ms']:13.2f} {row['routed_conv_ms']:14.2f} "
                  f"{row['conv_realization']:16.3f} {row['dense_other_ms']:14.2f} "
                  f"{row['routed_other_ms']:15.2f}")


if __name__ == "__main__":
    main()
