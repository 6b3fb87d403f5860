"""The executors of a Program: ``python_loop`` (the portable loop over an op backend),
``cpu_loop`` (the C++ loop) and ``gpu_graph`` (the sync-free GPU forward in CUDA graphs).
Each has ``run(x, routing) -> (logits, routing)`` for a non-empty, checked batch x and
an optional checked routing that replaces the router's."""
from __future__ import annotations


def make_executor(program):
    """The executor ``program.executor`` names, with its policy network's own executor."""
    policy = make_executor(program.policy) if program.policy is not None else None
    if program.executor == "cpu-loop":
        from .cpu_loop import CpuLoopExecutor
        return CpuLoopExecutor(program, policy)
    if program.executor == "gpu-graph":
        from .gpu_graph import GraphExecutor
        return GraphExecutor(program)
    from .python_loop import PythonLoopExecutor
    return PythonLoopExecutor(program, policy)
