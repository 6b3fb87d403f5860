"""Pure-PyTorch reference implementations of the regrouping ops.

These define the semantics every backend (native C++/CUDA, Triton) must reproduce.
Tests and benchmarks import them, so the reference lives in exactly one place.

Contract shared by all backends:
  partition(mask[N] bool) -> (idx[N] int64, count[] int64)
      idx is a permutation of 0..N-1: the rows with mask True in ascending order,
      followed by the rows with mask False in ascending order (stable). count is a
      0-dim int64 tensor on mask's device holding the number of True rows.
  gather_rows(x[N, ...], idx[M>=count] int64, count: int) -> y[count, ...]
      y[i] = x[idx[i]]; y keeps x's dtype, device and memory format (channels_last
      stays channels_last for 4-D input); y is always a fresh tensor.
  scatter_residual_relu_(out[N, ...], y[count, ...], idx[M>=count] int64, count: int) -> None
      out[idx[i]] = relu(y[i] + out[idx[i]]) for i < count, in place. Indices among
      idx[:count] must be distinct and in [0, N).
  downsample_b(x[N, C, H, W], out_channels: int) -> z[N, out_channels, H//2, W//2]
      BlockDrop's parameter-free CIFAR shortcut: 2x2 average pool (stride 2, floor),
      then the pooled channels followed by (out_channels // C - 1) copies of
      pooled * 0 (exact +0 for finite input; NaN/Inf propagate as in the official
      code); out_channels must be a positive multiple of C. z keeps x's memory format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask.reshape(-1).bool()
    active = torch.nonzero(mask, as_tuple=True)[0]
    inactive = torch.nonzero(~mask, as_tuple=True)[0]
    idx = torch.cat([active, inactive])
    count = torch.tensor(active.numel(), dtype=torch.int64, device=mask.device)
    return idx, count


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: int) -> torch.Tensor:
    y = x.index_select(0, idx[:count])
    return y.contiguous(memory_format=_memory_format(x))


def scatter_residual_relu_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int) -> None:
    rows = idx[:count]
    out.index_copy_(0, rows, torch.relu(y[:count] + out.index_select(0, rows)))


def downsample_b(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    pooled = F.avg_pool2d(x, 2)
    ratio = out_channels // x.shape[1]
    z = torch.cat([pooled] + [pooled.mul(0)] * (ratio - 1), dim=1)
    return z.contiguous(memory_format=_memory_format(x))
