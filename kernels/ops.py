"""Torch-op registration of the Triton regrouping kernels.

Ops (namespace ``dynexec``, distinct from the C++ extension's ``dynexec::partition`` &c.,
which live in the same namespace via ``TORCH_LIBRARY``; ``triton_op`` registers through a
library FRAGMENT, so both coexist):

* ``torch.ops.dynexec.triton_partition(mask) -> (idx, count)``
* ``torch.ops.dynexec.triton_gather_rows(x, idx, count) -> y``
* ``torch.ops.dynexec.triton_scatter_residual_relu_(out, y, idx, count) -> ()``  (mutates ``out``)
* ``torch.ops.dynexec.triton_scatter_residual_relu_pool_(out, y, idx, count, pooled) -> ()``
  (mutates ``out`` and ``pooled``)
* ``torch.ops.dynexec.triton_relu_pool_(x, pooled) -> ()`` (mutates ``x`` and ``pooled``)
* ``torch.ops.dynexec.triton_downsample_b(x, out_channels) -> z``

The plain functions :func:`partition`, :func:`gather_rows`, :func:`scatter_residual_relu_`,
:func:`scatter_residual_relu_pool_`, :func:`relu_pool_` and :func:`downsample_b` have the reference
signatures (``dynexec.runtime.ops.reference``) and call these ops. :func:`is_available` reports
whether they can run here.

Registration details (torch 2.13, triton 3.9):

* The ops are made with ``torch.library.triton_op``; it runs CPU tensors under the Triton
  interpreter in eager mode, so no ``custom_op`` fallback is needed.
* ``triton_op`` uses the op body itself as the fake (meta) kernel. That relies on
  ``wrap_triton`` turning launches into a traceable higher-order op; under
  ``TRITON_INTERPRET=1`` ``wrap_triton`` returns the InterpretedFunction unchanged, so a
  fake-tensor trace would *execute* the kernel on fake tensors and crash. We therefore
  register explicit fake kernels (pure shape/dtype/layout logic) for every op.
* For the same reason, when the kernels are interpreted we register a
  ``FunctionalTensorMode`` rule that keeps the op opaque instead of decomposing it into
  its kernels (the decomposition is what lets Inductor see the kernels on GPU; on CUDA the
  default ``triton_op`` behaviour is kept). With both, ``torch.library.opcheck`` passes on
  CPU under the interpreter (see tests/test_triton_ops.py).
* The launchers are looked up on the ``regroup`` module at call time, so an
  ``importlib.reload(dynexec.kernels.regroup)`` (e.g. after setting TRITON_INTERPRET=1)
  takes effect without re-registering the ops.
"""
from __future__ import annotations

import os

import torch

__all__ = [
    "partition",
    "gather_rows",
    "scatter_residual_relu_",
    "scatter_residual_relu_pool_",
    "relu_pool_",
    "downsample_b",
    "is_available",
]

try:
    import triton  # noqa: F401

    from . import regroup as _rg

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing/broken: stay importable, report via is_available()
    _rg = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def is_available() -> tuple[bool, str]:
    """(True, reason) if triton imports and either a CUDA device exists or
    TRITON_INTERPRET=1 is set (CPU tensors via the interpreter); else (False, reason)."""
    if _rg is None:
        return False, f"triton cannot be imported: {_IMPORT_ERROR}"
    if torch.cuda.is_available():
        return True, "triton with CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device and TRITON_INTERPRET=1 is not set"


def _row_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


if _rg is not None:
    from torch.library import triton_op

    # ---- ops ------------------------------------------------------------------------
    @triton_op("dynexec::triton_partition", mutates_args=())
    def _triton_partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rg.partition(mask)

    @triton_op("dynexec::triton_gather_rows", mutates_args=())
    def _triton_gather_rows(x: torch.Tensor, idx: torch.Tensor, count: int) -> torch.Tensor:
        return _rg.gather_rows(x, idx, count)

    @triton_op("dynexec::triton_scatter_residual_relu_", mutates_args=("out",))
    def _triton_scatter_residual_relu_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                                       count: int) -> None:
        _rg.scatter_residual_relu_(out, y, idx, count)

    @triton_op("dynexec::triton_scatter_residual_relu_pool_", mutates_args=("out", "pooled"))
    def _triton_scatter_residual_relu_pool_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                                            count: int, pooled: torch.Tensor) -> None:
        _rg.scatter_residual_relu_pool_(out, y, idx, count, pooled)

    @triton_op("dynexec::triton_relu_pool_", mutates_args=("x", "pooled"))
    def _triton_relu_pool_(x: torch.Tensor, pooled: torch.Tensor) -> None:
        _rg.relu_pool_(x, pooled)

    @triton_op("dynexec::triton_downsample_b", mutates_args=())
    def _triton_downsample_b(x: torch.Tensor, out_channels: int) -> torch.Tensor:
        return _rg.downsample_b(x, out_channels)

    # ---- fake kernels (shape/dtype/layout only; see module docstring) ---------------
    def _same_device(name: str, *tensors: torch.Tensor) -> None:
        # A meta tensor among real ones dispatches here instead of to the kernel: refuse
        # it like the kernels refuse mixed devices, never return a meaningless result.
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise RuntimeError(f"{name}: all tensors must be on the same device, got "
                               f"{', '.join(sorted(str(d) for d in devices))}")

    @_triton_partition.register_fake
    def _(mask):
        n = mask.numel()
        return (mask.new_empty((n,), dtype=torch.int64), mask.new_empty((), dtype=torch.int64))

    @_triton_gather_rows.register_fake
    def _(x, idx, count):
        _same_device("gather_rows", x, idx)
        if count < 0 or count > idx.numel():
            raise ValueError(f"gather_rows: count must be in [0, idx.numel() = {idx.numel()}], got {count}")
        return torch.empty((count,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                           memory_format=_row_format(x))

    @_triton_scatter_residual_relu_.register_fake
    def _(out, y, idx, count):
        _same_device("scatter_residual_relu_", out, y, idx)
        return None

    @_triton_scatter_residual_relu_pool_.register_fake
    def _(out, y, idx, count, pooled):
        _same_device("scatter_residual_relu_pool_", out, y, idx, pooled)
        return None

    @_triton_relu_pool_.register_fake
    def _(x, pooled):
        _same_device("relu_pool_", x, pooled)
        return None

    @_triton_downsample_b.register_fake
    def _(x, out_channels):
        n, c, h, w = x.shape
        return torch.empty((n, out_channels, h // 2, w // 2), dtype=x.dtype, device=x.device,
                           memory_format=_row_format(x))

    # ---- interpreter: keep ops opaque under functionalization -----------------------
    # Decided per call (not at import), so a later reload of ``regroup`` under
    # TRITON_INTERPRET=1 is honoured. On GPU, triton_op's own decomposition rule is used.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _make_functional_rule(op_def):
        default_rule = getattr(op_def, "_torch_dispatch_fns", {}).get(FunctionalTensorMode)

        def rule(mode, op, types, args, kwargs):
            if default_rule is None or _rg.kernels_interpreted():
                return mode.__torch_dispatch__(op, types, args, kwargs)
            return default_rule(mode, op, types, args, kwargs)

        return rule

    for _op in (_triton_partition, _triton_gather_rows, _triton_scatter_residual_relu_,
                _triton_scatter_residual_relu_pool_, _triton_relu_pool_, _triton_downsample_b):
        _op.register_torch_dispatch(FunctionalTensorMode, _make_functional_rule(_op))


# ---- public functions with the reference signatures ----------------------------------
def _ops():
    if _rg is None:
        raise RuntimeError("dynexec Triton kernels are unavailable: triton cannot be imported "
                           f"({_IMPORT_ERROR})")
    return torch.ops.dynexec


def partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable compaction of ``mask`` -> (idx int64[N], count int64[] on device)."""
    return _ops().triton_partition(mask)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: int) -> torch.Tensor:
    """``y[i] = x[idx[i]]`` for ``i < count``; y keeps x's memory format."""
    return _ops().triton_gather_rows(x, idx, count)


def scatter_residual_relu_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int) -> None:
    """``out[idx[i]] = relu(y[i] + out[idx[i]])`` for ``i < count``, in place."""
    _ops().triton_scatter_residual_relu_(out, y, idx, count)


def scatter_residual_relu_pool_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int,
                                pooled: torch.Tensor) -> None:
    """``scatter_residual_relu_`` plus ``pooled[idx[i]] = out[idx[i]].mean((H, W))``, in place."""
    _ops().triton_scatter_residual_relu_pool_(out, y, idx, count, pooled)


def relu_pool_(x: torch.Tensor, pooled: torch.Tensor) -> None:
    """``x = relu(x)`` and ``pooled = x.mean((H, W))`` in one pass, in place."""
    _ops().triton_relu_pool_(x, pooled)


def downsample_b(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """BlockDrop shortcut: 2x2 avg pool then zero channels up to ``out_channels``."""
    return _ops().triton_downsample_b(x, out_channels)
