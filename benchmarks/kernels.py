"""Micro-benchmark of the regrouping ops and the fused indexed convolution.

    python benchmarks/kernels.py [--device cpu|cuda] [--backends native,triton,torch]
                                 [--quick] [--json PATH] [--threads N] [--rounds R]
                                 [--stat median|min] [--sections ops,fused,winograd] [--fused-smoke]

Section "ops": for every op and shape, the best PyTorch composition of the work (the
baseline) and every selected backend (dynexec.runtime.ops.get_backend: native = the C++/CUDA
extension, triton = dynexec.kernels, torch = dynexec's pure-PyTorch reference, which also
validates its arguments) run side by side, interleaved, in one run. Each backend's result
is checked against the baseline's before it is timed. Ratio = baseline / backend (> 1: the
backend is faster). Each op is one entry of the table OPS (its cases, inputs, dynexec call
and compositions); run_ops is the one loop over it.

Baselines (plain compositions, without the argument checks of dynexec.runtime.ops.reference):
  partition     nonzero + cat
  gather_rows   index_select (for channels_last: index_select on the NHWC view, one pass)
  scatter_relu_ index_select + add + relu + index_copy_, and the same with in-place
                add_/relu_ on the selected rows; the faster of the two is the baseline
  downsample_b  avg_pool2d + cat
  relu_pool_    relu_ + mean over (H, W)
  scatter_pool_ scatter_residual_relu_ (the native op when it is timed) + mean over (H, W)
  gate_step     addmm + lstm_cell + addmm + sigmoid (SkipNet's recurrent gate step)

Section "fused": the fused indexed implicit-GEMM convolution (dynexec.kernels.indexed_conv)
vs cuDNN on the same compacted work, NHWC, for ResNet block convs. Roles (together they
chain into a routed block):
  first  conv of a block: input = full batch, active rows read through idx.
         baseline  gather_rows + F.conv2d(folded-BN bias) + relu_  -> compact output
         fused     indexed_conv2d(gather=True, relu=True, device count)
  mid    bottleneck 3x3: compact input -> compact output.
         baseline  F.conv2d + relu_;  fused indexed_conv2d(gather=False)
  last   conv of a block: compact input, residual read through idx, result scattered.
         baseline  F.conv2d + index_select(residual) + add_ + relu_ + index_copy_
         fused     indexed_conv2d(residual=..., relu=True, scatter=True, device count)
The baseline is given the active count as a host int (it does not pay the device->host
sync that the fused kernel avoids). The fused launch is sized for the full batch and
reads the count on the device. Each case is checked (allclose with a dtype tolerance)
before it is timed. fp32 means TF32 on CUDA (cuDNN and the kernel both allow it).

Section "winograd" (CPU): dynexec's Winograd F(2x2, 3x3) kernel against oneDNN's direct
convolution (the engine's convolutions="winograd" vs "onednn") on the CIFAR ResNets' 3x3
stride-1 convolutions, 16 / 32 / 64 channels at 32x32 / 16x16 / 8x8, NHWC, folded-BN bias:
the same single-convolution OneDnnChain, once as created and once after enable_winograd.
Both are checked against F.conv2d in float64 first. Ratio = oneDNN / Winograd.

Devices: on CUDA everything is timed with torch.utils.benchmark (it synchronises). On
CPU the Triton code runs only under the interpreter (TRITON_INTERPRET=1 set before
starting Python): the triton ops are then timed only with --quick, one call per
measurement, and the fused section runs with tiny shapes as a smoke test of the code
path; those times are labelled "interpreter, not a performance number".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from dynexec.runtime.ops import BACKENDS, backend_status, get_backend
from dynexec.runtime.ops import extension as _native  # noqa: F401  (importing dynexec registers the native ops)
from dynexec.runtime.ops import reference as ref

CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
CIFAR_FULL = CIFAR + [(64, 16, 32, 32), (256, 16, 32, 32), (256, 64, 8, 8)]
CIFAR_256 = [(256, 16, 32, 32), (256, 32, 16, 16), (256, 64, 8, 8)]
IMAGENET = [(32, 256, 56, 56), (32, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
IMAGENET_QUICK = [(32, 512, 28, 28), (64, 2048, 7, 7)]
FRACTIONS = [0.1, 0.5, 0.9]
FUSED_FRACTIONS = [0.25, 0.5, 0.9]

STAT = "median"
INTERPRETER_NOTE = "interpreter, not a performance number"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- timing -----------------------------------------------------------------------------
def median_us(fn, min_run_time: float, threads: int) -> float:
    """blocked_autorange median in microseconds (with --stat min: the fastest block).
    The Timer synchronises the accelerator before reading the clock."""
    t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return (m.median if STAT == "median" else min(m.times)) * 1e6


def once_us(fn) -> float:
    """One call (for interpreted Triton kernels, far too slow to autorange)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def compare_us(fns: list, min_run_time: float, threads: int, rounds: int,
               once: frozenset = frozenset()) -> list[float]:
    """Time of each fn, measured in `rounds` interleaved rounds (baseline and backends
    alternate); the best round is kept, which filters out bursts of load from other
    processes on a shared machine. fns whose position is in `once` are timed with a
    single call, in one round."""
    best = [float("inf")] * len(fns)
    for r in range(rounds):
        for i, fn in enumerate(fns):
            if i in once:
                if r == 0:
                    best[i] = once_us(fn)
            else:
                best[i] = min(best[i], median_us(fn, min_run_time, threads))
    return best


# ---- helpers (unit-tested in tests/test_kernels_bench.py) -----------------------------
def count_for(frac: float, n: int) -> int:
    """Number of active rows for an active fraction: round(frac * n), at least 1."""
    return min(n, max(1, round(frac * n)))


def fmt_shape(shape):
    return "x".join(str(s) for s in shape)


def resolve_device(arg: str | None) -> torch.device:
    """--device: default cuda if available else cpu; cuda without a GPU raises SystemExit."""
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {arg}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); run with --device cpu")
    return dev


def select_backends(requested: str | None, device: torch.device, quick: bool,
                    status: dict | None = None) -> tuple[list[str], list[str]]:
    """(backends to time, notes). Default: every available backend. On CPU, triton is
    available only under TRITON_INTERPRET=1 and is then timed only with --quick.
    An explicitly requested backend that cannot run raises SystemExit."""
    status = status if status is not None else backend_status(device)
    status = dict(status)
    if device.type == "cuda" and status["native"][0]:
        try:
            if _native.extension_cuda_version() == 0:
                status["native"] = (False, "dynexec._C is a CPU-only build (no CUDA kernels)")
        except Exception as exc:  # pragma: no cover - broken extension
            status["native"] = (False, f"dynexec._C: {exc}")
    if device.type == "cpu" and status["triton"][0] and not quick:
        status["triton"] = (False, "the Triton interpreter is slow: triton is timed on CPU only "
                                   "with --quick")
    notes = []
    if requested is None:
        names = [b for b in BACKENDS if status[b][0]]
        notes = [f"{b}: not timed ({status[b][1]})" for b in BACKENDS if not status[b][0]]
    else:
        names = [b.strip() for b in requested.split(",") if b.strip()]
        for b in names:
            if b not in BACKENDS:
                raise SystemExit(f"--backends: unknown backend {b!r}; expected some of {list(BACKENDS)}")
            if not status[b][0]:
                raise SystemExit(f"--backends: {b} is not available on {device.type}: {status[b][1]}")
        names = [b for b in BACKENDS if b in names]
    return names, notes


def op_shapes(device: torch.device, quick: bool) -> list[tuple[tuple, str]]:
    """(shape, layout) for gather_rows / scatter: today's CPU shapes; on CUDA also batch
    256 at CIFAR sizes."""
    cifar = CIFAR if quick else CIFAR_FULL
    if device.type == "cuda":
        cifar = cifar + [s for s in CIFAR_256 if s not in cifar]
    shapes = [(s, "nchw") for s in cifar]
    if not quick:
        shapes += [(s, "cl") for s in CIFAR]
    shapes += [(s, "nchw") for s in (IMAGENET_QUICK if quick else IMAGENET)]
    return shapes


@dataclass(frozen=True)
class ConvCase:
    """One conv of a routed ResNet block (square kernel, padding (k-1)//2, NHWC)."""
    model: str    # cifar | imagenet | smoke
    role: str     # first (gather from the full batch) | mid (compact) | last (residual+scatter)
    batch: int
    cin: int
    cout: int
    size: int     # input height = width
    kernel: int
    stride: int

    @property
    def out_size(self) -> int:
        pad = (self.kernel - 1) // 2
        return (self.size + 2 * pad - self.kernel) // self.stride + 1

    def label(self) -> str:
        return (f"{self.model} {self.role} {self.kernel}x{self.kernel}/s{self.stride} "
                f"{self.cin}->{self.cout} @{self.size}px b{self.batch}")


def _cifar_block_convs(batch: int, widths=(16, 32, 64), size=32, model="cifar") -> list[ConvCase]:
    cases = []
    for i, c in enumerate(widths):
        s = size >> i
        if i > 0:  # first block of a stage: 3x3 stride 2, channels double (option-A/B shortcut)
            cases.append(ConvCase(model, "first", batch, widths[i - 1], c, 2 * s, 3, 2))
        cases.append(ConvCase(model, "first", batch, c, c, s, 3, 1))
        cases.append(ConvCase(model, "last", batch, c, c, s, 3, 1))
    return cases


def _bottleneck_convs(batch: int, width: int, size: int, model="imagenet") -> list[ConvCase]:
    return [ConvCase(model, "first", batch, 4 * width, width, size, 1, 1),  # 1x1 reduce
            ConvCase(model, "mid", batch, width, width, size, 3, 1),        # 3x3
            ConvCase(model, "last", batch, width, 4 * width, size, 1, 1)]   # 1x1 expand


def fused_cases(quick: bool = False, smoke: bool = False) -> list[ConvCase]:
    """The conv cases of the fused section.

    CIFAR ResNet BasicBlock 3x3 convs (16/32/64 channels at 32/16/8 px, stride 1 and the
    stride-2 stage entries) at batch 128 (and 256 unless quick); ImageNet Bottleneck
    1x1 reduce / 3x3 / 1x1 expand at 56/28/14/7 px (batch 32, 32, 64, 64; quick: 28 and
    7 px). smoke: tiny versions of the same roles, for the Triton interpreter."""
    if smoke:
        return (_cifar_block_convs(8, widths=(16, 32), size=8, model="smoke")
                + _bottleneck_convs(8, 16, 4, model="smoke"))
    cases = []
    for b in ([128] if quick else [128, 256]):
        cases += _cifar_block_convs(b)
    stages = [(32, 64, 56), (32, 128, 28), (64, 256, 14), (64, 512, 7)]
    if quick:
        stages = [stages[1], stages[3]]
    for b, width, size in stages:
        cases += _bottleneck_convs(b, width, size)
    return cases


def fused_dtypes(device: torch.device) -> list[tuple[torch.dtype, bool]]:
    """(dtype, tf32) pairs. fp32 uses TF32 on CUDA; the interpreter ignores TF32."""
    tf32 = device.type == "cuda"
    return [(torch.float16, False), (torch.bfloat16, False), (torch.float32, tf32)]


def dtype_name(dtype: torch.dtype, tf32: bool = False) -> str:
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
            torch.float64: "fp64"}[dtype]
    return "tf32" if tf32 and dtype == torch.float32 else name


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """rtol, and atol relative to max(1, max|baseline|), for fused vs baseline."""
    if dtype == torch.float32:
        return 1e-2 if tf32 else 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-10}[dtype]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> tuple[bool, float]:
    """allclose(actual, expected, rtol=tol, atol=tol * max(1, max|expected|)); also returns
    the max abs error."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
    return bool(torch.allclose(a, e, rtol=tol, atol=tol * scale)), err


# ---- baselines: plain PyTorch compositions (no argument checks) -------------------------
def _is_cl(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def gather_composition(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] keeping x's layout: index_select on the NHWC view for channels_last (one
    pass; index_select of a channels_last tensor would return NCHW)."""
    if _is_cl(x):
        return x.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return x.index_select(0, rows)


def scatter_composition(out: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> None:
    """out[rows] = y in place (index_copy_ on the NHWC views for channels_last)."""
    if _is_cl(out):
        out.permute(0, 2, 3, 1).index_copy_(0, rows, y.permute(0, 2, 3, 1))
    else:
        out.index_copy_(0, rows, y)


def partition_composition(mask):
    mask = mask.reshape(-1)
    active = torch.nonzero(mask, as_tuple=True)[0]
    inactive = torch.nonzero(~mask, as_tuple=True)[0]
    return torch.cat([active, inactive]), torch.tensor(active.numel(), device=mask.device)


def scatter_outofplace_composition(out, y, idx, count):
    rows = idx[:count]
    out.index_copy_(0, rows, torch.relu(y[:count] + out.index_select(0, rows)))


def scatter_inplace_composition(out, y, idx, count):
    rows = idx[:count]
    tmp = out.index_select(0, rows)
    tmp.add_(y[:count]).relu_()
    out.index_copy_(0, rows, tmp)


def downsample_composition(x, out_channels):
    pooled = F.avg_pool2d(x, 2)
    z = torch.cat([pooled] + [pooled.mul(0)] * (out_channels // x.shape[1] - 1), dim=1)
    return z.contiguous(memory_format=torch.channels_last) if _is_cl(x) else z


# ---- section "ops": one table entry per op ----------------------------------------------
# Each entry names the op's cases, builds their inputs, makes the dynexec call of a backend
# and the PyTorch composition(s) it is compared with; run_ops is the one loop over them.
# Every backend's result is checked against the composition's before anything is timed;
# with several compositions the fastest is the baseline.
@dataclass(frozen=True)
class OpBench:
    op: str  # the "op" column and JSON field
    # (device, quick) -> [(shape, layout, active fraction or None)]; shape as printed
    cases: Callable[[torch.device, bool], list[tuple]]
    # (shape, layout, active, device, generator) -> the inputs (tensors and ints by name)
    inputs: Callable[..., dict]
    # (backend ops, inputs) -> (timed closure, closure that runs the op once and returns
    # what is compared with the baseline); in-place ops work on the backend's own copies
    dynexec: Callable[[Any, dict], tuple[Callable, Callable]]
    # (inputs, backend ops by name) -> [(name, closure)]: the PyTorch compositions
    baselines: Callable[[dict, dict], list[tuple[str, Callable]]]
    # inputs -> the composition's result
    expected: Callable[[dict], Any]
    # (dynexec result, expected, inputs) -> the same?
    same: Callable[[Any, Any, dict], bool]


def _returns(method: str, *names: str):
    """The dynexec call of an op that returns its result."""
    def make(ops, inp):
        f, args = getattr(ops, method), [inp[k] for k in names]

        def run():
            return f(*args)
        return run, run
    return make


def _updates(method: str, names: tuple[str, ...], updated: tuple[str, ...]):
    """The dynexec call of an op that updates `updated` in place, on copies of its own;
    its result is those tensors after one call."""
    def make(ops, inp):
        f = getattr(ops, method)
        own = {k: inp[k].clone() for k in updated}
        args = [own.get(k, inp[k]) for k in names]

        def run():
            return f(*args)

        def result():
            run()
            return tuple(own[k] for k in updated)
        return run, result
    return make


def _mean_close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _randn(shape, layout, device, gen) -> torch.Tensor:
    t = torch.randn(shape, generator=gen).to(device)
    return _cl(t) if layout == "cl" else t


def _partition_cases(device, quick):
    return [((n,), "-", frac) for n in ([128] if quick else [64, 128, 256]) for frac in FRACTIONS]


def _partition_inputs(shape, layout, frac, device, gen):
    return dict(mask=(torch.rand(shape[0], generator=gen) < frac).to(device))


def _rows_cases(device, quick):
    return [(shape, layout, frac) for shape, layout in op_shapes(device, quick) for frac in FRACTIONS]


def _rows_inputs(shape, layout, frac, device, gen, with_y=False):
    """x (in `layout`), a random row order idx and count = the active rows; with_y: y, the
    updates of those rows."""
    n = shape[0]
    count = count_for(frac, n)
    inp = dict(x=_randn(shape, layout, device, gen), idx=torch.randperm(n, generator=gen).to(device),
               count=count)
    inp["rows"] = inp["idx"][:count]
    if with_y:
        inp["y"] = _randn((count, *shape[1:]), layout, device, gen)
    return inp


def _scatter_inputs(shape, layout, frac, device, gen):
    inp = _rows_inputs(shape, layout, frac, device, gen, with_y=True)
    inp["out"] = inp["x"]
    return inp


def _scatter_expected(inp):
    want = inp["x"].clone()
    scatter_inplace_composition(want, inp["y"], inp["idx"], inp["count"])
    return want


def _scatter_baselines(inp, impls):
    out, y, idx, count = inp["x"].clone(), inp["y"], inp["idx"], inp["count"]
    return [("sel+add+relu+index_copy_", lambda: scatter_outofplace_composition(out, y, idx, count)),
            ("sel+add_+relu_+index_copy_", lambda: scatter_inplace_composition(out, y, idx, count))]


def _downsample_cases(device, quick):
    # BlockDrop's CIFAR shortcut: channels double at stage boundaries
    return [(s, "nchw", None) for s in CIFAR[:2]] + [(s, "cl", None) for s in CIFAR[:2]]


def _downsample_inputs(shape, layout, frac, device, gen):
    return dict(x=_randn(shape, layout, device, gen), out_channels=2 * shape[1])


def _pool_cases(frac):
    # SkipNet's recurrent gate: the pooling ops at CIFAR shapes, channels_last
    return lambda device, quick: [(s, "cl", frac) for s in CIFAR]


def _relu_pool_inputs(shape, layout, frac, device, gen):
    x = _randn(shape, layout, device, gen)
    return dict(x=x, pooled=x.new_zeros(shape[:2]))


def _relu_pool_baselines(inp, impls):
    x = inp["x"].clone()
    return [("relu_+mean", lambda: x.relu_().mean(dim=(2, 3)))]


def _scatter_pool_inputs(shape, layout, frac, device, gen):
    inp = _scatter_inputs(shape, layout, frac, device, gen)
    inp["pooled"] = inp["x"].new_zeros(shape[:2])
    return inp


def _scatter_pool_expected(inp):
    want = _scatter_expected(inp)
    return want, want.mean(dim=(2, 3))


def _scatter_pool_same(got, want, inp):
    rows = inp["rows"]
    return torch.equal(got[0], want[0]) and _mean_close(got[1][rows], want[1][rows])


def _scatter_pool_baselines(inp, impls):
    """The scatter the fused op replaces (the native one when it is timed) plus the mean."""
    out, y, idx, count = inp["x"].clone(), inp["y"], inp["idx"], inp["count"]
    scatter = impls.get("native", next(iter(impls.values()))).scatter_residual_relu_
    return [("scatter_relu_+mean", lambda: (scatter(out, y, idx, count), out.mean(dim=(2, 3))))]


GATE_HIDDEN, GATE_EMBED = 10, 10  # SkipNet's recurrent gate
GATE_ARGS = ("pooled", "embed_w", "embed_b", "w_ih", "w_hh", "b_ih", "b_hh", "proj_w", "proj_b", "hx", "cx")


def _gate_inputs(shape, layout, frac, device, gen):
    (n, c), h, e = shape, GATE_HIDDEN, GATE_EMBED
    shapes = [(n, c), (c, e), (e,), (4 * h, e), (4 * h, h), (4 * h,), (4 * h,), (h, 1), (1,), (n, h), (n, h)]
    return {k: torch.randn(s, generator=gen).to(device) for k, s in zip(GATE_ARGS, shapes)}


def gate_composition(pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b, hx, cx):
    """SkipNet's gate step as ATen ops: addmm, lstm_cell, addmm, sigmoid."""
    e = torch.addmm(embed_b, pooled, embed_w)
    hx, cx = torch.lstm_cell(e, (hx, cx), w_ih, w_hh, b_ih, b_hh)
    return torch.sigmoid(torch.addmm(proj_b, hx, proj_w)).reshape(-1), hx, cx


def _gate_args(inp):
    return [inp[k] for k in GATE_ARGS]


OPS = [
    OpBench("partition", _partition_cases, _partition_inputs, _returns("partition", "mask"),
            lambda inp, impls: [("nonzero+cat", lambda: partition_composition(inp["mask"]))],
            lambda inp: partition_composition(inp["mask"]),
            lambda got, want, inp: torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])),
    OpBench("gather_rows", _rows_cases, _rows_inputs, _returns("gather_rows", "x", "idx", "count"),
            lambda inp, impls: [("index_select(nhwc view)" if _is_cl(inp["x"]) else "index_select",
                                 lambda: gather_composition(inp["x"], inp["rows"]))],
            lambda inp: gather_composition(inp["x"], inp["rows"]),
            lambda got, want, inp: torch.equal(got, want)),
    OpBench("scatter_relu_", _rows_cases, _scatter_inputs,
            _updates("scatter_residual_relu_", ("out", "y", "idx", "count"), ("out",)),
            _scatter_baselines, _scatter_expected,
            lambda got, want, inp: torch.equal(got[0], want)),
    OpBench("downsample_b", _downsample_cases, _downsample_inputs,
            _returns("downsample_b", "x", "out_channels"),
            lambda inp, impls: [("avg_pool2d+cat",
                                 lambda: downsample_composition(inp["x"], inp["out_channels"]))],
            lambda inp: downsample_composition(inp["x"], inp["out_channels"]),
            lambda got, want, inp: torch.equal(got, want)),
    OpBench("relu_pool_", _pool_cases(None), _relu_pool_inputs,
            _updates("relu_pool_", ("x", "pooled"), ("x", "pooled")),
            _relu_pool_baselines,
            lambda inp: (torch.relu(inp["x"]), torch.relu(inp["x"]).mean(dim=(2, 3))),
            lambda got, want, inp: torch.equal(got[0], want[0]) and _mean_close(got[1], want[1])),
    OpBench("scatter_pool_", _pool_cases(0.5), _scatter_pool_inputs,
            _updates("scatter_residual_relu_pool_", ("out", "y", "idx", "count", "pooled"),
                     ("out", "pooled")),
            _scatter_pool_baselines, _scatter_pool_expected, _scatter_pool_same),
    OpBench("gate_step", lambda device, quick: [((64, c), "-", None) for c in (16, 32, 64)], _gate_inputs,
            _returns("recurrent_gate_step", *GATE_ARGS),
            lambda inp, impls: [("addmm+lstm_cell+addmm", lambda: gate_composition(*_gate_args(inp)))],
            lambda inp: gate_composition(*_gate_args(inp)),
            lambda got, want, inp: all(_mean_close(a, w) for a, w in zip(got, want))),
]


def run_ops(args, device: torch.device, backends: list[str], threads: int) -> tuple[list[dict], bool]:
    gen = torch.Generator().manual_seed(0)
    impls = {b: get_backend(b, device) for b in backends}
    interp = device.type == "cpu" and interpreter_on()
    results: list[dict] = []
    all_ok = True

    def checked(bench, run, result, want, inp):
        """(run, None) if the backend's result is the baseline's, else (None, the error)."""
        try:
            ok = bench.same(result(), want, inp)
        except Exception as exc:  # a backend that cannot run this case: report, go on
            return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if not ok:
            return None, "result differs from the baseline"
        return run, None

    def timed(base_fns, backend_fns):
        """Times [*base_fns, *backend_fns] interleaved; backend_fns[b] None = failed check."""
        fns = list(base_fns) + [f for f in backend_fns.values() if f is not None]
        pos = {}
        k = len(base_fns)
        for b, f in backend_fns.items():
            if f is not None:
                pos[b] = k
                k += 1
        once_idx = frozenset(pos[b] for b in pos if b == "triton" and interp)
        ts = compare_us(fns, args.min_run_time, threads, args.rounds, once=once_idx)
        return ts[:len(base_fns)], {b: ts[pos[b]] if b in pos else None for b in backend_fns}

    def record(op, shape, layout, frac, base_name, base_us, times: dict, errors: dict):
        nonlocal all_ok
        cells = []
        for b in backends:
            t = times.get(b)
            row = dict(section="ops", device=device.type, op=op, shape=fmt_shape(shape),
                       layout=layout, active=frac, dtype="float32", baseline=base_name,
                       baseline_us=base_us, backend=b, backend_us=t,
                       ratio=None if t is None else base_us / t, ok=b not in errors,
                       timing="interpreter" if (b == "triton" and interp) else "blocked_autorange")
            if b in errors:
                row["error"] = errors[b]
                all_ok = False
                cells.append(f"{'FAILED':>10} {'':>7}")
            else:
                cells.append(f"{t:>10.1f} {base_us / t:>6.2f}x")
            if b == "native" and t is not None:
                row["native_us"] = t  # the field name of the earlier single-backend JSON
            results.append(row)
        print(f"{op:<13} {fmt_shape(shape):<16} {layout:<5} {'' if frac is None else frac:>6} "
              f"{base_name:<26} {base_us:>10.1f} " + " ".join(cells), flush=True)
        for b, e in errors.items():
            print(f"    {b}: {e}", flush=True)

    print(f"{'op':<13} {'shape':<16} {'fmt':<5} {'active':>6} {'baseline':<26} {'base [us]':>10} "
          + " ".join(f"{b + ' [us]':>10} {'ratio':>7}" for b in backends))
    print("-" * (80 + 19 * len(backends)))
    for bench in OPS:
        for shape, layout, frac in bench.cases(device, args.quick):
            inp = bench.inputs(shape, layout, frac, device, gen)
            want = bench.expected(inp)
            fns, errs = {}, {}
            for b in backends:
                run, result = bench.dynexec(impls[b], inp)
                fns[b], err = checked(bench, run, result, want, inp)
                if err:
                    errs[b] = err
            del want
            names, base_fns = zip(*bench.baselines(inp, impls))
            base_ts, times = timed(base_fns, fns)
            k = min(range(len(base_ts)), key=base_ts.__getitem__)  # the fastest (the first on a tie)
            record(bench.op, shape, layout, frac, names[k], base_ts[k], times, errs)
    return results, all_ok


# ---- section "fused" --------------------------------------------------------------------
def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _folded_conv(case: ConvCase, gen: torch.Generator, ic) -> tuple[torch.Tensor, torch.Tensor]:
    """He-initialised conv weight with a random eval-mode BatchNorm folded in (fp32, CPU)."""
    fan_in = case.cin * case.kernel * case.kernel
    w = torch.randn(case.cout, case.cin, case.kernel, case.kernel, generator=gen) * math.sqrt(2.0 / fan_in)
    bn = torch.nn.BatchNorm2d(case.cout).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(case.cout, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(case.cout, generator=gen) * 0.2)
        bn.running_mean.copy_(torch.randn(case.cout, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(case.cout, generator=gen) + 0.5)
    return ic.fold_bn(w, None, bn)


def build_fused_case(case: ConvCase, frac: float, dtype: torch.dtype, tf32: bool,
                     device: torch.device, gen: torch.Generator, ic):
    """(baseline fn, fused fn, fn returning (fused result, baseline result) for the
    check, count). Both fns do the same work on the same tensors' copies."""
    n, k, s, pad = case.batch, case.kernel, case.stride, (case.kernel - 1) // 2
    ho = case.out_size
    count = count_for(frac, n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:count]] = True
    idx, count_t = ref.partition(mask.to(device))
    rows = idx[:count]
    wf, bf = _folded_conv(case, gen, ic)
    w_pack = ic.pack_weight(wf, dtype).to(device)
    bias32 = bf.to(device)
    w_conv = _nhwc(wf.to(dtype).to(device))
    b_conv = bf.to(dtype).to(device)
    # Activations are post-ReLU in a ResNet: non-negative inputs.
    x = _nhwc(torch.randn(n, case.cin, case.size, case.size, generator=gen).relu_().to(dtype).to(device))
    kw = dict(kernel_size=k, stride=s, idx=idx, count=count_t, relu=True, allow_tf32=tf32)

    if case.role in ("first", "mid"):
        gather = case.role == "first"
        out_f = _nhwc(torch.zeros(n, case.cout, ho, ho, dtype=dtype, device=device))

        def base():
            xs = gather_composition(x, rows) if gather else x[:count]
            return F.conv2d(xs, w_conv, b_conv, stride=s, padding=pad).relu_()

        def fused():
            return ic.indexed_conv2d(x, w_pack, bias32, gather=gather, out=out_f, **kw)

        def check():
            return fused()[:count], base()
        return base, fused, check, count

    assert case.role == "last" and s == 1, case
    res = _nhwc(torch.randn(n, case.cout, ho, ho, generator=gen).relu_().to(dtype).to(device))
    out_b, out_f = res.clone(), res.clone()

    def base():
        y = F.conv2d(x[:count], w_conv, b_conv, stride=s, padding=pad)
        y.add_(gather_composition(res, rows)).relu_()
        scatter_composition(out_b, rows, y)
        return out_b

    def fused():
        return ic.indexed_conv2d(x, w_pack, bias32, gather=False, residual=res,
                                 residual_gather=True, out=out_f, scatter=True, **kw)

    def check():
        return fused(), base()
    return base, fused, check, count


def run_fused(args, device: torch.device, threads: int, smoke: bool) -> tuple[list[dict], bool]:
    from dynexec.kernels import indexed_conv as ic
    interp = device.type == "cpu"
    if not ic.HAS_TRITON:
        print("fused section skipped: triton is not installed")
        return [], True
    if interp and not ic.INTERPRET:
        print("fused section skipped: dynexec.kernels.indexed_conv was imported without "
              "TRITON_INTERPRET=1")
        return [], True
    cases = fused_cases(quick=args.quick, smoke=smoke)
    gen = torch.Generator().manual_seed(1)
    results, all_ok = [], True
    old_tf32 = torch.backends.cudnn.allow_tf32
    base_name = {"first": "gather+conv+relu", "mid": "conv+relu",
                 "last": "conv+sel+add+relu+index_copy_"}
    tag = f" [{INTERPRETER_NOTE}]" if interp else ""
    base_col = "torch [us]" if interp else "cuDNN [us]"
    print(f"{'case':<44} {'active':>10} {'dtype':<5} {'baseline':<30} {base_col:>11} "
          f"{'fused [us]':>11} {'ratio':>7} {'max err':>9}{tag}")
    print("-" * 136)
    try:
        for case in cases:
            for dtype, tf32 in fused_dtypes(device):
                torch.backends.cudnn.allow_tf32 = tf32
                for frac in FUSED_FRACTIONS:
                    base, fused, check, count = build_fused_case(case, frac, dtype, tf32, device, gen, ic)
                    tol = tolerance(dtype, tf32)
                    row = dict(section="fused_conv", device=device.type,
                               op=f"conv{case.kernel}x{case.kernel}", **asdict(case),
                               out_size=case.out_size, layout="nhwc", active=frac,
                               count=count, dtype=dtype_name(dtype, tf32), baseline=base_name[case.role],
                               backend="triton", tol=tol,
                               timing="interpreter" if interp else "blocked_autorange")
                    active = f"{frac} ({count})"
                    try:
                        got, want = check()
                        ok, err = close(got, want, tol)
                    except Exception as exc:
                        ok, err = False, None
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    row.update(ok=ok, max_err=err if err is not None and math.isfinite(err) else None)
                    if not ok:
                        all_ok = False
                        row.update(baseline_us=None, backend_us=None, ratio=None)
                        print(f"{case.label():<44} {active:>10} {dtype_name(dtype, tf32):<5} "
                              f"{base_name[case.role]:<30} MISMATCH max err {err} (tol {tol})"
                              f" {row.get('error', '')}", flush=True)
                        results.append(row)
                        continue
                    if interp:
                        tb, tf = once_us(base), once_us(fused)
                    else:
                        tb, tf = compare_us([base, fused], args.min_run_time, threads, args.rounds)
                    row.update(baseline_us=tb, backend_us=tf, ratio=tb / tf)
                    results.append(row)
                    print(f"{case.label():<44} {active:>10} {dtype_name(dtype, tf32):<5} "
                          f"{base_name[case.role]:<30} {tb:>11.1f} {tf:>11.1f} {tb / tf:>6.2f}x "
                          f"{err:>9.2g}", flush=True)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    if interp:
        print(f"(fused section on CPU: Triton {INTERPRETER_NOTE}; it only exercises the code path)")
    return results, all_ok


WINOGRAD_GEOMETRIES = ((16, 32), (32, 16), (64, 8))  # (channels, image size) of CIFAR ResNets


def winograd_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(channels, size, batch) of the winograd section."""
    batches = (1, 16) if quick else (1, 4, 16, 32)
    return [(c, size, n) for c, size in WINOGRAD_GEOMETRIES for n in batches]


def run_winograd(args, threads: int) -> tuple[list[dict], bool]:
    from dynexec.runtime.program import winograd_available
    if not winograd_available():
        print("winograd section skipped: needs dynexec._C with oneDNN and a CPU with AVX2 + FMA")
        return [], True
    gen = torch.Generator().manual_seed(2)
    results, all_ok = [], True
    print(f"{'conv3x3':<22} {'batch':>5} {'oneDNN [us]':>12} {'Winograd [us]':>14} {'ratio':>7} "
          f"{'max err':>9}")
    print("-" * 74)
    for c, size, n in winograd_cases(args.quick):
        w = torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5
        b = torch.randn(c, generator=gen) * 0.1
        chains = []
        for winograd in (False, True):
            chain = torch.classes.dynexec.OneDnnChain([w], [b], [1], [1], False)
            if winograd and chain.enable_winograd() != 1:
                raise RuntimeError(f"conv3x3 {c}->{c}: the Winograd kernel did not take it")
            chains.append(chain)
        x = torch.randn(n, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        want = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        err = max((ch.forward(x).double() - want).abs().max().item() for ch in chains)
        ok = err <= 1e-4
        label = f"{c}->{c} at {size}x{size}"
        row = dict(section="winograd", device="cpu", op="conv3x3", channels=c, size=size, batch=n,
                   layout="nhwc", active=1.0, dtype="fp32", timing="blocked_autorange",
                   baseline="onednn", backend="winograd", ok=ok, max_err=err)
        if not ok:
            all_ok = False
            row.update(baseline_us=None, backend_us=None, ratio=None)
            print(f"{label:<22} {n:>5} MISMATCH max err {err:.3g}", flush=True)
        else:
            tb, tw = compare_us([lambda: chains[0].forward(x), lambda: chains[1].forward(x)],
                                args.min_run_time, threads, args.rounds)
            row.update(baseline_us=tb, backend_us=tw, ratio=tb / tw)
            print(f"{label:<22} {n:>5} {tb:>12.1f} {tw:>14.1f} {tb / tw:>6.2f}x {err:>9.2g}", flush=True)
        results.append(row)
    return results, all_ok


# ---- main -------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved measurement rounds, best median kept (default 2 quick, 3 full)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per-measurement statistic: blocked_autorange median (default) or the "
                        "fastest block (more robust on a machine shared with other jobs)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default: torch.get_num_threads())")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of native,triton,torch for the ops section "
                        "(default: every one available on the device)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of ops,fused,winograd "
                        "(default: all; with --fused-smoke: fused)")
    p.add_argument("--fused-smoke", action="store_true",
                   help="fused section with tiny shapes (on CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="blocked_autorange min_run_time in seconds (default 0.1 quick, 0.2 full)")
    args = p.parse_args(argv)
    global STAT
    STAT = args.stat
    device = resolve_device(args.device)
    sections = (args.sections or ("fused" if args.fused_smoke else "ops,fused,winograd")).split(",")
    sections = [s.strip() for s in sections if s.strip()]
    for s in sections:
        if s not in ("ops", "fused", "winograd"):
            p.error(f"--sections: unknown section {s!r}; expected some of ops, fused, winograd")
    if args.fused_smoke and device.type == "cpu" and not interpreter_on():
        print("--fused-smoke on CPU needs TRITON_INTERPRET=1 in the environment (set before "
              "Python starts)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 0.2

    backends, notes = (select_backends(args.backends, device, args.quick)
                       if "ops" in sections else ([], []))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    where = gpu if gpu else f"{threads} threads, {platform.processor() or platform.machine()}"
    print(f"torch {torch.__version__}, triton {triton_version}, device {device.type} ({where}), "
          f"best of {args.rounds} interleaved rounds of blocked_autorange {STAT}s"
          f"{' (quick)' if args.quick else ''}; load average {load}"
          f"{'; TRITON_INTERPRET=1' if interpreter_on() else ''}")

    results, ok = [], True
    if "ops" in sections:
        print(f"\n== ops: backends {', '.join(backends) or '(none)'} vs the PyTorch baseline "
              f"(ratio = baseline / backend)")
        for note in notes:
            print(f"   {note}")
        if device.type == "cpu" and "triton" in backends:
            print(f"   triton on CPU: one call per measurement ({INTERPRETER_NOTE})")
        if backends:
            rows, ok_ops = run_ops(args, device, backends, threads)
            results += rows
            ok &= ok_ops
    fused_ran = False
    if "fused" in sections:
        title = "\n== fused indexed conv vs cuDNN on the same compacted work (NHWC)"
        if device.type == "cpu":
            if not interpreter_on():
                msg = ("skipped: CUDA only; on CPU run `TRITON_INTERPRET=1 python "
                       "benchmarks/kernels.py --device cpu --fused-smoke` for a smoke test")
                print(f"{title}: {msg}")
            else:
                print(f"{title}: tiny shapes on CPU, {INTERPRETER_NOTE}")
                rows, ok_f = run_fused(args, device, threads, smoke=True)
                results += rows
                ok &= ok_f
                fused_ran = True
        else:
            print(f"{title}{' (smoke shapes)' if args.fused_smoke else ''}; fp32 = TF32")
            rows, ok_f = run_fused(args, device, threads, smoke=args.fused_smoke)
            results += rows
            ok &= ok_f
            fused_ran = True
    if "winograd" in sections:
        print("\n== Winograd F(2x2, 3x3) vs oneDNN's direct convolution "
              "(CPU, NHWC; ratio = oneDNN / Winograd)")
        if device.type != "cpu":
            print("skipped: a CPU kernel (run with --device cpu)")
        else:
            rows, ok_w = run_winograd(args, threads)
            results += rows
            ok &= ok_w
    if not ok:
        print("\nSOME RESULTS DIFFER FROM THE BASELINE (see FAILED / MISMATCH above)", file=sys.stderr)

    if args.json:
        meta = dict(torch=torch.__version__, triton=triton_version, device=device.type, gpu=gpu,
                    cuda=torch.version.cuda if device.type == "cuda" else None,
                    cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                    threads=torch.get_num_threads(), quick=args.quick, rounds=args.rounds,
                    stat=args.stat, min_run_time=args.min_run_time, backends=backends,
                    sections=sections, fused_ran=fused_ran, fused_smoke=args.fused_smoke,
                    interpreter=interpreter_on(), all_ok=ok, results=results)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
