"""The portable executor: the block loop in Python over an op backend (torch, native or
triton).

Per block: partition(decisions) -> gather(active rows) -> branch(sub-batch) ->
scatter(+residual, ReLU) into the shortcut output. Skipped samples take the shortcut
only; for an identity shortcut they are not touched at all (the scatter writes into the
block input in place, which the executor owns). Eval-mode BatchNorm is per sample, so
compaction computes the same function as the official masked execution.
"""
from __future__ import annotations

from typing import Optional

import torch


class PythonLoopExecutor:
    def __init__(self, program, policy=None):
        self.program = program
        self.ops = program.ops
        self.policy = policy

    def run(self, x: torch.Tensor, forced: Optional[torch.Tensor]):
        prog, model = self.program, self.program.model
        n, k_total = x.shape[0], prog.num_blocks
        if prog.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if forced is not None:
            routing = forced.clone()
        elif prog.router == "planned":
            routing = model.decide(self.policy.run(x, None)[0])
        else:
            routing = torch.ones((n, k_total), dtype=torch.bool, device=x.device)

        h = prog.stem(x)
        online = prog.router == "online" and forced is None
        gates = prog.gates
        state = gates.init_state(n, h) if online else None
        # A routing known up front: every block's count in one reduction.
        counts = None if online else routing.sum(dim=0).tolist()
        # Gates that read the pooled block output get it from the fused scatter.
        pooled_gates = online and gates.takes_pooled
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
                idx, count = self.ops.partition(mask)
                active = int(count)
            gate_next = online and k + 1 < k_total
            if gate_next and pooled_gates:
                h, pooled = self.run_block_pooled(block, h, mask, active, pooled, idx)
                p, state = gates.step_pooled(k, pooled, state, self.ops.recurrent_gate_step)
            else:
                h = self.run_block(block, h, mask, active, idx)
                if gate_next:
                    p, state = gates.step(k, h, state)
            if gate_next:
                decisions.append(model.decide(p).reshape(n))
        if decisions:
            routing[:, 1:] = torch.stack(decisions, dim=1)
        return prog.head(h), routing

    def run_block(self, block, h: torch.Tensor, mask: torch.Tensor, active: int,
                  idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block on the rows of ``mask`` (``active`` of them; ``idx``: their
        partition when the caller has it)."""
        n = h.shape[0]
        out = block.shortcut_of(h)
        if active == n:  # the whole batch: no gather or scatter, the add in the last conv
            return block.add_relu_(h, out)
        if active == 0:  # the shortcut only
            return out
        if idx is None:
            idx, _ = self.ops.partition(mask)
        # For an identity shortcut ``out is h``: the scatter writes into the executor-owned
        # activation in place and the skipped rows are never touched.
        return block.rows_add_relu_(h, idx, active, out)

    def run_block_pooled(self, block, h: torch.Tensor, mask: torch.Tensor, active: int,
                         pooled: Optional[torch.Tensor], idx: Optional[torch.Tensor] = None):
        """``run_block`` that also returns the block output's spatial mean [N, C] (the next
        gate's input). Behind an identity shortcut the rows a block skips are unchanged,
        so their cached means are kept and only the executed rows are pooled, inside the
        scatter's single pass."""
        if block.shortcut_kind != "identity" or pooled is None:
            out = self.run_block(block, h, mask, active, idx)
            return out, out.mean(dim=(2, 3)).contiguous()
        if active == 0:
            return h, pooled
        if active == h.shape[0]:  # in place into h; the ReLU pass also pools
            return block.add_relu_pool_(h, h, pooled), pooled
        if idx is None:
            idx, _ = self.ops.partition(mask)
        return block.rows_add_relu_pool_(h, idx, active, h, pooled), pooled
