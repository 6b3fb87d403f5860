"""A Program's blocks for the Python loop: the regrouping steps of one residual block.

    rows_add_relu_(h, idx, count, out):  out[i] = relu(out[i] + branch(h[i])) for the
                                         routed rows i = idx[:count] (gather, branch on
                                         the sub-batch, fused scatter); other rows untouched

``ProgramBlock`` composes the branch with the op backend's gather and scatter;
``FusedProgramBlock`` hands each step to the branch's OneDnnChain, which runs the
gather, the convolutions and the scatter in one C++ call (native backend only). Which
one a block is gets decided once, when the model is lowered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops import Backend


@dataclass(frozen=True)
class ProgramBlock:
    branch: Callable[[torch.Tensor], torch.Tensor]
    shortcut_kind: str                      # 'identity' | 'projection' | 'downsample_b'
    shortcut: Optional[Callable[[torch.Tensor], torch.Tensor]]
    out_channels: int
    ops: Backend

    def shortcut_of(self, h: torch.Tensor) -> torch.Tensor:
        """The shortcut's output; for an identity shortcut h itself (the executor owns h)."""
        if self.shortcut_kind == "identity":
            return h
        if self.shortcut_kind == "downsample_b":
            return self.ops.downsample_b(h, self.out_channels)
        return self.shortcut(h)

    def _branch_add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += branch(x), in place (the caller owns ``residual``); fused into the
        last convolution when folded."""
        add_ = getattr(self.branch, "add_", None)
        if add_ is not None:
            return add_(x, residual)
        return residual.add_(self.branch(x))

    def add_relu_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual = relu(branch(x) + residual), in place."""
        return self._branch_add_(x, residual).relu_()

    def add_relu_pool_(self, x: torch.Tensor, residual: torch.Tensor,
                       pooled: torch.Tensor) -> torch.Tensor:
        """add_relu_, and pooled = the result's spatial mean [N, C]."""
        out = self._branch_add_(x, residual)
        self.ops.relu_pool_(out, pooled)
        return out

    def rows_add_relu_(self, h: torch.Tensor, idx: torch.Tensor, count: int,
                       out: torch.Tensor) -> torch.Tensor:
        """out[i] = relu(out[i] + branch(h[i])) for i in idx[:count]; other rows untouched."""
        y = self.branch(self.ops.gather_rows(h, idx, count))
        self.ops.scatter_residual_relu_(out, y, idx, count)
        return out

    def rows_add_relu_pool_(self, h: torch.Tensor, idx: torch.Tensor, count: int,
                            out: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """rows_add_relu_, and pooled[i] = out[i]'s spatial mean for the same rows."""
        y = self.branch(self.ops.gather_rows(h, idx, count))
        self.ops.scatter_residual_relu_pool_(out, y, idx, count, pooled)
        return out


@dataclass(frozen=True)
class FusedProgramBlock(ProgramBlock):
    """A block whose branch is a FoldedChain with a OneDnnChain (``branch.fused``): every
    step is one call into it, with the native ops (same kernels, same results)."""

    def add_relu_(self, x, residual):
        return self.branch.fused.add_relu_(x, residual)

    def add_relu_pool_(self, x, residual, pooled):
        return self.branch.fused.add_relu_pool_(x, residual, pooled)

    def rows_add_relu_(self, h, idx, count, out):
        return self.branch.fused.rows_add_relu_(h, idx, count, out)

    def rows_add_relu_pool_(self, h, idx, count, out, pooled):
        return self.branch.fused.rows_add_relu_pool_(h, idx, count, out, pooled)
