"""Lowering a routed model into the normalized program the engine executes.

    stem(x) -> h
    for each block k: executed -> h = relu(branch_k(h) + shortcut_k(h))
                      skipped  -> h = shortcut_k(h)              (no ReLU)
    head(h) -> logits
    router: none | planned (policy on the input) | online (gate after each block)

Nothing below knows which paper a model came from: the model supplies its stem, block
views, head, and router functions (``dynexec.models.common.RoutedModel``). With
``fold_bn`` the eval-mode BatchNorms of branches and projection shortcuts are folded into
their convolutions (float64 arithmetic, then cast), which changes results only by float
rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blockdrop import BasicBlock as BDBasic, Bottleneck as BDBottleneck, DownsampleB
from ..models.common import BlockView, HeadView, RoutedModel, StemView
from ..models.skipnet import BasicBlock as SNBasic, Bottleneck as SNBottleneck
from .ops import reference


CONV_IMPLS = ("auto", "winograd", "onednn", "mkldnn", "aten")


def onednn_packing_available() -> bool:
    """oneDNN's fused convolution op (the one torch.compile's CPU backend uses) exists."""
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def onednn_direct_available() -> bool:
    """dynexec._C was built with its own oneDNN primitives (torch.classes.dynexec.OneDnnChain, BlockLoop)."""
    from .extension import load
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
class FoldedConv:
    """A convolution with its BatchNorm folded in and an optional ReLU.

    ``packed`` is the weight pre-reordered for torch's oneDNN op ('mkldnn', see
    ``resolve_conv_impl``): F.conv2d reorders the plain weight on every call, 15-30 us per
    convolution, which weighs most on the small sub-batches of routed blocks.
    """
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int
    relu: bool
    packed: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], 1,
                "none", [], "")
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        # Not oneDNN's fused ReLU: it maps NaN to 0, the official models propagate NaN.
        return torch.relu_(y) if self.relu else y

    def add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += conv(x), in place: the add happens in the conv's epilogue and no
        output is allocated (a fresh 4-8 MB tensor per block costs more than the add).
        The caller must own ``residual``. No ReLU here: oneDNN's fused ReLU maps NaN to 0."""
        if self.relu:
            raise ValueError("add_ is for the last convolution of a branch (no own ReLU)")
        if self.packed is not None:
            torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2,
                [1, 1], 1, "add", None, None, [], None)
            return residual
        return residual.add_(self(x))

    def packed_for_cpu(self) -> "FoldedConv":
        """This conv on weights packed for torch's oneDNN op when it is a CPU float32 conv."""
        if not self.is_cpu_float32:
            return self
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.to_mkldnn(), [self.padding] * 2, [self.stride] * 2, [1, 1], 1)
        return FoldedConv(self.weight, self.bias, self.stride, self.padding, self.relu, packed)

    @property
    def is_cpu_float32(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype == torch.float32


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> FoldedConv:
    """conv (no bias or bias) followed by eval-mode BN, as one conv with bias."""
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1] \
            or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"cannot fold {conv}: only square, ungrouped, undilated convs are folded")
    dtype = conv.weight.dtype
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    folded_w = (w * scale.view(-1, 1, 1, 1)).to(dtype)
    folded_b = (bn.bias.detach().double() + (bias - bn.running_mean.detach().double()) * scale).to(dtype)
    return FoldedConv(folded_w.contiguous(), folded_b, conv.stride[0], conv.padding[0], relu)


class FoldedChain:
    """A sequence of folded convs: the branch or the projection shortcut of a block, or a
    stem's convolution. ``fused`` is the whole chain as one dynexec oneDNN object
    (torch.classes.dynexec.OneDnnChain, convolutions='onednn'), which also runs the
    engine's per-block steps around the chain in one call each (``rows_add_relu_`` ...)."""

    def __init__(self, convs: list[FoldedConv], fused: Optional[object] = None):
        self.convs = tuple(convs)
        self.fused = fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.forward(x)
        for conv in self.convs:
            x = conv(x)
        return x

    def add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += chain(x), in place, fused into the last convolution."""
        if self.fused is not None:
            return self.fused.add_(x, residual)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1].add_(x, residual)

    def packed_for_cpu(self, impl: str) -> "FoldedChain":
        """This chain on pre-packed weights of ``impl`` (see resolve_conv_impl) when all
        its convs are CPU float32 convs; otherwise unchanged."""
        if impl == "aten" or not all(c.is_cpu_float32 for c in self.convs):
            return self
        # (OneDnnChain is conv, ReLU, ..., conv; other chains take torch's oneDNN op)
        if impl == "mkldnn" or not all(c.relu for c in self.convs[:-1]):
            return FoldedChain([c.packed_for_cpu() for c in self.convs])
        fused = torch.classes.dynexec.OneDnnChain(
            [c.weight for c in self.convs], [c.bias for c in self.convs],
            [c.stride for c in self.convs], [c.padding for c in self.convs], self.convs[-1].relu)
        if impl == "winograd":
            fused.enable_winograd()
        return FoldedChain(self.convs, fused)

    @property
    def weights(self) -> list[torch.Tensor]:
        return [c.weight for c in self.convs]


class FoldedStem:
    """pre -> conv with BN folded and ReLU -> post."""

    def __init__(self, view: StemView, pack: Optional[str]):
        conv = FoldedChain([fold_conv_bn(view.conv, view.bn, relu=True)])
        self.conv = conv.packed_for_cpu(pack) if pack else conv
        self.pre, self.post = view.pre, view.post

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        x = self.conv(x)
        return self.post(x) if self.post is not None else x


class FoldedHead:
    """Global average pooling -> linear (-> sigmoid) as one kernel, dynexec::pooled_linear,
    on CPU float32 maps of the pooled size; anything else takes the model's own head. The
    C++ forward (BlockLoop.set_head) runs the same kernel, so both give the same bits."""

    def __init__(self, view: HeadView, fallback: Callable[[torch.Tensor], torch.Tensor]):
        linear = view.linear
        self.pool = view.pool.kernel_size
        self.weight = linear.weight.detach().clone().contiguous()
        self.bias = (linear.bias.detach().clone() if linear.bias is not None
                     else torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                      device=linear.weight.device))
        self.sigmoid = view.sigmoid
        self.fallback = fallback

    @staticmethod
    def foldable(view: Optional[HeadView]) -> bool:
        """A square, unpadded, non-overlapping window (the whole map at the model's size)."""
        if view is None:
            return False
        pool = view.pool
        k = pool.kernel_size
        return (isinstance(k, int) and pool.stride in (k, (k, k)) and pool.padding in (0, (0, 0))
                and not pool.ceil_mode and pool.divisor_override is None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if (h.device.type == "cpu" and h.dtype == torch.float32 == self.weight.dtype and h.dim() == 4
                and h.shape[2] == h.shape[3] == self.pool):
            return torch.ops.dynexec.pooled_linear(h, self.weight, self.bias, self.sigmoid)
        return self.fallback(h)


def _lower_head(owner, native: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    view = owner.head_view() if native else None
    return FoldedHead(view, owner.head) if FoldedHead.foldable(view) else owner.head


def _lower_stem(owner, fold_bn: bool, pack: Optional[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    view = owner.stem_view() if fold_bn else None
    return FoldedStem(view, pack) if view is not None else owner.stem


def _fold_branch(module: nn.Module) -> Optional[FoldedChain]:
    block = getattr(module, "block", module)  # SkipNet branches are adapters over a block
    if isinstance(block, (SNBasic, BDBasic)):
        return FoldedChain([fold_conv_bn(block.conv1, block.bn1, True),
                            fold_conv_bn(block.conv2, block.bn2, False)])
    if isinstance(block, (SNBottleneck, BDBottleneck)):
        return FoldedChain([fold_conv_bn(block.conv1, block.bn1, True),
                            fold_conv_bn(block.conv2, block.bn2, True),
                            fold_conv_bn(block.conv3, block.bn3, False)])
    return None


def _fold_projection(module: nn.Module) -> Optional[FoldedChain]:
    if isinstance(module, nn.Sequential) and len(module) == 2 \
            and isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d):
        return FoldedChain([fold_conv_bn(module[0], module[1], False)])
    return None


# --------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------
class RecurrentGates:
    """SkipNet's recurrent gate, lowered: global average pool, the 1x1 embedding as a
    matrix product, one LSTM cell step, the projection and sigmoid — one
    ``recurrent_gate_step`` op per gate. The engine passes the pooled block output
    (``step_pooled``), which its fused scatter computes; ``step`` pools itself."""

    takes_pooled = True

    def __init__(self, model: RoutedModel):
        control = model.control
        self.embed_w = [g[1].weight.detach().flatten(1).t().contiguous() for g in model.gates()]
        self.embed_b = [g[1].bias.detach() for g in model.gates()]
        rnn = control.rnn
        self.w_ih, self.w_hh = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach()
        self.b_ih, self.b_hh = rnn.bias_ih_l0.detach(), rnn.bias_hh_l0.detach()
        self.proj_w = control.proj.weight.detach().reshape(1, -1).t().contiguous()
        self.proj_b = control.proj.bias.detach()
        self.hidden = control.hidden_dim

    def init_state(self, n: int, like: torch.Tensor):
        zeros = like.new_zeros((n, self.hidden))
        return zeros, zeros.clone()

    def step_pooled(self, k: int, pooled: torch.Tensor, state, gate_step: Callable):
        p, hx, cx = gate_step(pooled, self.embed_w[k], self.embed_b[k], self.w_ih, self.w_hh,
                              self.b_ih, self.b_hh, self.proj_w, self.proj_b, *state)
        return p, (hx, cx)

    def step(self, k: int, h: torch.Tensor, state):
        return self.step_pooled(k, h.mean(dim=(2, 3)), state, reference.recurrent_gate_step)


class ModuleGates:
    """Any other gate: the model's own modules (feed-forward gates)."""

    takes_pooled = False

    def __init__(self, model: RoutedModel):
        self.model = model
        self.gates = tuple(model.gates())

    def init_state(self, n: int, like: torch.Tensor):
        return self.model.gate_init_state(n, like)

    def step(self, k: int, h: torch.Tensor, state):
        return self.model.gate_step(self.gates[k], h, state)


def lower_gates(model: RoutedModel, fuse: bool):
    if fuse and getattr(model, "gate_type", None) == "rnn":
        return RecurrentGates(model)
    return ModuleGates(model)


@dataclass(frozen=True)
class ProgramBlock:
    branch: Callable[[torch.Tensor], torch.Tensor]
    shortcut_kind: str                      # 'identity' | 'projection' | 'downsample_b'
    shortcut: Optional[Callable[[torch.Tensor], torch.Tensor]]
    out_channels: int

    def _fused(self, ops) -> Optional[object]:
        """The branch's OneDnnChain when it may run the regrouping steps too: they call
        the native ops, so only with the native backend."""
        fused = getattr(self.branch, "fused", None)
        return fused if fused is not None and ops.name == "native" else None

    def branch_add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += branch(x), in place (the caller owns ``residual``); fused into the
        last convolution when folded."""
        fused = getattr(self.branch, "add_", None)
        if fused is not None:
            return fused(x, residual)
        return residual.add_(self.branch(x))

    def branch_add_relu_(self, x: torch.Tensor, residual: torch.Tensor, ops) -> torch.Tensor:
        """residual = relu(branch(x) + residual), in place."""
        fused = self._fused(ops)
        if fused is not None:
            return fused.add_relu_(x, residual)
        return self.branch_add_(x, residual).relu_()

    def branch_add_relu_pool_(self, x: torch.Tensor, residual: torch.Tensor,
                              pooled: torch.Tensor, ops) -> torch.Tensor:
        """branch_add_relu_, and pooled = the result's spatial mean [N, C]."""
        fused = self._fused(ops)
        if fused is not None:
            return fused.add_relu_pool_(x, residual, pooled)
        out = self.branch_add_(x, residual)
        ops.relu_pool_(out, pooled)
        return out

    def rows_add_relu_(self, h: torch.Tensor, idx: torch.Tensor, count: int,
                       out: torch.Tensor, ops) -> torch.Tensor:
        """The routed step: out[i] = relu(out[i] + branch(h[i])) for i in idx[:count]
        (gather, branch on the sub-batch, fused scatter); other rows untouched."""
        fused = self._fused(ops)
        if fused is not None:
            return fused.rows_add_relu_(h, idx, count, out)
        ops.scatter_residual_relu_(out, self.branch(ops.gather_rows(h, idx, count)), idx, count)
        return out

    def rows_add_relu_pool_(self, h: torch.Tensor, idx: torch.Tensor, count: int,
                            out: torch.Tensor, pooled: torch.Tensor, ops) -> torch.Tensor:
        """rows_add_relu_, and pooled[i] = out[i]'s spatial mean for the same rows."""
        fused = self._fused(ops)
        if fused is not None:
            return fused.rows_add_relu_pool_(h, idx, count, out, pooled)
        y = self.branch(ops.gather_rows(h, idx, count))
        ops.scatter_residual_relu_pool_(out, y, idx, count, pooled)
        return out


@dataclass(frozen=True)
class DenseProgram:
    """A network whose blocks always all run (BlockDrop's policy network)."""

    stem: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple[ProgramBlock, ...]
    head: Callable[[torch.Tensor], torch.Tensor]
    native_loop: Optional["NativeLoop"] = None


@dataclass(frozen=True)
class Program:
    model: RoutedModel
    stem: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple[ProgramBlock, ...]
    head: Callable[[torch.Tensor], torch.Tensor]
    router: str                              # 'none' | 'planned' | 'online'
    gate_runner: Optional[object] = None     # online: init_state(n, like), step(k, h, state)
    policy: Optional[DenseProgram] = None    # planned routers: probabilities [N, K]
    native_loop: Optional[NativeLoop] = None  # the block loop in C++ (OneDnnChain programs)
    folded: bool = False
    channels_last: bool = False
    convolutions: str = "aten"               # of the folded CPU float32 convs: see resolve_conv_impl
    batch_shards: object = "auto"            # of the C++ block loop: see resolve_batch_shards

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def _lower_block(view: BlockView, fold_bn: bool, pack: Optional[str]) -> ProgramBlock:
    branch = _fold_branch(view.branch) if fold_bn else None
    shortcut = view.shortcut
    if view.shortcut_kind == "projection" and fold_bn:
        shortcut = _fold_projection(view.shortcut) or view.shortcut
    if view.shortcut_kind == "downsample_b" and not isinstance(view.shortcut, DownsampleB):
        raise TypeError(f"downsample_b shortcut must be a DownsampleB, got {type(view.shortcut)}")
    if pack:
        branch = branch.packed_for_cpu(pack) if branch is not None else None
        if isinstance(shortcut, FoldedChain):
            shortcut = shortcut.packed_for_cpu(pack)
    return ProgramBlock(branch=branch or view.branch, shortcut_kind=view.shortcut_kind,
                        shortcut=shortcut, out_channels=view.out_channels)


@dataclass(frozen=True)
class NativeLoop:
    """The engine's block loop in C++ (torch.classes.dynexec.BlockLoop), for programs whose
    branches and projection shortcuts are OneDnnChains; used with the native backend."""
    loop: object
    recurrent: bool      # it also runs the program's online router (SkipNet's recurrent gate)
    whole: bool = False  # it also runs the stem and the head (loop.forward_*: input -> logits)
    # planned routers: the policy's decision rule as loop.forward_with_policy takes it
    # (True: p >= 0.5, False: p > 0.5); None: a rule the C++ forward does not know
    keep_at_half: Optional[bool] = None


def threshold_rule(decide: Callable[[torch.Tensor], torch.Tensor]) -> Optional[bool]:
    """True if ``decide`` keeps p >= 0.5, False if p > 0.5 (NaN dropped by both), None for
    any other rule."""
    p = torch.tensor([0.5, float("nan"), 0.49999997, 0.50000006, 0.0, 1.0])
    got = decide(p).tolist()
    for keep in (True, False):
        if got == [keep, False, False, True, False, True]:
            return keep
    return None


def _native_loop(blocks: tuple[ProgramBlock, ...], router: str, gates, shards: int,
                 stem=None, head=None, decide=None) -> Optional[NativeLoop]:
    def fused(chain):
        return getattr(chain, "fused", None)

    if any(fused(b.branch) is None or (b.shortcut_kind == "projection" and fused(b.shortcut) is None)
           for b in blocks):
        return None
    loop = torch.classes.dynexec.BlockLoop()
    loop.set_shards(shards)
    for b in blocks:
        loop.add_block(fused(b.branch), fused(b.shortcut) if b.shortcut_kind == "projection" else None,
                       b.out_channels if b.shortcut_kind == "downsample_b" else 0)
    recurrent = router == "online" and isinstance(gates, RecurrentGates)
    if recurrent:
        loop.set_recurrent_gate(gates.w_ih, gates.w_hh, gates.b_ih, gates.b_hh, gates.proj_w,
                                gates.proj_b, gates.embed_w, gates.embed_b)
    # The whole forward in C++ when the stem is one fused conv + ReLU (no input or output
    # pooling) and the head is a FoldedHead of float32 weights.
    whole = (isinstance(stem, FoldedStem) and stem.pre is None and stem.post is None
             and fused(stem.conv) is not None and isinstance(head, FoldedHead)
             and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu")
    if whole:
        loop.set_stem(fused(stem.conv))
        loop.set_head(head.weight, head.bias, head.pool, head.sigmoid)
    return NativeLoop(loop, recurrent, whole, threshold_rule(decide) if decide is not None else None)


def lower(model: RoutedModel, fold_bn: bool = True, channels_last: bool = False,
          convolutions: str = "auto", batch_shards="auto") -> Program:
    """Lower an eval-mode routed model into a Program. ``channels_last`` runs the blocks
    on NHWC activations (faster convolutions on CPU and GPU); ``convolutions`` picks the
    implementation of the folded CPU float32 convolutions (``resolve_conv_impl``);
    ``batch_shards`` how the C++ block loop splits a batch (``resolve_batch_shards``)."""
    if not isinstance(model, RoutedModel):
        raise TypeError(f"dynexec can compile the models of dynexec.models (SkipNet, BlockDrop, "
                        f"plain ResNets); got {type(model).__name__}")
    if model.training:
        raise ValueError("compile expects an eval-mode model (BatchNorm must use running "
                         "statistics); call model.eval() first")
    impl = resolve_conv_impl(convolutions)
    shards = resolve_batch_shards(batch_shards)
    # oneDNN's packed weights return channels_last outputs, so only NHWC programs use them.
    pack = impl if fold_bn and channels_last else None
    blocks = tuple(_lower_block(v, fold_bn, pack) for v in model.block_views())
    gate_runner = lower_gates(model, fuse=fold_bn) if model.router == "online" else None
    # The heads run as one kernel when the extension that has it is built.
    native_heads = pack in ("onednn", "winograd")
    policy = None
    if model.router == "planned":
        agent = model.policy_network()
        agent_blocks = tuple(_lower_block(v, fold_bn, pack) for v in agent.block_views())
        agent_stem, agent_head = _lower_stem(agent, fold_bn, pack), _lower_head(agent, native_heads)
        policy = DenseProgram(stem=agent_stem, head=agent_head, blocks=agent_blocks,
                              native_loop=_native_loop(agent_blocks, "none", None, shards,
                                                       agent_stem, agent_head))
    stem, head = _lower_stem(model, fold_bn, pack), _lower_head(model, native_heads)
    return Program(model=model, stem=stem, blocks=blocks, head=head,
                   router=model.router, gate_runner=gate_runner, policy=policy,
                   native_loop=_native_loop(blocks, model.router, gate_runner, shards, stem, head,
                                            model.decide if model.router == "planned" else None),
                   folded=fold_bn, channels_last=channels_last, convolutions=pack or "aten",
                   batch_shards=batch_shards)
