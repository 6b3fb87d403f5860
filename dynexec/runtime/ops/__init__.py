"""The op layer: partition / gather_rows / scatter_residual_relu_ / downsample_b, and
for SkipNet's recurrent gate scatter_residual_relu_pool_ / relu_pool_ / recurrent_gate_step.

Three backends implement the same contract (see ``dynexec.runtime.ops.reference``):

- ``native``: the C++/CUDA extension ``dynexec._C`` (ops ``torch.ops.dynexec.*``);
- ``triton``: Triton kernels (``dynexec.kernels``); on CUDA, or on CPU tensors only under
  the Triton interpreter (``TRITON_INTERPRET=1``, for tests);
- ``torch``: the pure-PyTorch reference; runs anywhere.

The triton backend's ``recurrent_gate_step`` is the reference composite (addmm, lstm_cell,
addmm, sigmoid): the step is a few tiny products on [N, ~10] tensors, bound by kernel
launches rather than arithmetic, so a Triton kernel of its own would save a few launches at
most; the native op is the fused one.

``get_backend("auto", device)`` picks native on CPU and triton -> native -> torch on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

BACKENDS = ("native", "triton", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    partition: Callable
    gather_rows: Callable
    scatter_residual_relu_: Callable
    downsample_b: Callable
    scatter_residual_relu_pool_: Callable
    recurrent_gate_step: Callable
    relu_pool_: Callable


def _torch_backend() -> Backend:
    return Backend("torch", reference.partition, reference.gather_rows,
                   reference.scatter_residual_relu_, reference.downsample_b,
                   reference.scatter_residual_relu_pool_, reference.recurrent_gate_step,
                   reference.relu_pool_)


def _native_status(device: torch.device) -> tuple[bool, str]:
    try:
        from . import extension as _native
    except ImportError as exc:  # the loader module itself is missing
        return False, f"dynexec.runtime.ops.extension is unavailable: {exc}"
    module, reason = _native.load()
    if module is None:
        return False, reason or "the extension dynexec._C is not built"
    if device.type == "cuda" and _native.extension_cuda_version() == 0:
        return False, ("dynexec._C was built without CUDA kernels; rebuild on a machine with "
                       "CUDA torch and nvcc (DYNEXEC_CUDA=1 pip install -e . --no-build-isolation)")
    return True, "dynexec._C loaded"


def _native_backend() -> Backend:
    ops = torch.ops.dynexec
    return Backend("native", ops.partition, ops.gather_rows, ops.scatter_residual_relu_,
                   ops.downsample_b, ops.scatter_residual_relu_pool_, ops.recurrent_gate_step,
                   ops.relu_pool_)


def _triton_status(device: torch.device) -> tuple[bool, str]:
    try:
        from ...kernels import ops as triton_ops
    except Exception as exc:  # triton missing or broken: report, never crash
        return False, f"Triton kernels cannot be imported: {type(exc).__name__}: {exc}"
    ok, reason = triton_ops.is_available()
    if not ok:
        return False, reason
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    return True, reason or "triton available"


def _triton_backend() -> Backend:
    from ...kernels import ops as t
    return Backend("triton", t.partition, t.gather_rows, t.scatter_residual_relu_, t.downsample_b,
                   t.scatter_residual_relu_pool_, reference.recurrent_gate_step, t.relu_pool_)


def backend_status(device: torch.device | str = "cpu") -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for the given device."""
    device = torch.device(device)
    return {
        "native": _native_status(device),
        "triton": _triton_status(device),
        "torch": (True, "pure-PyTorch reference"),
    }


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    device = torch.device(device)
    status = backend_status(device)
    if name == "auto":
        order = ("native", "torch") if device.type == "cpu" else ("triton", "native", "torch")
        name = next(n for n in order if status[n][0])
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'triton-graph' or one of "
                         f"{list(BACKENDS)} "
                         f"(available here: {[n for n in BACKENDS if status[n][0]]})")
    ok, reason = status[name]
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available on {device}: {reason}")
    return {"native": _native_backend, "triton": _triton_backend, "torch": _torch_backend}[name]()
