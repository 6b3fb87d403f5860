"""``python -m dynexec.info``: which backends and ops are available here, and why not."""
from __future__ import annotations

import argparse
import os
import platform

import torch

from . import __version__
from .runtime.executors.gpu_graph import graph_backend_status
from .runtime.ops import BACKENDS, backend_status, get_backend

OPS = ("partition", "gather_rows", "scatter_residual_relu_", "downsample_b",
       "scatter_residual_relu_pool_", "recurrent_gate_step", "relu_pool_")
# ops the triton backend runs as the torch reference (see dynexec.runtime.ops)
TRITON_REFERENCE_OPS = ("recurrent_gate_step",)


def _op_rows(backend: str, ok: bool) -> list[tuple[str, str]]:
    if not ok:
        return [(op, "-") for op in OPS]
    if backend == "native":
        return [(op, "yes" if hasattr(torch.ops.dynexec, op) else "missing") for op in OPS]
    if backend == "triton":
        return [(op, "reference" if op in TRITON_REFERENCE_OPS
                 else "yes" if hasattr(torch.ops.dynexec, f"triton_{op}") else "missing")
                for op in OPS]
    return [(op, "yes") for op in OPS]


def _conv_report() -> str:
    from .runtime.program import (
        onednn_direct_available,
        onednn_packing_available,
        resolve_conv_impl,
        winograd_available,
    )
    version = int(torch.ops.dynexec.onednn_version()) if onednn_direct_available() else 0
    onednn = (f"available (oneDNN {version // 10000}.{version // 100 % 100}.{version % 100})"
              if version else "unavailable (dynexec._C built without oneDNN)")
    winograd = (f"available (tile products: {torch.ops.dynexec.winograd_isa()})" if winograd_available()
                else "unavailable (needs oneDNN and AVX2 + FMA)")
    return (f"auto -> {resolve_conv_impl('auto')}; winograd {winograd}; onednn {onednn}; "
            f"mkldnn {'available' if onednn_packing_available() else 'unavailable'}; aten available")


def report() -> str:
    lines = [f"dynexec {__version__}  torch {torch.__version__}  python {platform.python_version()}"
             f"  CPU ISA {torch.backends.cpu.get_cpu_capability()}",
             f"CUDA available: {torch.cuda.is_available()}"
             f" (torch built with CUDA {torch.version.cuda})",
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}", ""]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        status = backend_status(device)
        lines.append(f"device {device}:")
        for name in BACKENDS:
            ok, reason = status[name]
            lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {reason}")
            ops = ", ".join(f"{op}={state}" for op, state in _op_rows(name, ok))
            lines.append(f"          ops: {ops}")
        ok, reason = graph_backend_status(torch.device(device))
        lines.append(f"  triton-graph {'available' if ok else 'unavailable'}: {reason}")
        lines.append(f"  auto -> {get_backend('auto', device).name}")
    lines.append(f"CPU float32 convolutions: {_conv_report()}")
    if not torch.cuda.is_available():
        lines.append("device cuda: not available (no CUDA device or CPU-only torch)")
    return "\n".join(lines)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
