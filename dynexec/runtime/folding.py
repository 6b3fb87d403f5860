"""Eval-mode BatchNorm folded into the convolution before it: the one implementation every
executor uses.

    conv(x) -> BN  ==  conv'(x) with  w' = w * s,  b' = beta + (b - mean) * s,
                                       s = gamma / sqrt(var + eps)

computed in float64, then cast, so folding changes results only by float rounding. A
BatchNorm without affine parameters has gamma = 1, beta = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.common import ConvBN, HeadView, StemView


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of ``conv`` followed by the eval-mode ``bn``."""
    kh, kw = conv.kernel_size
    if conv.groups != 1 or conv.dilation != (1, 1) or kh != kw or conv.stride[0] != conv.stride[1] \
            or conv.padding[0] != conv.padding[1] or conv.padding_mode != "zeros":
        raise TypeError(f"cannot fold {conv}: only square, ungrouped, undilated, zero-padded "
                        f"convolutions are folded")
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        raise TypeError(f"expected a BatchNorm2d with running statistics after {conv}, got {bn}")
    scale = bn.running_var.detach().double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.detach().double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().double()
    return conv.weight.detach().double() * scale.view(-1, 1, 1, 1), bias


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with its BatchNorm folded in and an optional ReLU.

    ``packed`` is the weight pre-reordered for torch's oneDNN op ('mkldnn' convolutions):
    F.conv2d reorders the plain weight on every call, 15-30 us per convolution, which
    weighs most on the small sub-batches of routed blocks.
    """
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int
    relu: bool
    packed: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], 1,
                "none", [], "")
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        # Not oneDNN's fused ReLU: it maps NaN to 0, the official models propagate NaN.
        return torch.relu_(y) if self.relu else y

    def add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += conv(x), in place: the add happens in the conv's epilogue and no
        output is allocated (a fresh 4-8 MB tensor per block costs more than the add).
        The caller must own ``residual``. No ReLU here: oneDNN's fused ReLU maps NaN to 0."""
        if self.relu:
            raise ValueError("add_ is for the last convolution of a branch (no own ReLU)")
        if self.packed is not None:
            torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, self.packed, self.bias, [self.padding] * 2, [self.stride] * 2,
                [1, 1], 1, "add", None, None, [], None)
            return residual
        return residual.add_(self(x))

    def packed_for_mkldnn(self) -> "FoldedConv":
        """This conv on weights packed for torch's oneDNN op when it is a CPU float32 conv."""
        if not self.is_cpu_float32:
            return self
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.to_mkldnn(), [self.padding] * 2, [self.stride] * 2, [1, 1], 1)
        return FoldedConv(self.weight, self.bias, self.stride, self.padding, self.relu, packed)

    @property
    def is_cpu_float32(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype == torch.float32


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> FoldedConv:
    """conv -> eval-mode BN (-> ReLU) as one FoldedConv in the conv's dtype."""
    weight, bias = fold_batchnorm(conv, bn)
    dtype = conv.weight.dtype
    return FoldedConv(weight.to(dtype).contiguous(), bias.to(dtype), conv.stride[0], conv.padding[0], relu)


class FoldedChain:
    """A sequence of folded convs: the branch or the projection shortcut of a block, or a
    stem's convolution. ``fused`` is the whole chain as one dynexec oneDNN object
    (torch.classes.dynexec.OneDnnChain, convolutions 'onednn' or 'winograd'), which also
    runs the regrouping steps around the chain in one call each (``rows_add_relu_`` ...)."""

    def __init__(self, convs: list[FoldedConv], fused: Optional[object] = None):
        self.convs = tuple(convs)
        self.fused = fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.forward(x)
        for conv in self.convs:
            x = conv(x)
        return x

    def add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += chain(x), in place, fused into the last convolution."""
        if self.fused is not None:
            return self.fused.add_(x, residual)
        for conv in self.convs[:-1]:
            x = conv(x)
        return self.convs[-1].add_(x, residual)

    def packed(self, impl: str) -> "FoldedChain":
        """This chain on the weights of convolution implementation ``impl`` ('winograd',
        'onednn', 'mkldnn' or 'aten') when all its convs are CPU float32 convs; otherwise
        unchanged."""
        if impl == "aten" or not all(c.is_cpu_float32 for c in self.convs):
            return self
        # (OneDnnChain is conv, ReLU, ..., conv; other chains take torch's oneDNN op)
        if impl == "mkldnn" or not all(c.relu for c in self.convs[:-1]):
            return FoldedChain([c.packed_for_mkldnn() for c in self.convs])
        fused = torch.classes.dynexec.OneDnnChain(
            [c.weight for c in self.convs], [c.bias for c in self.convs],
            [c.stride for c in self.convs], [c.padding for c in self.convs], self.convs[-1].relu)
        if impl == "winograd":
            fused.enable_winograd()
        return FoldedChain(self.convs, fused)


def fold_layers(layers: tuple[ConvBN, ...], last_relu: bool = False) -> FoldedChain:
    """(conv, BN) pairs, a ReLU after each but the last (after the last too with
    ``last_relu``), as one FoldedChain."""
    last = len(layers) - 1
    return FoldedChain([fold_conv_bn(conv, bn, relu=i < last or last_relu)
                        for i, (conv, bn) in enumerate(layers)])


class FoldedStem:
    """pre -> conv with BN folded and ReLU -> post."""

    def __init__(self, view: StemView, impl: str):
        self.conv = fold_layers(((view.conv, view.bn),), last_relu=True).packed(impl)
        self.pre, self.post = view.pre, view.post

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        x = self.conv(x)
        return self.post(x) if self.post is not None else x


class FoldedHead:
    """Global average pooling -> linear (-> sigmoid) as one kernel, dynexec::pooled_linear,
    on CPU float32 maps of the pooled size; anything else takes the model's own head. The
    C++ executor (BlockLoop.set_head) runs the same kernel, so both give the same bits."""

    def __init__(self, view: HeadView, fallback: Callable[[torch.Tensor], torch.Tensor]):
        linear = view.linear
        self.pool = view.pool.kernel_size
        self.weight = linear.weight.detach().clone().contiguous()
        self.bias = (linear.bias.detach().clone() if linear.bias is not None
                     else torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                      device=linear.weight.device))
        self.sigmoid = view.sigmoid
        self.fallback = fallback

    @staticmethod
    def foldable(view: Optional[HeadView]) -> bool:
        """A square, unpadded, non-overlapping window (the whole map at the model's size)."""
        if view is None:
            return False
        pool = view.pool
        k = pool.kernel_size
        return (isinstance(k, int) and pool.stride in (k, (k, k)) and pool.padding in (0, (0, 0))
                and not pool.ceil_mode and pool.divisor_override is None)

    @property
    def is_cpu_float32(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype == torch.float32

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if (h.device.type == "cpu" and h.dtype == torch.float32 == self.weight.dtype and h.dim() == 4
                and h.shape[2] == h.shape[3] == self.pool):
            return torch.ops.dynexec.pooled_linear(h, self.weight, self.bias, self.sigmoid)
        return self.fallback(h)
