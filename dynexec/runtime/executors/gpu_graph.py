"""The gpu-graph executor (backend ``triton-graph``): a sync-free routed forward, captured
in one CUDA graph.

What it does
------------
``GraphExecutor`` runs the same function as the other executors (and as the official
masked models), but without a single device->host synchronisation between the input and
the logits. Per forward::

    h = stem(x)                                   # plain torch ops, then channels_last
    for every block k:
        mask  = routing[:, k]                     # planned: policy column; online: the
                                                  # previous gate's decision (full batch)
        idx, count = partition(mask)              # Triton; count stays a device tensor
        out = h                      (identity)   # updated in place
            | downsample_b(h)        (DownsampleB, Triton)
            | conv1x1_bn(h)          (projection, full batch, same conv kernel)
        ws1 = conv1(h[idx])  + b1, ReLU           # gather fused into the operand load,
        (ws2 = conv2(ws1)    + b2, ReLU)          # Bottleneck only; compact -> compact
        out[idx] = relu(conv_last(ws) + b + out[idx])   # residual + ReLU + scatter fused
        h = out
        (online) p, state = gate_k(h, state); routing[:, k+1] = decide(p)
    logits = head(h)

All convolutions are :func:`dynexec.kernels.indexed_conv.indexed_conv2d` launches with
BatchNorm folded into weight and bias (float64 arithmetic, bias kept in float32 or
float64). Every launch is sized for the FULL batch; the kernels read ``count`` on the
device and their surplus programs exit at once. Skipped samples of an identity block are
never touched; skipped samples of a projection / DownsampleB block keep the shortcut
value (no ReLU), executed ones get ``relu(branch + shortcut)``. Gates (SkipNet LSTM and
feed-forward gates), the BlockDrop policy, the stem and the head are the model's own
torch code on the full batch. Nothing in the forward branches on a device value, so the
launch sequence is the same for every routing -- which is what makes it capturable.

CUDA graphs
-----------
On CUDA (``capture=True``, the default) the whole forward -- stem, router, every block,
head -- is captured once per (batch size, dtype, forced-routing or not) into a
``torch.cuda.CUDAGraph`` with static input / output buffers, after warm-up iterations on
a side stream (which also JIT-compile every Triton kernel) as the PyTorch CUDA-graph
docs prescribe. A call copies the input (and a forced routing) into the static buffers,
replays the graph and returns clones of the static outputs. ``capture=False`` runs the
identical sync-free launch sequence eagerly; on CPU (only possible under the Triton
interpreter, ``TRITON_INTERPRET=1``) capture is never attempted.

State and threads
-----------------
Unlike the other executors, a ``GraphExecutor`` owns per-call scratch: per (batch size, dtype,
device) it preallocates compact workspaces sized for the full batch, the projection
shortcut outputs, ``arange(N)`` / ``N`` index tensors and (on CUDA) the graph with its
static buffers; they are reused by every call. Calls on one executor are therefore
serialised by a lock (held until the outputs are cloned / enqueued). On CUDA all work is
enqueued on the caller's current stream; when a call comes from a different stream than
the previous one, the new stream first waits for the old one (``wait_stream``: a
device-side dependency, not a host sync), so workspaces are never used concurrently.
For parallel inference compile one engine per thread/stream.

Tests
-----
``tests/test_graph_engine.py`` runs this executor eagerly on CPU under the Triton
interpreter: routing identical to, and logits within 1e-4 (relative, fp32) of, the eager
official model (SkipNet recurrent and feed-forward gates, BlockDrop with DownsampleB, a
bottleneck SkipNet with projection shortcuts) for mixed, all-on, all-off and forced
routings; no ``item`` / ``bool`` / ``int`` / ``float`` / ``tolist`` / ``nonzero`` on a
tensor anywhere in the forward; the same launch sequence for different routings; the
graph runner's plumbing with stand-ins for ``torch.cuda``'s stream and graph API; and
concurrent calls from two threads. CUDA-graph capture and replay themselves, and the
speed, need a CUDA device.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...models.common import RoutedModel
from ..folding import fold_batchnorm

__all__ = ["GraphExecutor", "pack_blocks", "graph_backend_status"]

CL = torch.channels_last
_NEEDS_DEVICE = "triton-graph needs a CUDA device (or TRITON_INTERPRET=1 for tests)"


# --------------------------------------------------------------------------------------
# Kernel modules (imported lazily: dynexec must import without triton)
# --------------------------------------------------------------------------------------
def _kernel_modules():
    """(indexed_conv, regroup) modules. Attributes are looked up at call time, so an
    ``importlib.reload`` of either module (tests switching to the interpreter) is
    followed automatically."""
    from ...kernels import indexed_conv, regroup  # noqa: WPS433 - optional dependency
    return indexed_conv, regroup


def graph_backend_status(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for the triton-graph backend on ``device``."""
    device = torch.device(device)
    try:
        ic, rg = _kernel_modules()
    except Exception as exc:  # triton missing or broken
        return False, f"Triton kernels cannot be imported: {type(exc).__name__}: {exc}"
    if not ic.HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        if ic.INTERPRET or rg.kernels_interpreted():
            return False, "the Triton kernels were created under TRITON_INTERPRET=1 (CPU only)"
        return True, "triton with a CUDA device"
    if device.type == "cpu" and ic.INTERPRET and rg.kernels_interpreted():
        return True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors, no CUDA graph"
    return False, _NEEDS_DEVICE


# --------------------------------------------------------------------------------------
# Lowering the program's blocks into kernel launches
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Conv:
    """A conv + folded eval-mode BN, packed for indexed_conv2d."""
    weight: torch.Tensor          # [K*K*Cin, Cout], activation dtype
    bias: torch.Tensor            # [Cout], float32 (float64 for float64 models)
    kernel_size: int
    stride: int
    padding: int
    cin: int
    cout: int

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        def size(s):
            return (s + 2 * self.padding - self.kernel_size) // self.stride + 1
        return size(h), size(w)


@dataclass(frozen=True)
class GraphBlock:
    convs: tuple[_Conv, ...]      # branch: 2 (basic) or 3 (bottleneck); the last has no ReLU
    shortcut_kind: str            # 'identity' | 'projection' | 'downsample_b'
    shortcut_conv: Optional[_Conv]
    shortcut_module: Optional[nn.Module]   # unfoldable projection: run with torch
    out_channels: int


def _pack(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, ic) -> _Conv:
    """conv -> eval-mode BN folded (float64), packed for indexed_conv2d: weights in the
    activation dtype, bias in float32 (float64 for float64 models)."""
    try:
        w, b = fold_batchnorm(conv, bn)
    except TypeError as exc:
        raise TypeError(f"triton-graph: {exc}") from None
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return _Conv(weight=ic.pack_weight(w, dtype=dtype), bias=b.to(bias_dtype).contiguous(),
                 kernel_size=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
                 cin=conv.in_channels, cout=conv.out_channels)


def _lower_blocks(model: RoutedModel, dtype: torch.dtype, ic) -> tuple[GraphBlock, ...]:
    blocks = []
    for view in model.block_views():
        if view.branch_layers is None:
            raise TypeError(f"triton-graph: unsupported residual branch {type(view.branch).__name__} "
                            f"(expected conv-BatchNorm layers, as BasicBlock and Bottleneck)")
        convs = tuple(_pack(c, b, dtype, ic) for c, b in view.branch_layers)
        sc_conv, sc_module = None, None
        if view.shortcut_kind == "projection":
            if view.shortcut_layers is not None and len(view.shortcut_layers) == 1:
                sc_conv = _pack(*view.shortcut_layers[0], dtype, ic)
            else:
                sc_module = view.shortcut
        if convs[-1].cout != view.out_channels:
            raise ValueError(f"triton-graph: branch outputs {convs[-1].cout} channels, the block "
                             f"{view.out_channels}")
        blocks.append(GraphBlock(convs, view.shortcut_kind, sc_conv, sc_module, view.out_channels))
    return tuple(blocks)


# --------------------------------------------------------------------------------------
# Per-(batch size, dtype, device) workspaces
# --------------------------------------------------------------------------------------
def _cl_view(flat: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """A channels_last [n, c, h, w] view of the front of a flat buffer."""
    return flat[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


class _Workspace:
    """Everything one forward of batch size n writes besides fresh torch-op outputs:
    compact branch workspaces (two flat buffers, ping-pong between the convs of a
    branch, sized for the largest layer and the FULL batch), one output buffer per
    folded projection shortcut, and the index/count tensors of full-batch launches."""

    def __init__(self, blocks: tuple[GraphBlock, ...], stem_shape: tuple[int, int, int], n: int,
                 dtype: torch.dtype, device: torch.device):
        self.n = n
        self.full_idx = torch.arange(n, dtype=torch.int64, device=device)
        self.full_count = torch.full((), n, dtype=torch.int64, device=device)
        self.scratch_shapes: list[list[tuple[int, int, int]]] = []   # per block, per inner conv
        self.proj_out: dict[int, torch.Tensor] = {}
        sizes = [0, 0]
        c, h, w = stem_shape
        for k, blk in enumerate(blocks):
            if blk.convs[0].cin != c:
                raise ValueError(f"triton-graph: block {k} expects {blk.convs[0].cin} input "
                                 f"channels, gets {c}")
            shapes, hh, ww = [], h, w
            for i, conv in enumerate(blk.convs):
                hh, ww = conv.out_hw(hh, ww)
                if i < len(blk.convs) - 1:
                    shapes.append((conv.cout, hh, ww))
                    sizes[i % 2] = max(sizes[i % 2], n * conv.cout * hh * ww)
            self.scratch_shapes.append(shapes)
            if blk.shortcut_conv is not None:
                sh, sw = blk.shortcut_conv.out_hw(h, w)
                if (sh, sw) != (hh, ww):
                    raise ValueError(f"triton-graph: block {k}: shortcut {sh}x{sw} != branch {hh}x{ww}")
                self.proj_out[k] = torch.empty((n, blk.out_channels, hh, ww), dtype=dtype,
                                               device=device, memory_format=CL)
            c, h, w = blk.out_channels, hh, ww
        self.scratch = [torch.empty(max(s, 1), dtype=dtype, device=device) for s in sizes]
        self.last_stream = None  # CUDA: the stream the previous call was enqueued on

    def scratch_view(self, block: int, i: int) -> torch.Tensor:
        c, h, w = self.scratch_shapes[block][i]
        return _cl_view(self.scratch[i % 2], self.n, c, h, w)


class _GraphRunner:
    """One captured forward (CUDA only): static input (+ forced routing) and outputs."""

    def __init__(self, engine: "GraphExecutor", x: torch.Tensor, forced: Optional[torch.Tensor],
                 warmup: int):
        self.static_x = torch.empty_like(x, memory_format=CL).copy_(x)
        self.static_forced = forced.clone() if forced is not None else None
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):  # JIT-compiles every Triton kernel, warms cuDNN
                engine._forward(self.static_x, self.static_forced)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits, self.static_routing = engine._forward(self.static_x,
                                                                      self.static_forced)

    def __call__(self, x: torch.Tensor, forced: Optional[torch.Tensor]):
        self.static_x.copy_(x)
        if forced is not None:
            self.static_forced.copy_(forced)
        self.graph.replay()
        return self.static_logits.clone(), self.static_routing.clone()


# --------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------
class GraphExecutor:
    """Runs a gpu-graph Program. ``capture``: on CUDA, capture the forward in one CUDA
    graph per (batch size, dtype, forced routing or not) and replay it (default); False
    runs the same sync-free launch sequence eagerly. On CPU (Triton interpreter only) the
    forward always runs eagerly. ``warmup``: eager iterations on a side stream before
    each capture. See the module docstring for the design."""

    def __init__(self, program, capture: bool = True, warmup: int = 2):
        ic, rg = _kernel_modules()
        self._ic, self._rg = ic, rg
        self.program = program
        self.model = program.model
        self._param = next(self.model.parameters())
        self.device = self._param.device
        self.dtype = self._param.dtype
        self.capture = bool(capture) and self.device.type == "cuda"
        self.warmup = warmup
        self._blocks = program.blocks
        self._stem_shape: Optional[tuple[int, int, int]] = None
        self._workspaces: dict[tuple, _Workspace] = {}
        self._graphs: dict[tuple, _GraphRunner] = {}
        self._lock = threading.RLock()
        self._launch_log: Optional[list] = None

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def run(self, x: torch.Tensor, routing: Optional[torch.Tensor]):
        with self._lock:
            if self.capture:
                return self._replay(x, routing)
            self._order_streams(self._workspace(x.shape[0]))
            return self._forward(x, routing)

    @contextlib.contextmanager
    def record_launches(self):
        """Record this engine's kernel launches (name + static arguments) into the yielded
        list. Used by the tests to check that every routing gives the same sequence."""
        with self._lock:
            log: list = []
            prev, self._launch_log = self._launch_log, log
            try:
                yield log
            finally:
                self._launch_log = prev

    # ----------------------------------------------------------------------------------
    def _workspace(self, n: int) -> _Workspace:
        key = (n, self.dtype, self.device)
        ws = self._workspaces.get(key)
        if ws is None:
            if self._stem_shape is None:
                size = self.model.input_size
                probe = torch.zeros((1, self.model.in_channels, size, size), dtype=self.dtype,
                                    device=self.device)
                self._stem_shape = tuple(self.program.stem(probe).shape[1:])
            ws = self._workspaces[key] = _Workspace(self._blocks, self._stem_shape, n,
                                                    self.dtype, self.device)
        return ws

    def _order_streams(self, ws: _Workspace) -> None:
        """CUDA: a call from another stream than the previous one waits (on the device)
        for the previous call, so the shared workspaces are never used concurrently."""
        if self.device.type != "cuda":
            return
        stream = torch.cuda.current_stream(self.device)
        if ws.last_stream is not None and ws.last_stream != stream:
            stream.wait_stream(ws.last_stream)
        ws.last_stream = stream

    def _replay(self, x: torch.Tensor, forced: Optional[torch.Tensor]):
        key = (x.shape[0], self.dtype, forced is not None)
        ws = self._workspace(x.shape[0])
        self._order_streams(ws)
        runner = self._graphs.get(key)
        if runner is None:
            runner = self._graphs[key] = _GraphRunner(self, x, forced, self.warmup)
        return runner(x, forced)

    def _log(self, *entry) -> None:
        if self._launch_log is not None:
            self._launch_log.append(entry)

    # ----------------------------------------------------------------------------------
    # The sync-free forward. Everything below only enqueues device work: no .item(),
    # no int()/bool() of a tensor, no nonzero, no branching on device values.
    # ----------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, forced: Optional[torch.Tensor]):
        prog, model = self.program, self.model
        n = x.shape[0]
        k_total = self.num_blocks
        ws = self._workspace(n)
        online = prog.router == "online" and forced is None
        if forced is not None:
            routing = forced.clone()
        elif prog.router == "planned":
            routing = model.decide(model.policy_probs(x))
            self._log("policy", n)
        else:  # online (filled in by the gates) or no router
            routing = torch.ones((n, k_total), dtype=torch.bool, device=x.device)

        h = prog.stem(x)
        if h.data_ptr() == x.data_ptr():  # metadata only: never update the caller's input
            h = h.clone(memory_format=CL)
        h = h.contiguous(memory_format=CL)
        self._log("stem", tuple(h.shape))
        state = prog.gates.init_state(n, h) if online else None
        for k, blk in enumerate(self._blocks):
            if forced is None and (prog.router == "none" or (online and k == 0)):
                # Statically known to run on the whole batch (no router decision).
                idx, count = ws.full_idx, ws.full_count
                self._log("full", k)
            else:
                idx, count = self._rg.partition(routing[:, k])
                self._log("partition", k, n)
            h = self._run_block(k, blk, h, idx, count, ws)
            if online and k + 1 < k_total:
                p, state = prog.gates.step(k, h, state)
                routing[:, k + 1] = model.decide(p)
                self._log("gate", k)
        logits = prog.head(h)
        self._log("head", tuple(logits.shape))
        return logits, routing

    def _conv(self, k: int, i: int, conv: _Conv, x: torch.Tensor, **kw) -> torch.Tensor:
        self._log("conv", k, i, tuple(x.shape), conv.kernel_size, conv.stride, conv.cout,
                  kw.get("gather"), kw.get("scatter", False), kw.get("residual") is not None,
                  kw.get("relu"))
        return self._ic.indexed_conv2d(x, conv.weight, conv.bias, kernel_size=conv.kernel_size,
                                       stride=conv.stride, padding=conv.padding, **kw)

    def _run_block(self, k: int, blk: GraphBlock, h: torch.Tensor, idx: torch.Tensor,
                   count: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        # 1. The shortcut for the full batch: the block output before the scatter.
        if blk.shortcut_kind == "identity":
            out = h                                     # updated in place
        elif blk.shortcut_kind == "downsample_b":
            out = self._rg.downsample_b(h, blk.out_channels)
            self._log("downsample_b", k, tuple(h.shape), blk.out_channels)
        elif blk.shortcut_conv is not None:
            out = self._conv(k, -1, blk.shortcut_conv, h, idx=None, count=ws.full_count,
                             gather=False, relu=False, out=ws.proj_out[k])
        else:
            out = blk.shortcut_module(h).contiguous(memory_format=CL)
            self._log("shortcut_module", k)
        # 2. The branch on the active rows: gather -> compact -> ... -> scatter.
        y = h
        last = len(blk.convs) - 1
        for i, conv in enumerate(blk.convs):
            if i < last:
                y = self._conv(k, i, conv, y, idx=idx, count=count, gather=(i == 0), relu=True,
                               out=ws.scratch_view(k, i))
            else:
                # relu(branch + shortcut) through idx, stored through idx; rows not in
                # idx[:count] keep the shortcut value (identity: never touched).
                self._conv(k, i, conv, y, idx=idx, count=count, gather=(last == 0), relu=True,
                           residual=out, residual_gather=True, out=out, scatter=True)
        return out


def pack_blocks(model: RoutedModel, device: torch.device, fold_bn: bool = True) -> tuple[GraphBlock, ...]:
    """The model's blocks for the gpu-graph executor: BatchNorm folded, weights packed for
    the fused indexed convolutions. Raises ValueError for fold_bn=False (the fused kernels
    need folded BatchNorm) and RuntimeError when the executor cannot run on ``device``."""
    if not fold_bn:
        raise ValueError("the triton-graph backend always folds BatchNorm into the fused "
                         "convolutions; fold_bn=False is not supported")
    ok, reason = graph_backend_status(device)
    if not ok:
        raise RuntimeError(f"{reason} (the model is on {device})")
    ic, _ = _kernel_modules()
    return _lower_blocks(model, next(model.parameters()).dtype, ic)
