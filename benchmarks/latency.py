"""Real speedup of routed execution against the theoretical FLOPs saving.

    python benchmarks/latency.py --device cpu            # embedded default models
    python benchmarks/latency.py --gpu a100 --json a100.json
    python benchmarks/latency.py --quick                 # < 90 s on 2 CPU cores
    python benchmarks/latency.py --peers onnxruntime,openvino   # only these dense peers

Methods, timed side by side in one process, interleaved in a shuffled order every round,
after warm-up (median and p20/p80 of the repeats):
  official-masked  the official semantics: every block on every sample, then the mask
  per-sample       the batch split into single samples, each running only its routed
                   blocks (BlockDrop's forward_single approach)
  dense-engine     the dynexec engine with every block forced on (baseline for realization)
  dynexec          the engine with the real routing, one row per available backend
  peer:<runtime>   the dense model (every block, no router, the model's own weights) in the
                   runtime a user would otherwise deploy it with (benchmarks/peers.py):
                   peer:torch-eager, peer:torch-eager-cl (channels_last), peer:torch-compile
                   (Inductor; on CPU with freezing), peer:onnxruntime, peer:openvino (CPU);
                   backend = the runtime's version. On by default (--quick: all but
                   torch-compile); --peers LIST picks them, --no-peers leaves them out. A
                   peer that is not installed, fails to build or run, or whose logits differ
                   from the dense engine's by more than 1e-3 of the largest |logit| is
                   reported (stderr and "peers_unavailable" in the JSON) and not timed

theoretical speedup = dense FLOPs / executed FLOPs (gates and policy included);
realized speedup = dense-engine time / method time; realization = realized / theoretical;
speedup vs official = official-masked time / method time; speedup vs best peer = the
best peer's time / method time, where the best peer (best_peer) is the peer with the lowest
median time at that model and batch size. Every time ratio is paired: the median over
rounds of the ratio of the two methods' times in the same round (see paired_ratio). Every
round's times are kept in the JSON ("rounds").
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import dynexec
from dynexec.models.flops import count_flops
from dynexec.runtime.executors.gpu_graph import graph_backend_status
from dynexec.runtime.ops import backend_status
from dynexec.runtime.program import CONV_IMPLS, resolve_conv_impl, winograd_available
from dynexec.tools.presets import PRESETS, build_preset, default_presets

if __package__:  # imported as benchmarks.latency
    from . import peers as peer_runtimes
else:  # run as a script: benchmarks/ is on sys.path
    import peers as peer_runtimes

ROW_FIELDS = ["model", "routing_source", "device", "gpu", "batch_size", "method", "backend",
              "ms_median", "ms_p20", "ms_p80", "samples_per_s", "executed_fraction",
              "flops_dense", "flops_executed", "theoretical_speedup", "realized_speedup",
              "realization", "speedup_vs_official", "speedup_vs_best_peer", "best_peer"]
PEER_PREFIX = "peer:"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def load_images(kind: str, size: int, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(images [count, 3, size, size], label of where they come from)."""
    if kind in ("auto", "fashion-mnist") and size == 32:
        try:
            from dynexec.tools import data
            if data.fashion_mnist_available():
                images, _ = data.fashion_mnist_test(limit=count)
                return images.float().contiguous(), "fashion-mnist test images"
        except ImportError:
            pass
        if kind == "fashion-mnist":
            sys.exit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=gen), "random normal inputs"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
class Timer:
    """Wall-clock on CPU; CUDA events with synchronisation on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# How the rows' realized_speedup and speedup_vs_official are computed (in the JSON, so a
# reader of older results, which used the ratio of the two medians, can tell them apart).
SPEEDUP_ESTIMATOR = "paired: median over rounds of the ratio of the two methods' times in that round"


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds r of numerator[r] / denominator[r].

    Both methods ran in round r within a second or so of each other, so a slowdown of the
    machine that lasts longer than a round (other tenants' work on a shared host) scales
    both times and cancels in their ratio; the ratio of two medians taken over all rounds
    keeps it as noise."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"expected two equally long, non-empty lists of round times, got "
                         f"{len(numerator)} and {len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


@dataclass
class Method:
    name: str
    backend: str
    fn: object
    repeats_scale: float = 1.0


def build_methods(model, engines: dict, current: dict, per_sample: bool,
                  peers: dict | None = None) -> list[Method]:
    """Each method runs on ``current['x']``, which the timing loop changes every round;
    ``peers`` (name -> benchmarks.peers.Peer) adds one method per dense peer."""
    any_engine = next(iter(engines.values()))
    dense = lambda x: torch.ones((x.shape[0], model.num_blocks), dtype=torch.bool, device=x.device)

    def official():
        with torch.inference_mode():
            model(current["x"])

    methods = [Method("official-masked", "-", official),
               Method("dense-engine", any_engine.backend_name,
                      lambda: any_engine(current["x"], routing=dense(current["x"])))]
    for name, engine in engines.items():
        methods.append(Method("dynexec", name, lambda e=engine: e(current["x"])))
    if per_sample:
        methods.append(Method("per-sample", any_engine.backend_name,
                              lambda: [any_engine(s) for s in current["x"].split(1)]))
    for name, peer in (peers or {}).items():
        methods.append(Method(PEER_PREFIX + name, peer.version, lambda p=peer: p.fn(current["x"])))
    return methods


def time_methods(methods: list[Method], batches: list[torch.Tensor], current: dict, timer: Timer,
                 repeats: int, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Interleaved rounds; every round takes the next batch of the pool, so the routing
    (and the sub-batch sizes) change from round to round, as in deployment.

    The methods run in a new (seeded) random order every round: in a fixed order a method
    always follows the same one, and its time depends on what that one left in the caches
    (dynexec right after the dense engine finds the same packed weights warm; the dense
    engine right after official-masked finds them evicted)."""
    order = random.Random(seed)
    for i in range(warmup):
        current["x"] = batches[i % len(batches)]
        for m in order.sample(methods, len(methods)):
            m.fn()
    times: dict[str, list[float]] = {f"{m.name}/{m.backend}": [] for m in methods}
    for r in range(repeats):
        current["x"] = batches[r % len(batches)]
        for m in order.sample(methods, len(methods)):
            times[f"{m.name}/{m.backend}"].append(timer(m.fn))
    return times


# --------------------------------------------------------------------------------------
def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(device)
    model_names = args.models.split(",") if args.models else default_presets()
    rows, inputs, rounds = [], {}, []
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None
    jobs = [(m, b) for m in model_names for b in args.batch_sizes]
    bar = tqdm(total=len(jobs), desc="latency", unit="config", file=sys.stderr,
               disable=args.no_progress) if tqdm else None
    pools: dict[int, tuple[torch.Tensor, str]] = {}
    peers_unavailable: dict[str, str] = {}
    peer_checks: dict[str, dict] = {}

    def report_unavailable(name: str, reason: str) -> None:
        """One line on stderr per peer left out (and its reason in the JSON)."""
        line = f"peer {name} unavailable: {reason}"
        if bar:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
        previous = peers_unavailable.get(name)
        peers_unavailable[name] = reason if previous is None else f"{previous}; {reason}"

    for name, reason in peer_runtimes.unavailable_peers(args.peers).items():
        report_unavailable(name, reason)
    peer_names = [n for n in args.peers if n not in peers_unavailable]

    def images_for(size: int) -> tuple[torch.Tensor, str]:
        """The benchmark's input pool for one image size, read once for every model."""
        if size not in pools:
            count = max(max(args.batch_sizes) * args.pool, args.calibration)
            pools[size] = load_images(args.data, size, count, seed=2)
        return pools[size]

    for model_name in model_names:
        model, source, size = _model(args, model_name, images_for)
        model = model.to(device)
        images, label = images_for(size)
        inputs[model_name] = label
        images = images.to(device)
        table = count_flops(model)
        engines = {b: dynexec.compile(model, backend=b, convolutions=args.convolutions)
                   for b in args.backends}
        peers = {}
        if peer_names:
            # checked against the dense engine: the peers must compute what it computes
            any_engine = next(iter(engines.values()))
            all_on = lambda x: torch.ones((x.shape[0], model.num_blocks), dtype=torch.bool, device=x.device)
            peers, failed = peer_runtimes.build_peers(
                model, peer_names, args.batch_sizes, images,
                lambda x: any_engine(x, routing=all_on(x)), threads=torch.get_num_threads())
            for name, reason in failed.items():
                report_unavailable(name, f"{model_name}: {reason}")
            peer_checks[model_name] = {
                name: {"version": p.version, "build_s": p.build_s,
                       "max_rel_error": {str(b): e for b, e in p.max_rel_error.items()}}
                for name, p in peers.items()}
        for batch in args.batch_sizes:
            # A pool of distinct batches (fewer for big inputs, to bound memory).
            n_batches = max(1, min(args.pool, images.shape[0] // batch,
                                   int(2**28 // (batch * images[0].numel() * 4)) or 1))
            batches = [images[i * batch:(i + 1) * batch].contiguous() for i in range(n_batches)]
            with torch.inference_mode():
                routing = torch.cat([next(iter(engines.values()))(x, return_routing=True)[1]
                                     for x in batches])
            flops_exec = float(table.executed(routing).mean())
            per_sample = (not args.quick or batch <= 64) and not args.no_per_sample
            current: dict = {}
            methods = build_methods(model, engines, current, per_sample, peers)
            times = time_methods(methods, batches, current, timer, args.repeats, args.warmup)
            med = {k: statistics.median(v) for k, v in times.items()}
            dense_times = times[f"dense-engine/{methods[1].backend}"]
            official_times = times["official-masked/-"]
            rounds.append({"model": model_name, "batch_size": batch, "times_ms": times})
            peer_methods = [m for m in methods if m.name.startswith(PEER_PREFIX)]
            best = min(peer_methods, key=lambda m: med[f"{m.name}/{m.backend}"], default=None)
            best_times = times[f"{best.name}/{best.backend}"] if best else None
            for m in methods:
                key = f"{m.name}/{m.backend}"
                t = times[key]
                if m.name == "dense-engine" or m.name.startswith(PEER_PREFIX):
                    frac, f_exec = 1.0, float(table.dense)
                elif m.name == "official-masked":
                    frac, f_exec = 1.0, float(table.dense + table.router)
                else:
                    frac, f_exec = float(routing.float().mean()), flops_exec
                theoretical = table.dense / f_exec
                realized = paired_ratio(dense_times, t)
                rows.append({
                    "model": model_name, "routing_source": source, "device": device.type,
                    "gpu": args.gpu or "", "batch_size": batch, "method": m.name,
                    "backend": m.backend, "ms_median": med[key], "ms_p20": quantile(t, 0.2),
                    "ms_p80": quantile(t, 0.8), "samples_per_s": batch / (med[key] / 1e3),
                    "executed_fraction": frac, "flops_dense": table.dense,
                    "flops_executed": f_exec, "theoretical_speedup": theoretical,
                    "realized_speedup": realized, "realization": realized / theoretical,
                    "speedup_vs_official": paired_ratio(official_times, t),
                    "speedup_vs_best_peer": paired_ratio(best_times, t) if best else None,
                    "best_peer": best.name if best else "",
                })
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return {"machine": machine_info(device, args), "inputs": inputs,
            "speedup_estimator": SPEEDUP_ESTIMATOR, "rows": rows, "rounds": rounds,
            "peers_requested": list(args.peers), "peers_unavailable": peers_unavailable,
            "peer_checks": peer_checks}


def _model(args, name: str, images_for):
    """(model, routing_source, input size); calibrated presets are calibrated on the first
    ``--calibration`` images of the benchmark's input pool."""
    if args.checkpoint and name == "checkpoint":
        model = dynexec.load_checkpoint(args.checkpoint, backbone=args.backbone)
        return model, "trained", model.input_size
    preset = PRESETS.get(name)
    if preset is None:
        sys.exit(f"unknown model {name!r}; expected one of {sorted(PRESETS)} (or --checkpoint)")
    model, source = build_preset(name, images_for(preset.input_size)[0][:args.calibration])
    return model, source, preset.input_size


def machine_info(device: torch.device, args) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"torch": torch.__version__, "dynexec": dynexec.__version__, "python": platform.python_version(),
            "device": device.type, "cpu_model": cpu,
            # the vector ISA torch and oneDNN dispatch to ("AVX512", "AVX2", ...): the same
            # cpu_model name covers hosts whose kernels differ
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # dynexec's Winograd tile products: "avx512" / "avx2" (bit-identical, not equally fast)
            "winograd_isa": torch.ops.dynexec.winograd_isa() if winograd_available() else "",
            "threads": torch.get_num_threads(),
            "gpu_label": args.gpu or "", "command": " ".join(sys.argv),
            "convolutions": resolve_conv_impl(args.convolutions),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------
def print_table(result: dict) -> None:
    """One line per row; with peers, 'vs peer' (speedup_vs_best_peer) on every row and the
    best peer's name on the dynexec rows."""
    rows = result["rows"]
    with_peers = any(r.get("best_peer") for r in rows)
    width = lambda key, least: max([least] + [len(str(r[key])) for r in rows])
    cols = [("model", 18), ("src", 10), ("batch", 5), ("method", width("method", 15)),
            ("backend", width("backend", 7)), ("ms", 9), ("samples/s", 9), ("exec", 5),
            ("theory", 6), ("realized", 8), ("realiz.", 7), ("vs off.", 7)]
    if with_peers:
        cols += [("vs peer", 7), ("best peer", 14)]
    print("  ".join(f"{c:>{w}}" for c, w in cols))
    for r in rows:
        vals = [r["model"], r["routing_source"], r["batch_size"], r["method"], r["backend"],
                f"{r['ms_median']:.2f}", f"{r['samples_per_s']:.0f}", f"{r['executed_fraction']:.2f}",
                f"{r['theoretical_speedup']:.2f}", f"{r['realized_speedup']:.2f}",
                f"{r['realization']:.2f}", f"{r['speedup_vs_official']:.2f}"]
        if with_peers:
            ratio = r.get("speedup_vs_best_peer")
            vals += ["-" if ratio is None else f"{ratio:.2f}",
                     r["best_peer"].removeprefix(PEER_PREFIX) if r["method"] == "dynexec" else ""]
        print("  ".join(f"{str(v):>{w}}" for v, (_, w) in zip(vals, cols)))


# The dense engine does the same work every round, so the spread of its times is the
# machine's noise. On this project's 2-core host its median p20-p80 spread was 4-7 % of
# the median in idle hours and 11-18 % when other tenants loaded the host.
BUSY_SPREAD = 0.10


def baseline_spread(rows: list[dict]) -> float | None:
    """Median over the dense-engine rows of (p80 - p20) / median (None without such rows)."""
    spreads = [(r["ms_p80"] - r["ms_p20"]) / r["ms_median"] for r in rows
               if r["method"] == "dense-engine" and r["ms_median"] > 0]
    return statistics.median(spreads) if spreads else None


def print_noise_warning(rows: list[dict]) -> None:
    spread = baseline_spread(rows)
    if spread is None or spread <= BUSY_SPREAD:
        return
    # The ratios are paired per round, which cancels slowdowns that last longer than a
    # round; shorter ones still hit one method and not the other.
    print(f"warning: the dense engine's times (the same work every round) spread by a median "
          f"{spread:.0%} between p20 and p80 (idle machine: < {BUSY_SPREAD:.0%}): the machine was "
          f"busy during the run; the speedup ratios (paired per round) are less certain than on "
          f"an idle machine; re-run on an idle machine or with more --repeats")


def write_outputs(result: dict, args) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(result["rows"])
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] == "dynexec"]
    best_peer_rows = [r for r in result["rows"] if r["method"].startswith(PEER_PREFIX)
                      and r["method"] == r["best_peer"]]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for backend in sorted({r["backend"] for r in rows if r["model"] == name}):
            sel = sorted((r for r in rows if r["model"] == name and r["backend"] == backend),
                         key=lambda r: r["batch_size"])
            ax.plot([r["batch_size"] for r in sel], [r["realized_speedup"] for r in sel], "o-",
                    label=f"realized ({backend})")
        sel = sorted((r for r in rows if r["model"] == name), key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in sel], [r["theoretical_speedup"] for r in sel], "k--",
                label="theoretical (FLOPs)")
        # the fastest dense peer at each batch size (dynexec beats it where its line is above)
        best = sorted((r for r in best_peer_rows if r["model"] == name), key=lambda r: r["batch_size"])
        if best:
            ax.plot([r["batch_size"] for r in best], [r["realized_speedup"] for r in best], "s",
                    color="0.4", label="best dense peer")
            for r in best:
                ax.annotate(r["method"].removeprefix(PEER_PREFIX), (r["batch_size"], r["realized_speedup"]),
                            textcoords="offset points", xytext=(3, -9), fontsize=6, color="0.3")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over dense engine")
        ax.set_title(f"{name} ({sel[0]['routing_source']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = result["machine"]
    host = m.get("gpu_name") or " ".join(filter(None, [m["cpu_model"], m.get("cpu_capability")]))
    fig.suptitle(f"dynexec on {m['device']} ({host}, "
                 f"{m['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", metavar="NAME", help="run on CUDA device 0 and record NAME (e.g. a100)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--models", help=f"comma list of {sorted(PRESETS)} (default: embedded defaults)")
    p.add_argument("--checkpoint", help="benchmark this checkpoint (any file dynexec loads)")
    p.add_argument("--backbone", help="backbone for a BlockDrop curriculum checkpoint")
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "random"],
                   help="inputs: shipped Fashion-MNIST test images when present (32 px), else random")
    p.add_argument("--batch-sizes", help="comma list (default 1,8,32,64,128; GPU adds 256)")
    p.add_argument("--backends", help="comma list of engine backends (default: every available one)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 15; --quick 5)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds (each on a different batch)")
    p.add_argument("--pool", type=int, default=8,
                   help="distinct input batches cycled through the timed rounds (fresh routing)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--convolutions", default="auto", choices=list(CONV_IMPLS),
                   help="CPU float32 convolution implementation of the engines "
                        "(dynexec.compile's convolutions=; default: the best available)")
    p.add_argument("--calibration", type=int, default=64, help="images used to calibrate routing")
    p.add_argument("--json"), p.add_argument("--csv"), p.add_argument("--plot", help="PNG path")
    p.add_argument("--quick", action="store_true", help="small run (< 90 s on 2 CPU cores)")
    p.add_argument("--no-per-sample", action="store_true", help="skip the per-sample method")
    p.add_argument("--peers", nargs="?", const="all", metavar="LIST",
                   help=f"dense peers timed as methods: 'all' or a comma list of "
                        f"{', '.join(peer_runtimes.PEERS)} (default: all; --quick: "
                        f"{', '.join(peer_runtimes.QUICK_PEERS)}); one that is unknown, not "
                        f"installed or fails is reported and left out")
    p.add_argument("--no-peers", action="store_true", help="time no dense peer")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.gpu:
        if not torch.cuda.is_available():
            p.exit(2, f"--gpu {args.gpu}: no CUDA device is available here; "
                      f"use --device cpu to measure on the CPU\n")
        args.device = "cuda"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "--device cuda: no CUDA device is available here; use --device cpu\n")
    if args.checkpoint:
        args.models = ",".join(filter(None, [args.models, "checkpoint"]))
    default_batches = "8,32" if args.quick else ("1,8,32,64,128" + (",256" if args.device == "cuda" else ""))
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1:
        p.error("batch sizes must be >= 1")
    args.repeats = args.repeats or (5 if args.quick else 15)
    status = backend_status(args.device)
    status["triton-graph"] = graph_backend_status(torch.device(args.device))
    if args.device != "cuda":  # under the CPU interpreter it is a correctness tool only
        status["triton-graph"] = (False, "triton-graph is timed on CUDA only")
    available = [n for n in ("native", "triton", "triton-graph", "torch") if status[n][0]]
    args.backends = args.backends.split(",") if args.backends else available
    for b in args.backends:
        if b not in available:
            p.error(f"backend {b!r} is not available on {args.device}: {status.get(b, (0, 'unknown'))[1]}")
    if args.quick:
        args.calibration = min(args.calibration, 32)
    if args.no_peers and args.peers is not None:
        p.error("--peers and --no-peers exclude each other")
    if args.no_peers:
        args.peers = []
    elif args.peers is None:
        args.peers = list(peer_runtimes.QUICK_PEERS if args.quick else peer_runtimes.PEERS)
    elif args.peers.strip() == "all":
        args.peers = list(peer_runtimes.PEERS)
    else:
        args.peers = list(dict.fromkeys(n.strip() for n in args.peers.split(",") if n.strip()))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    print_noise_warning(result["rows"])
    for name, label in result["inputs"].items():
        print(f"inputs for {name}: {label}")
    write_outputs(result, args)


if __name__ == "__main__":
    main()
