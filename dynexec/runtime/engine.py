"""The regrouping engine: runs a Program, each block only on the samples routed to it.

Per block: partition(decisions) -> gather(active rows) -> branch(sub-batch) ->
scatter(+residual, ReLU) into the shortcut output. Skipped samples take the shortcut
only; for an identity shortcut they are not touched at all (the scatter writes into the
block input in place, which the engine owns). Eval-mode BatchNorm is per-sample, so
compaction computes the same function as the official masked execution.

The engine keeps no per-call state, so one engine may be called from several threads.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import Backend, get_backend
from .program import DenseProgram, Program, ProgramBlock, lower, resolve_batch_shards


def check_routing(routing, n: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    """A caller-given routing must be a bool tensor [n, num_blocks]; returned on device."""
    if not isinstance(routing, torch.Tensor) or routing.dtype != torch.bool:
        raise TypeError(f"routing must be a bool tensor [N, {num_blocks}], got "
                        f"{getattr(routing, 'dtype', type(routing).__name__)}")
    if tuple(routing.shape) != (n, num_blocks):
        raise ValueError(f"routing must have shape [{n}, {num_blocks}], got {tuple(routing.shape)}")
    return routing.to(device)


class Engine:
    """A compiled model. ``engine(x)`` -> logits; ``engine(x, return_routing=True)`` ->
    (logits, routing[N, K] bool); ``engine(x, routing=r)`` runs a given routing instead of
    the model's router (e.g. all True for the dense baseline)."""

    def __init__(self, program: Program, backend: Backend):
        self.program = program
        self.backend = backend
        self.model = program.model

    @property
    def num_blocks(self) -> int:
        return self.program.num_blocks

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        return (f"Engine(model={self.model.model_name}, blocks={self.num_blocks}, "
                f"router={self.program.router}, backend={self.backend.name}, "
                f"bn_folded={self.program.folded}, channels_last={self.program.channels_last}, "
                f"convolutions={self.program.convolutions}, batch_shards={self.program.batch_shards})")

    def warmup(self, max_batch_size: int) -> int:
        """Runs the engine once on every batch size and every routed sub-batch size up to
        ``max_batch_size`` (zero inputs, forced routings), so that the convolution
        primitives of all of them exist before serving: the first call that meets a new
        sub-batch size otherwise pays ~0.1 ms per convolution geometry to create one
        (convolutions='winograd' or 'onednn'). Returns the number of forwards run (3 x max_batch_size).
        Cost: about as many forwards, e.g. ~10 s for SkipNet-110 and 128 on 2 CPU cores."""
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"warmup: expected max_batch_size >= 1, got {max_batch_size!r}")
        param = next(self.model.parameters())
        size, k = self.model.input_size, self.num_blocks
        x = torch.zeros(max_batch_size, self.model.in_channels, size, size, dtype=param.dtype,
                        device=param.device)
        for n in range(1, max_batch_size + 1):
            self(x[:n])  # the router's own routing (BlockDrop's policy network runs at n)
            # a batch of n, every block on the whole batch (stems and shortcuts at n) ...
            self(x[:n], routing=torch.ones(n, k, dtype=torch.bool))
            # ... and the full batch with n rows routed to every block (the sub-batches)
            some = torch.zeros(max_batch_size, k, dtype=torch.bool)
            some[:n] = True
            self(x, routing=some)
        return 3 * max_batch_size

    # ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, return_routing: bool = False,
                 routing: Optional[torch.Tensor] = None):
        self.model.check_input(x)
        if routing is not None:
            routing = check_routing(routing, x.shape[0], self.num_blocks, x.device)
        with torch.inference_mode():
            logits, used = self._run(x, routing)
        return (logits, used) if return_routing else logits

    def _run(self, x: torch.Tensor, forced: Optional[torch.Tensor]):
        prog = self.program
        model = self.model
        n = x.shape[0]
        k_total = prog.num_blocks
        if n == 0:
            return model._empty_result(x)
        if prog.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        native = prog.native_loop if self.backend.name == "native" else None
        if native is not None and native.whole:
            result = self._run_whole(native, x, forced)
            if result is not None:
                return result
        if forced is not None:
            routing = forced.clone()
        elif prog.router == "planned":
            routing = model.decide(self._run_dense(prog.policy, x))
        else:
            routing = torch.ones((n, k_total), dtype=torch.bool, device=x.device)

        h = prog.stem(x)
        online = prog.router == "online" and forced is None
        if native is not None and (native.recurrent or not online):  # the loop below, in C++
            if online:
                h, routing = native.loop.run_recurrent(h)
            else:
                h = native.loop.run_planned(h, routing)
            return prog.head(h), routing
        state = prog.gate_runner.init_state(n, h) if online else None
        # A routing known up front: every block's count in one reduction.
        counts = None if online else routing.sum(dim=0).tolist()
        # Gates that read the pooled block output get it from the fused scatter.
        pooled_gates = online and prog.gate_runner.takes_pooled
        pooled = None
        decisions = []  # online: block k's mask, decided by the gate after block k - 1
        idx = None
        for k, block in enumerate(prog.blocks):
            if not online:
                mask, active = routing[:, k], counts[k]
            elif k == 0:  # the first block always runs
                mask, active = routing[:, 0], n
            else:  # one partition gives the block's count and its rows
                mask = decisions[-1]
                idx, count = self.backend.partition(mask)
                active = int(count)
            gate_next = online and k + 1 < k_total
            if gate_next and pooled_gates:
                h, pooled = self._run_block_pooled(block, h, mask, active, pooled, idx)
                p, state = prog.gate_runner.step_pooled(k, pooled, state,
                                                        self.backend.recurrent_gate_step)
            else:
                h = self._run_block(block, h, mask, active, idx)
                if gate_next:
                    p, state = prog.gate_runner.step(k, h, state)
            if gate_next:
                decisions.append(model.decide(p).reshape(n))
        if decisions:
            routing[:, 1:] = torch.stack(decisions, dim=1)
        return prog.head(h), routing

    def _run_whole(self, native, x: torch.Tensor, forced: Optional[torch.Tensor]):
        """(logits, routing) from one C++ call that runs stem, router, blocks and head
        shard by shard (BlockLoop.forward_*), or None when this call needs the loop below
        (a feed-forward gate, a policy the C++ forward cannot run)."""
        prog = self.program
        if forced is not None or prog.router == "none":
            routing = forced.clone() if forced is not None else \
                torch.ones((x.shape[0], prog.num_blocks), dtype=torch.bool)
            return native.loop.forward_planned(x, routing), routing
        if prog.router == "online":
            return tuple(native.loop.forward_recurrent(x)) if native.recurrent else None
        policy = prog.policy.native_loop
        if policy is None or not policy.whole or native.keep_at_half is None:
            return None
        return tuple(native.loop.forward_with_policy(policy.loop, x, native.keep_at_half))

    def _run_dense(self, dense: DenseProgram, x: torch.Tensor) -> torch.Tensor:
        h = dense.stem(x)
        if dense.native_loop is not None and self.backend.name == "native":
            every = torch.ones((h.shape[0], len(dense.blocks)), dtype=torch.bool)
            return dense.head(dense.native_loop.loop.run_planned(h, every))
        for block in dense.blocks:
            h = self._run_block_all(block, h)
        return dense.head(h)

    def _run_block_all(self, block: ProgramBlock, h: torch.Tensor) -> torch.Tensor:
        # The shortcut output is engine-owned (h itself for an identity shortcut, which
        # no later step reads), so the block's result is written into it.
        return block.branch_add_relu_(h, self._shortcut(block, h), self.backend)

    def _run_block(self, block: ProgramBlock, h: torch.Tensor, mask: torch.Tensor,
                   active: int, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block on the rows of ``mask`` (``active`` of them; ``idx``: their
        partition when the caller has it)."""
        n = h.shape[0]
        if active == n:  # fast path: the whole batch, no gather or scatter
            return self._run_block_all(block, h)
        out = self._shortcut(block, h)
        if active == 0:  # fast path: shortcut only
            return out
        if idx is None:
            idx, _ = self.backend.partition(mask)
        # For an identity shortcut ``out is h``: the scatter writes into the engine-owned
        # activation in place and the skipped rows are never touched.
        return block.rows_add_relu_(h, idx, active, out, self.backend)

    def _run_block_pooled(self, block: ProgramBlock, h: torch.Tensor, mask: torch.Tensor,
                          active: int, pooled: Optional[torch.Tensor],
                          idx: Optional[torch.Tensor] = None):
        """``_run_block`` that also returns the block output's spatial mean [N, C] (the next
        gate's input). Behind an identity shortcut the rows a block skips are unchanged,
        so their cached means are kept and only the executed rows are pooled, inside the
        scatter's single pass."""
        if block.shortcut_kind != "identity" or pooled is None:
            out = self._run_block(block, h, mask, active, idx)
            return out, out.mean(dim=(2, 3)).contiguous()
        if active == 0:
            return h, pooled
        if active == h.shape[0]:  # in place into h; the ReLU pass also pools
            return block.branch_add_relu_pool_(h, h, pooled, self.backend), pooled
        if idx is None:
            idx, _ = self.backend.partition(mask)
        return block.rows_add_relu_pool_(h, idx, active, h, pooled, self.backend), pooled

    def _shortcut(self, block: ProgramBlock, h: torch.Tensor) -> torch.Tensor:
        if block.shortcut_kind == "identity":
            return h
        if block.shortcut_kind == "downsample_b":
            return self.backend.downsample_b(h, block.out_channels)
        return block.shortcut(h)


def compile(model: torch.nn.Module, backend: str = "auto", fold_bn: bool = True,
            channels_last: bool = True, convolutions: str = "auto", batch_shards="auto") -> Engine:
    """Compile an eval-mode dynexec model into a regrouping Engine.

    backend: 'auto' (native on CPU; triton -> native -> torch on CUDA), 'native',
    'triton', 'torch', or 'triton-graph' (CUDA: no host sync, whole forward in a CUDA
    graph; see dynexec.runtime.graph_engine). fold_bn: fold eval-mode BatchNorm into the block convolutions
    (changes results only by float rounding). channels_last: run on NHWC activations
    (faster convolutions; changes results only by float rounding). convolutions: the
    implementation of the folded CPU float32 convolutions, 'auto' (best available),
    'winograd' ('onednn' with the 3x3 stride-1 convolutions on dynexec's Winograd
    F(2x2, 3x3) kernel; the default on CPUs with AVX2 and FMA; changes results only by
    float rounding), 'onednn' (dynexec's own oneDNN primitives), 'mkldnn' (torch's oneDNN op on pre-packed
    weights) or 'aten' (F.conv2d); see dynexec.runtime.program.resolve_conv_impl. batch_shards: how the
    C++ block loop (native backend, 'winograd' or 'onednn' convolutions) splits a batch: 'auto' (one
    shard per intra-op thread, each running the whole network on its rows with
    single-threaded kernels: faster for routed sub-batches of a few samples, same results;
    more shards when one would get over 32 rows, which run slower per row),
    1 (no sharding: every kernel uses every thread) or k > 1 shards (with more shards than
    threads, each thread claims the next shard when done: steadier on a host whose other
    tenants slow one core). The engine snapshots
    the weights: compile again after changing the model.
    """
    resolve_batch_shards(batch_shards)  # (checked for every backend)
    if backend == "triton-graph":
        # The sync-free path: fused indexed convolutions, one CUDA graph per batch size.
        from .graph_engine import make_graph_engine
        return make_graph_engine(model, capture=True, fold_bn=fold_bn)
    program = lower(model, fold_bn=fold_bn, channels_last=channels_last, convolutions=convolutions,
                    batch_shards=batch_shards)
    device = next(model.parameters()).device
    return Engine(program, get_backend(backend, device))
