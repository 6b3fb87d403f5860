"""Fake (meta) kernels of the native ops, for FakeTensor / torch.compile / opcheck.

``register()`` is called by ``dynexec.runtime.ops.extension.load()`` once ``dynexec._C`` has defined
the schemas (registering a fake kernel needs the operator to exist); importing this
module alone registers nothing. Output shapes, dtypes and memory formats follow
``dynexec.runtime.ops.reference``.
"""
from __future__ import annotations

import torch

from .reference import _memory_format


def _check_idx_device(op: str, data: torch.Tensor, idx: torch.Tensor) -> None:
    torch._check(idx.device == data.device, lambda: (
        f"dynexec::{op}: expected idx on device {data.device} (the data tensor's device), "
        f"but got idx on {idx.device}"))
    torch._check(idx.dtype == torch.int64, lambda: (
        f"dynexec::{op}: expected idx of dtype torch.int64, but got {idx.dtype}"))


def _partition_fake(mask: torch.Tensor):
    n = mask.numel()
    idx = mask.new_empty((n,), dtype=torch.int64)
    count = mask.new_empty((), dtype=torch.int64)
    return idx, count


def _gather_rows_fake(x: torch.Tensor, idx: torch.Tensor, count):
    _check_idx_device("gather_rows", x, idx)
    torch._check(count >= 0)
    torch._check(count <= x.shape[0])
    return x.new_empty((count, *x.shape[1:])).contiguous(memory_format=_memory_format(x))


def _scatter_residual_relu_fake(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count):
    _check_idx_device("scatter_residual_relu_", out, idx)
    return None


def _check_pool_target_fake(op: str, arg: str, t: torch.Tensor, pooled: torch.Tensor) -> None:
    """The pooled ops' data tensor ``t`` (called ``arg``) is 4-D; pooled is [N, C] with its
    dtype and device."""
    torch._check(t.dim() == 4, lambda: (
        f"dynexec::{op}: expected a 4-D {arg} [N, C, H, W], but got shape {tuple(t.shape)}"))
    torch._check(pooled.dtype == t.dtype and pooled.device == t.device, lambda: (
        f"dynexec::{op}: expected pooled of dtype {t.dtype} on {t.device} ({arg}'s), but got "
        f"{pooled.dtype} on {pooled.device}"))
    torch._check(tuple(pooled.shape) == tuple(t.shape[:2]), lambda: (
        f"dynexec::{op}: expected pooled of shape [N, C] = {list(t.shape[:2])}, but got "
        f"{list(pooled.shape)}"))


def _scatter_residual_relu_pool_fake(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count,
                                     pooled: torch.Tensor):
    op = "scatter_residual_relu_pool_"
    _check_idx_device(op, out, idx)
    _check_pool_target_fake(op, "out", out, pooled)
    return None


def _relu_pool_fake(x: torch.Tensor, pooled: torch.Tensor):
    op = "relu_pool_"
    torch._check(x.dim() == 4, lambda: (
        f"dynexec::{op}: expected a 4-D x [N, C, H, W], but got shape {tuple(x.shape)}"))
    torch._check(x.is_floating_point(), lambda: (
        f"dynexec::{op}: expected a floating point x, but got {x.dtype}"))
    _check_pool_target_fake(op, "x", x, pooled)
    return None


def _recurrent_gate_step_fake(pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b,
                              hx, cx):
    torch._check(pooled.dim() == 2 and hx.dim() == 2, lambda: (
        f"dynexec::recurrent_gate_step: expected 2-D pooled [N, C] and hx [N, H], but got "
        f"shapes {list(pooled.shape)} and {list(hx.shape)}"))
    n, h = pooled.shape[0], hx.shape[1]
    return pooled.new_empty((n,)), pooled.new_empty((n, h)), pooled.new_empty((n, h))


def _downsample_b_fake(x: torch.Tensor, out_channels):
    n, _, h, w = x.shape
    z = x.new_empty((n, out_channels, h // 2, w // 2))
    return z.contiguous(memory_format=_memory_format(x))


def _pooled_linear_fake(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sigmoid: bool):
    torch._check(h.dim() == 4 and weight.dim() == 2 and weight.shape[1] == h.shape[1], lambda: (
        f"dynexec::pooled_linear: expected h [N, C, H, W] and weight [K, C], but got shapes "
        f"{list(h.shape)} and {list(weight.shape)}"))
    return h.new_empty((h.shape[0], weight.shape[0]))


def _winograd_weights_fake(weight: torch.Tensor):
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3), lambda: (
        f"dynexec::winograd_weights: expected a weight [K, C, 3, 3], but got shape {list(weight.shape)}"))
    return weight.new_empty((16, weight.shape[0] // 16, weight.shape[1], 16))


def _conv3x3_winograd_fake(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor):
    torch._check(x.dim() == 4 and weights.dim() == 4 and x.shape[1] == weights.shape[2], lambda: (
        f"dynexec::conv3x3_winograd: expected x [N, C, H, W] and weights [16, K / 16, C, 16], but got shapes "
        f"{list(x.shape)} and {list(weights.shape)}"))
    n, _, h, w = x.shape
    return x.new_empty((n, weights.shape[1] * 16, h, w)).contiguous(memory_format=torch.channels_last)


_FAKES = {
    "dynexec::partition": _partition_fake,
    "dynexec::gather_rows": _gather_rows_fake,
    "dynexec::scatter_residual_relu_": _scatter_residual_relu_fake,
    "dynexec::scatter_residual_relu_pool_": _scatter_residual_relu_pool_fake,
    "dynexec::relu_pool_": _relu_pool_fake,
    "dynexec::recurrent_gate_step": _recurrent_gate_step_fake,
    "dynexec::downsample_b": _downsample_b_fake,
    "dynexec::pooled_linear": _pooled_linear_fake,
    "dynexec::winograd_weights": _winograd_weights_fake,
    "dynexec::conv3x3_winograd": _conv3x3_winograd_fake,
}
_registered = False


def register() -> None:
    """Registers the fake kernels (idempotent). Requires dynexec._C to be loaded."""
    global _registered
    if _registered:
        return
    for name, fn in _FAKES.items():
        torch.library.register_fake(name, fn)
    _registered = True
