"""The ``triton-graph`` backend: a sync-free routed forward, captured in one CUDA graph.

What it does
------------
``GraphEngine`` runs the same function as :class:`dynexec.runtime.engine.Engine` (and as the
official masked models), but without a single device->host synchronisation between the
input and the logits. Per forward::

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
Unlike ``Engine``, a ``GraphEngine`` owns per-call scratch: per (batch size, dtype,
device) it preallocates compact workspaces sized for the full batch, the projection
shortcut outputs, ``arange(N)`` / ``N`` index tensors and (on CUDA) the graph with its
static buffers; they are reused by every call. Calls on one engine are therefore
serialised by a lock (held until the outputs are cloned / enqueued). On CUDA all work is
enqueued on the caller's current stream; when a call comes from a different stream than
the previous one, the new stream first waits for the old one (``wait_stream``: a
device-side dependency, not a host sync), so workspaces are never used concurrently.
For parallel inference use one engine per thread/stream.

What was verified here (no GPU available)
-----------------------------------------
``tests/test_graph_engine.py`` runs this engine with ``capture=False`` on CPU under the
Triton interpreter: routing identical to and logits within 1e-4 (relative, fp32) of the
eager official model (SkipNet CIFAR recurrent and feed-forward gates, BlockDrop CIFAR
with DownsampleB, a bottleneck SkipNet with projection shortcuts) for mixed, all-on,
all-off and forced routings; no ``item`` / ``bool`` / ``int`` / ``float`` / ``tolist`` /
``nonzero`` on a tensor anywhere in the forward; and the same launch sequence (this
module's launch log, and the aten op sequence) for different routings; the graph
runner's plumbing (one capture per key, warm-up first, static input / forced-routing
copies, cloned outputs) with stand-ins for ``torch.cuda``'s stream and graph API; and
concurrent calls from two threads. The whole file takes about 1-1.5 minutes on 2 busy
cores.
NOT verified: CUDA-graph capture and replay themselves (the ``_GraphRunner`` path), the
performance on a GPU, and whether the model's gate code (e.g. cuDNN LSTM) captures
cleanly -- none of that can run without a CUDA device.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .engine import check_routing
from ..models.common import RoutedModel
from .program import Program, lower

__all__ = ["GraphEngine", "make_graph_engine", "graph_backend_status"]

CL = torch.channels_last
_NEEDS_DEVICE = "triton-graph needs a CUDA device (or TRITON_INTERPRET=1 for tests)"


# --------------------------------------------------------------------------------------
# Kernel modules (imported lazily: dynexec must import without triton)
# --------------------------------------------------------------------------------------
def _kernel_modules():
    """(indexed_conv, regroup) modules. Attributes are looked up at call time, so an
    ``importlib.reload`` of either module (tests switching to the interpreter) is
    followed automatically."""
    from ..kernels import indexed_conv, regroup  # noqa: WPS433 - optional dependency
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
class _Block:
    convs: tuple[_Conv, ...]      # branch: 2 (basic) or 3 (bottleneck); the last has no ReLU
    shortcut_kind: str            # 'identity' | 'projection' | 'downsample_b'
    shortcut_conv: Optional[_Conv]
    shortcut_module: Optional[nn.Module]   # unfoldable projection: run with torch
    out_channels: int


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, ic) -> _Conv:
    kh, kw = conv.kernel_size
    if conv.groups != 1 or conv.dilation != (1, 1) or kh != kw \
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] \
            or conv.padding_mode != "zeros":
        raise TypeError(f"triton-graph: cannot run {conv}: only square, ungrouped, undilated, "
                        f"zero-padded convolutions are supported")
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
        raise TypeError(f"triton-graph: expected an eval-mode BatchNorm2d after {conv}, got {bn}")
    w = conv.weight.detach().to(torch.float64)
    scale = bn.running_var.detach().to(torch.float64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    b = (bias - bn.running_mean.detach().to(torch.float64)) * scale
    if bn.bias is not None:
        b = b + bn.bias.detach().to(torch.float64)
    w = w * scale.view(-1, 1, 1, 1)
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return _Conv(weight=ic.pack_weight(w, dtype=dtype), bias=b.to(bias_dtype).contiguous(),
                 kernel_size=kh, stride=conv.stride[0], padding=conv.padding[0],
                 cin=conv.in_channels, cout=conv.out_channels)


def _branch_pairs(branch: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    block = getattr(branch, "block", branch)  # SkipNet branches are adapters over a block
    if all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")):
        return [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    if all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2")):
        return [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    raise TypeError(f"triton-graph: unsupported residual branch {type(block).__name__} "
                    f"(expected a BasicBlock or Bottleneck)")


def _lower_blocks(model: RoutedModel, dtype: torch.dtype, ic) -> tuple[_Block, ...]:
    blocks = []
    for view in model.block_views():
        convs = tuple(_fold(c, b, dtype, ic) for c, b in _branch_pairs(view.branch))
        sc_conv, sc_module = None, None
        if view.shortcut_kind == "projection":
            sc = view.shortcut
            if isinstance(sc, nn.Sequential) and len(sc) == 2 and isinstance(sc[0], nn.Conv2d) \
                    and isinstance(sc[1], nn.BatchNorm2d):
                sc_conv = _fold(sc[0], sc[1], dtype, ic)
            else:
                sc_module = sc
        elif view.shortcut_kind == "downsample_b":
            pool = getattr(getattr(view.shortcut, "avg", None), "kernel_size", None)
            if pool not in (2, (2, 2)):
                raise TypeError(f"triton-graph: DownsampleB with a {pool} pool is not supported "
                                f"(the kernel pools 2x2)")
        elif view.shortcut_kind != "identity":
            raise TypeError(f"triton-graph: unknown shortcut kind {view.shortcut_kind!r}")
        if convs[-1].cout != view.out_channels:
            raise ValueError(f"triton-graph: branch outputs {convs[-1].cout} channels, the block "
                             f"{view.out_channels}")
        blocks.append(_Block(convs, view.shortcut_kind, sc_conv, sc_module, view.out_channels))
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

    def __init__(self, blocks: tuple[_Block, ...], stem_shape: tuple[int, int, int], n: int,
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

    def __init__(self, engine: "GraphEngine", x: torch.Tensor, forced: Optional[torch.Tensor],
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
# The engine
# --------------------------------------------------------------------------------------
class GraphEngine:
    """A compiled model on the ``triton-graph`` backend. Same call API as
    :class:`dynexec.runtime.engine.Engine`: ``engine(x)`` -> logits; ``engine(x,
    return_routing=True)`` -> (logits, routing[N, K] bool); ``engine(x, routing=r)`` runs
    a given routing instead of the model's router. Build it with
    :func:`make_graph_engine`. See the module docstring for the design."""

    backend_name = "triton-graph"

    def __init__(self, program: Program, capture: bool = True, warmup: int = 2):
        ic, rg = _kernel_modules()
        self._ic, self._rg = ic, rg
        self.program = program
        self.model = program.model
        self._param = next(self.model.parameters())
        self.device = self._param.device
        self.dtype = self._param.dtype
        self.capture = bool(capture) and self.device.type == "cuda"
        self.warmup = warmup
        self._blocks = _lower_blocks(self.model, self.dtype, ic)
        self._stem_shape: Optional[tuple[int, int, int]] = None
        self._workspaces: dict[tuple, _Workspace] = {}
        self._graphs: dict[tuple, _GraphRunner] = {}
        self._lock = threading.RLock()
        self._launch_log: Optional[list] = None

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def __repr__(self) -> str:
        return (f"GraphEngine(model={self.model.model_name}, blocks={self.num_blocks}, "
                f"router={self.program.router}, backend={self.backend_name}, "
                f"capture={self.capture})")

    # ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, return_routing: bool = False,
                 routing: Optional[torch.Tensor] = None):
        self.model.check_input(x)
        if routing is not None:
            routing = self._check_routing(routing, x.shape[0], x.device)
        with torch.inference_mode(), self._lock:
            if x.shape[0] == 0:
                logits, used = self.model._empty_result(x)
            elif self.capture:
                logits, used = self._replay(x, routing)
            else:
                self._order_streams(self._workspace(x.shape[0]))
                logits, used = self._forward(x, routing)
        return (logits, used) if return_routing else logits

    def _check_routing(self, routing: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        return check_routing(routing, n, self.num_blocks, device)

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
        state = prog.gate_runner.init_state(n, h) if online else None
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
                p, state = prog.gate_runner.step(k, h, state)
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

    def _run_block(self, k: int, blk: _Block, h: torch.Tensor, idx: torch.Tensor,
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


def make_graph_engine(model: torch.nn.Module, capture: bool = True, *, fold_bn: bool = True,
                      warmup: int = 2) -> GraphEngine:
    """Compile an eval-mode dynexec model for the ``triton-graph`` backend.

    ``capture``: on CUDA, capture the forward in one CUDA graph per (batch size, dtype)
    and replay it (default); False runs the same sync-free launch sequence eagerly. On
    CPU (Triton interpreter only) the forward always runs eagerly. ``warmup``: eager
    iterations on a side stream before each capture. The engine snapshots the weights
    (BatchNorm is folded): compile again after changing the model. Raises RuntimeError
    when the backend cannot run on the model's device. ``fold_bn`` exists for parity
    with ``dynexec.compile``: the fused kernels need folded BatchNorm, so False is a
    ValueError.
    """
    if not fold_bn:
        raise ValueError("the triton-graph backend always folds BatchNorm into the fused "
                         "convolutions; fold_bn=False is not supported")
    program = lower(model, fold_bn=False)  # structure only; BN is folded here, kept in fp32
    device = next(model.parameters()).device
    ok, reason = graph_backend_status(device)
    if not ok:
        raise RuntimeError(f"{reason} (the model is on {device})")
    return GraphEngine(program, capture=capture, warmup=warmup)
