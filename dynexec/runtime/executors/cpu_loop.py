"""The C++ executor: one call of ``torch.classes.dynexec.BlockLoop.forward`` runs the
blocks with the router (BlockDrop's policy network, SkipNet's recurrent gate, or a given
routing), and the stem and head when the Program put them in the loop; see
csrc/executor/block_loop.h."""
from __future__ import annotations

from typing import Optional

import torch


class CpuLoopExecutor:
    def __init__(self, program, policy=None):
        self.program = program
        self.loop = program.cpu_loop
        self.policy = policy  # used when the policy network runs outside the loop

    def run(self, x: torch.Tensor, routing: Optional[torch.Tensor]):
        prog, loop = self.program, self.loop
        if prog.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if routing is None and prog.router == "planned" and not loop.runs_policy:
            routing = prog.model.decide(self.policy.run(x, None)[0])
        out, routing = loop.loop.forward(x if loop.runs_stem else prog.stem(x), routing)
        return (out if loop.runs_head else prog.head(out)), routing
