"""Lowering a routed model into the Program its executor runs.

    stem(x) -> h
    for each block k: executed -> h = relu(branch_k(h) + shortcut_k(h))
                      skipped  -> h = shortcut_k(h)              (no ReLU)
    head(h) -> logits
    router: none | planned (a policy network on the input) | online (a gate after each block)

``lower(model, backend, ...)`` decides once which executor runs the model and builds what
that executor needs:

- ``cpu-loop`` (native backend, every branch a OneDnnChain: CPU float32 NHWC with the
  'winograd' or 'onednn' convolutions; no router, a policy network, or SkipNet's
  recurrent gate): the C++ loop ``torch.classes.dynexec.BlockLoop``, with the stem, the
  head and the policy in it when they can run there;
- ``gpu-graph`` (backend 'triton-graph'): blocks packed for the fused indexed
  convolutions, run without a host synchronisation and captured in CUDA graphs;
- ``python``: the portable loop over an op backend (torch, native or triton).

Nothing here knows which paper a model came from: the model supplies its stem, block
views (with the convolution/BatchNorm pairs to fold), head, router and decision rule
(``dynexec.models.common.RoutedModel``). With ``fold_bn`` the eval-mode BatchNorms are
folded into their convolutions (``dynexec.runtime.folding``), which changes results only
by float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..models.common import BlockView, RoutedModel
from .blocks import FusedProgramBlock, ProgramBlock
from .folding import FoldedHead, FoldedStem, fold_layers
from .ops import Backend, get_backend
from .routers import ModuleGates, RecurrentGates, lower_gates

EXECUTORS = ("auto", "python", "cpu-loop", "gpu-graph")

CONV_IMPLS = ("auto", "winograd", "onednn", "mkldnn", "aten")


def onednn_packing_available() -> bool:
    """oneDNN's fused convolution op (the one torch.compile's CPU backend uses) exists."""
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def onednn_direct_available() -> bool:
    """dynexec._C was built with its own oneDNN primitives (torch.classes.dynexec.OneDnnChain, BlockLoop)."""
    from .ops.extension import load
    module, _ = load()
    return module is not None and torch.ops.dynexec.onednn_version() > 0


def winograd_available() -> bool:
    """dynexec._C has oneDNN primitives and this CPU runs the Winograd kernel (AVX2, FMA)."""
    return onednn_direct_available() and torch.ops.dynexec.winograd_supported()


def resolve_conv_impl(requested: str) -> str:
    """The convolution implementation of CPU float32 NHWC programs:
    'winograd' - 'onednn', with the 3x3 stride-1 convolutions (channels multiples of 8
               in, 16 out) on dynexec's Winograd F(2x2, 3x3) kernel (csrc/ops/cpu/winograd_cpu.h);
    'onednn' - primitives created once and executed directly by dynexec._C (fastest: no
               per-call descriptor work, which dominates small routed sub-batches);
    'mkldnn' - torch's oneDNN op on weights pre-packed once;
    'aten'   - F.conv2d.
    'auto' takes the first available. Other programs (NCHW, float64, CUDA) use F.conv2d."""
    if requested not in CONV_IMPLS:
        raise ValueError(f"convolutions must be one of {', '.join(CONV_IMPLS)}; got {requested!r}")
    if requested == "onednn" and not onednn_direct_available():
        raise ValueError("convolutions='onednn' needs dynexec._C built with oneDNN "
                         "(pip install onednn-cpu-gomp onednn-devel-cpu-gomp, then rebuild); "
                         "use 'mkldnn' or 'auto'")
    if requested == "winograd" and not winograd_available():
        raise ValueError("convolutions='winograd' needs dynexec._C built with oneDNN and a CPU with "
                         "AVX2 and FMA; use 'onednn' or 'auto'")
    if requested == "mkldnn" and not onednn_packing_available():
        raise ValueError("convolutions='mkldnn' needs a torch built with oneDNN; use 'aten' or 'auto'")
    if requested != "auto":
        return requested
    if winograd_available():
        return "winograd"
    if onednn_direct_available():
        return "onednn"
    return "mkldnn" if onednn_packing_available() else "aten"


def resolve_batch_shards(requested) -> int:
    """The batch shards of the C++ block loop (BlockLoop.set_shards): 'auto' -> 0 (one
    shard per intra-op thread, each running the whole loop on its rows with
    single-threaded kernels; a multiple of the threads when a shard would get more than
    32 rows, which run slower per row once they outgrow a core's cache), 1 -> no
    sharding, k > 1 -> k shards (more shards than threads are claimed by the threads
    one at a time)."""
    if requested == "auto":
        return 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"batch_shards must be 'auto' or an int >= 1; got {requested!r}")
    return requested


@dataclass(frozen=True)
class CpuLoop:
    """The C++ executor's loop and which parts of the forward run in it."""
    loop: object          # torch.classes.dynexec.BlockLoop
    runs_stem: bool       # else the Program's stem runs first, in Python
    runs_head: bool       # else the Program's head runs last, in Python
    runs_policy: bool     # planned router: the policy network and its decisions run in it


@dataclass(frozen=True)
class Program:
    model: RoutedModel
    executor: str                            # 'python' | 'cpu-loop' | 'gpu-graph'
    stem: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple                            # ProgramBlock (python, cpu-loop) or GraphBlock (gpu-graph)
    head: Callable[[torch.Tensor], torch.Tensor]
    router: str                              # 'none' | 'planned' | 'online'
    ops: Optional[Backend] = None            # the op backend of the Python loop
    gates: Optional[object] = None           # online: RecurrentGates or ModuleGates
    policy: Optional["Program"] = None       # planned: the policy network (router 'none')
    cpu_loop: Optional[CpuLoop] = None       # cpu-loop
    folded: bool = False
    channels_last: bool = False
    convolutions: str = "aten"               # of the folded CPU float32 convs: see resolve_conv_impl
    batch_shards: object = "auto"            # of the C++ loop: see resolve_batch_shards

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def backend(self) -> str:
        return "triton-graph" if self.executor == "gpu-graph" else self.ops.name


def _lower_block(view: BlockView, fold_bn: bool, impl: str, ops: Backend) -> ProgramBlock:
    branch, shortcut = view.branch, view.shortcut
    if fold_bn and view.branch_layers is not None:
        branch = fold_layers(view.branch_layers).packed(impl)
    if fold_bn and view.shortcut_layers is not None:
        shortcut = fold_layers(view.shortcut_layers).packed(impl)
    # The OneDnnChain runs the regrouping steps with the native ops: native backend only.
    fused = ops.name == "native" and _fused(branch) is not None
    return (FusedProgramBlock if fused else ProgramBlock)(
        branch=branch, shortcut_kind=view.shortcut_kind, shortcut=shortcut,
        out_channels=view.out_channels, ops=ops)


def _lower_stem(owner, fold_bn: bool, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    view = owner.stem_view() if fold_bn else None
    return FoldedStem(view, impl) if view is not None else owner.stem


def _lower_head(owner, native_kernel: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    view = owner.head_view() if native_kernel else None
    return FoldedHead(view, owner.head) if FoldedHead.foldable(view) else owner.head


def _fused(chain) -> Optional[object]:
    return getattr(chain, "fused", None)


def build_cpu_loop(blocks, stem, head, router: str, gates, shards: int, model,
                    policy: Optional["Program"]) -> Optional[CpuLoop]:
    """The C++ loop of these blocks, or None when some branch or projection is not a
    OneDnnChain or the router is one the loop does not run (feed-forward gates)."""
    if not all(isinstance(b, FusedProgramBlock) for b in blocks) or any(
            b.shortcut_kind == "projection" and _fused(b.shortcut) is None for b in blocks):
        return None
    if router == "online" and not isinstance(gates, RecurrentGates):
        return None
    loop = torch.classes.dynexec.BlockLoop()
    loop.set_shards(shards)
    for b in blocks:
        loop.add_block(b.branch.fused, _fused(b.shortcut) if b.shortcut_kind == "projection" else None,
                       b.out_channels if b.shortcut_kind == "downsample_b" else 0)
    if router != "none":
        loop.set_decision_rule(float(model.threshold), bool(model.runs_at_threshold))
    if router == "online":
        loop.set_recurrent_gate(gates.w_ih, gates.w_hh, gates.b_ih, gates.b_hh, gates.proj_w,
                                gates.proj_b, gates.embed_w, gates.embed_b)
    # The stem in C++ when it is one fused conv + ReLU with no pooling before or after it,
    # the head when it is a FoldedHead of float32 CPU weights.
    runs_stem = (isinstance(stem, FoldedStem) and stem.pre is None and stem.post is None
                 and _fused(stem.conv) is not None)
    runs_head = isinstance(head, FoldedHead) and head.is_cpu_float32
    if runs_stem:
        loop.set_stem(_fused(stem.conv))
    if runs_head:
        loop.set_head(head.weight, head.bias, head.pool, head.sigmoid)
    runs_policy = (router == "planned" and runs_stem and policy is not None and policy.cpu_loop is not None
                   and policy.cpu_loop.runs_stem and policy.cpu_loop.runs_head)
    if runs_policy:
        loop.set_policy(policy.cpu_loop.loop)
    return CpuLoop(loop, runs_stem, runs_head, runs_policy)


@dataclass(frozen=True)
class _Settings:
    """What lower() resolved once, for the network and its policy network alike."""
    ops: Backend
    fold_bn: bool
    pack: str             # the convolution implementation of the folded convs ('aten': none)
    channels_last: bool
    shards: int
    batch_shards: object
    executor: str


def _lower_network(owner, model: RoutedModel, router: str, gates, policy: Optional["Program"],
                   settings: _Settings) -> Program:
    """``owner``'s stem, blocks and head (the model's, or its policy network's) as a
    Program with ``router``, on the C++ loop when it applies."""
    st = settings
    blocks = tuple(_lower_block(v, st.fold_bn, st.pack, st.ops) for v in owner.block_views())
    stem = _lower_stem(owner, st.fold_bn, st.pack)
    head = _lower_head(owner, st.pack in ("onednn", "winograd"))
    loop = build_cpu_loop(blocks, stem, head, router, gates, st.shards, model, policy) \
        if st.executor != "python" else None
    return Program(model=model, executor="cpu-loop" if loop else "python", stem=stem, blocks=blocks,
                   head=head, router=router, ops=st.ops, gates=gates, policy=policy, cpu_loop=loop,
                   folded=st.fold_bn, channels_last=st.channels_last, convolutions=st.pack,
                   batch_shards=st.batch_shards)


def lower(model: RoutedModel, backend: str = "auto", device=None, *, fold_bn: bool = True,
          channels_last: bool = True, convolutions: str = "auto", batch_shards="auto",
          executor: str = "auto") -> Program:
    """Lower an eval-mode routed model into the Program of its executor.

    backend: 'auto' (native on CPU; triton -> native -> torch on CUDA), 'native',
    'triton', 'torch' or 'triton-graph' (the gpu-graph executor). device: where it runs
    (default: the model's). channels_last: run the blocks on NHWC activations.
    convolutions: the implementation of the folded CPU float32 convolutions
    (``resolve_conv_impl``). batch_shards: how the C++ loop splits a batch
    (``resolve_batch_shards``). executor: 'auto' (the C++ loop where it applies, else the
    Python loop) or 'python' (the portable Python loop, e.g. to compare with)."""
    if not isinstance(model, RoutedModel):
        raise TypeError(f"dynexec can compile the models of dynexec.models (SkipNet, BlockDrop, "
                        f"plain ResNets); got {type(model).__name__}")
    if model.training:
        raise ValueError("compile expects an eval-mode model (BatchNorm must use running "
                         "statistics); call model.eval() first")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    shards = resolve_batch_shards(batch_shards)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if backend == "triton-graph" or executor == "gpu-graph":
        if backend != "triton-graph" or executor not in ("auto", "gpu-graph"):
            raise ValueError(f"the gpu-graph executor is the 'triton-graph' backend; got backend "
                             f"{backend!r} with executor {executor!r}")
        from .executors.gpu_graph import pack_blocks
        gates = ModuleGates(model) if model.router == "online" else None
        return Program(model=model, executor="gpu-graph", stem=model.stem,
                       blocks=pack_blocks(model, device, fold_bn), head=model.head,
                       router=model.router, gates=gates, folded=True, channels_last=True)
    if executor == "cpu-loop" and backend not in ("auto", "native"):
        raise ValueError(f"the cpu-loop executor runs on the native backend; got backend {backend!r}")
    ops = get_backend(backend, device)
    impl = resolve_conv_impl(convolutions)
    # oneDNN's packed weights return channels_last outputs, so only NHWC programs use them.
    settings = _Settings(ops=ops, fold_bn=fold_bn,
                         pack=impl if fold_bn and channels_last else "aten", channels_last=channels_last,
                         shards=shards, batch_shards=batch_shards, executor=executor)
    gates = lower_gates(model, fuse=fold_bn) if model.router == "online" else None
    policy = _lower_network(model.policy_network(), model, "none", None, None, settings) \
        if model.router == "planned" else None
    program = _lower_network(model, model, model.router, gates, policy, settings)
    if executor == "cpu-loop" and program.cpu_loop is None:
        raise ValueError("the cpu-loop executor needs the native backend, folded BatchNorm, "
                         "channels_last, the 'winograd' or 'onednn' convolutions and no "
                         "feed-forward gates; use executor='auto'")
    return program
