"""``dynexec.compile``: a routed model lowered once (``dynexec.runtime.program.lower``)
and run by its executor, behind one call API.

The engine keeps no per-call state of its own (the gpu-graph executor serialises its
calls), so one engine may be called from several threads.
"""
from __future__ import annotations

from typing import Optional

import torch

from .executors import make_executor
from .program import Program, lower


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

    def __init__(self, program: Program):
        self.program = program
        self.model = program.model
        self.executor = make_executor(program)

    @property
    def num_blocks(self) -> int:
        return self.program.num_blocks

    @property
    def backend_name(self) -> str:
        return self.program.backend

    def __repr__(self) -> str:
        p = self.program
        return (f"Engine(model={self.model.model_name}, blocks={self.num_blocks}, "
                f"router={p.router}, backend={p.backend}, executor={p.executor}, "
                f"bn_folded={p.folded}, channels_last={p.channels_last}, "
                f"convolutions={p.convolutions}, batch_shards={p.batch_shards})")

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

    def __call__(self, x: torch.Tensor, return_routing: bool = False,
                 routing: Optional[torch.Tensor] = None):
        self.model.check_input(x)
        if routing is not None:
            routing = check_routing(routing, x.shape[0], self.num_blocks, x.device)
        with torch.inference_mode():
            if x.shape[0] == 0:
                logits, used = self.model.empty_result(x)
            else:
                logits, used = self.executor.run(x, routing)
        return (logits, used) if return_routing else logits


def compile(model: torch.nn.Module, backend: str = "auto", fold_bn: bool = True,
            channels_last: bool = True, convolutions: str = "auto", batch_shards="auto",
            executor: str = "auto") -> Engine:
    """Compile an eval-mode dynexec model into an Engine.

    backend: 'auto' (native on CPU; triton -> native -> torch on CUDA), 'native',
    'triton', 'torch', or 'triton-graph' (CUDA: no host sync, whole forward in a CUDA
    graph). fold_bn: fold eval-mode BatchNorm into the convolutions (changes results only
    by float rounding). channels_last: run on NHWC activations (faster convolutions;
    changes results only by float rounding). convolutions: the implementation of the
    folded CPU float32 convolutions, 'auto' (best available), 'winograd' ('onednn' with
    the 3x3 stride-1 convolutions on dynexec's Winograd F(2x2, 3x3) kernel; the default on
    CPUs with AVX2 and FMA), 'onednn' (dynexec's own oneDNN primitives), 'mkldnn' (torch's
    oneDNN op on pre-packed weights) or 'aten' (F.conv2d). batch_shards: how the C++ loop
    splits a batch: 'auto' (one shard per intra-op thread, each running the whole
    network on its rows with single-threaded kernels; more shards when one would get over
    32 rows), 1 (no sharding: every kernel uses every thread) or k > 1 shards (with more
    shards than threads, each thread claims the next shard when done). executor: 'auto'
    (the C++ loop on CPU where it applies, else the Python loop) or 'python' (the
    portable Python loop over the backend's ops; same results). The engine snapshots the
    weights: compile again after changing the model.
    """
    return Engine(lower(model, backend, fold_bn=fold_bn, channels_last=channels_last,
                        convolutions=convolutions, batch_shards=batch_shards, executor=executor))
