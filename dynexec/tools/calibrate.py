"""Calibrating a router's bias so that a model executes a chosen fraction of its blocks.

Used to give random-weight models realistic routing (e.g. SkipNet-110 HRL executes
49.5 % of its blocks, BlockDrop R110 16.9 of 54), labelled ``calibrated`` wherever the
numbers are reported; and by the tests to get mixed, all-on and all-off routings.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.blockdrop import BlockDrop
from ..models.common import RoutedModel
from ..models.skipnet import SkipNet


def _router_bias(model: RoutedModel) -> list[torch.Tensor]:
    """The bias entries that raise the probability of executing, one per decision layer."""
    if isinstance(model, BlockDrop):
        return [model.agent.logit.bias]
    if isinstance(model, SkipNet):
        if model.gate_type == "rnn":
            return [model.control.proj.bias]
        # Two-way softmax: raising logit 1 relative to logit 0 raises p(execute).
        return [g.linear_layer.bias[1:] for g in model.gates()]
    raise TypeError(f"{type(model).__name__} has no router to calibrate")


def _margin_layers(model: RoutedModel) -> list[tuple[nn.Module, Callable]]:
    """(module, margin of its output): a decision executes iff margin > 0 (SkipNet) or
    >= 0 (BlockDrop), and the router bias adds to every margin."""
    if isinstance(model, BlockDrop):
        return [(model.agent.logit, lambda y: y)]                       # p = sigmoid(y)
    if model.gate_type == "rnn":
        return [(model.control.proj, lambda y: y.reshape(y.shape[0]))]  # p = sigmoid(y)
    return [(g.linear_layer, lambda y: (y[:, 1] - y[:, 0]).reshape(y.shape[0])) for g in model.gates()]


def _routing_and_margins(model: RoutedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (routing [N, K], the margins of every decision it made, flattened)."""
    recorded = []
    hooks = [m.register_forward_hook(lambda _m, _i, y, f=f: recorded.append(f(y).double()))
             for m, f in _margin_layers(model)]
    try:
        routing = model.forward_routing(x)[1]
    finally:
        for h in hooks:
            h.remove()
    if isinstance(model, BlockDrop):
        return routing, recorded[0].flatten()
    # SkipNet: a margin per gate step (feed-forward gates: the hooks of the used gates)
    return routing, torch.stack(recorded[: model.num_blocks - 1], dim=1).flatten()


def _offset_for(margins: torch.Tensor, executed: int) -> float:
    """The offset midway between the margins where exactly ``executed`` of them (the
    largest) end up above 0 — as far from flipping any decision as these margins allow."""
    m = margins.sort(descending=True).values
    if executed <= 0:
        return float(-m[0] - 1.0)
    if executed >= m.numel():
        return float(-m[-1] + 1.0)
    return float(-(m[executed - 1] + m[executed]) / 2)


@torch.no_grad()
def calibrate(model: RoutedModel, x: torch.Tensor, target: float, *, tolerance: float = 0.005,
              max_passes: int = 12) -> float:
    """Shift the router bias by one common offset so that the executed fraction of the
    blocks on ``x`` is within ``tolerance`` of ``target`` (or as close as ``max_passes``
    forwards get). Returns the fraction reached.

    Each pass is one forward that records every decision's margin (the pre-activation the
    bias adds to); the next offset is set from their quantile. A policy network's margins
    do not depend on the routing (one pass settles it); a gate's margins depend on which
    blocks ran before it, so SkipNet's offset is refined inside the bracket of offsets
    known to execute too few and too many blocks (bisecting it when the guess leaves it). The
    offset ends midway between the margins nearest to 0, so float rounding elsewhere
    (folded BatchNorm, other kernels) cannot flip a decision."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a fraction in [0, 1], got {target}")
    biases = _router_bias(model)
    base = [b.detach().clone() for b in biases]

    def shift(offset: float) -> None:
        for b, b0 in zip(biases, base):
            b.copy_(b0 + offset)

    n, k = x.shape[0], model.num_blocks
    always = n if isinstance(model, SkipNet) else 0  # SkipNet's block 0 always runs
    wanted = round(target * n * k) - always
    lo, hi = -float("inf"), float("inf")  # offsets known to execute too few / enough blocks
    offset, best = 0.0, None              # best: (|executed - wanted|, offset keeping that routing)
    for _ in range(max_passes):
        shift(offset)
        routing, margins = _routing_and_margins(model, x)
        margins = margins - offset  # without this pass's shift
        executed = int(routing.sum()) - always
        if best is None or abs(executed - wanted) < best[0]:
            # the middle of the offsets that keep this routing (its margins are fixed)
            best = (abs(executed - wanted), _offset_for(margins, executed))
        if abs(executed - wanted) <= tolerance * n * k:
            break
        if executed < wanted:
            lo = max(lo, offset)
        else:
            hi = min(hi, offset)
        # Where these margins put the target; a gate's margins move with the routing, so
        # fall back to bisecting the bracket when the guess leaves it.
        offset = _offset_for(margins, wanted)
        if not lo < offset < hi:
            offset = (lo + hi) / 2 if lo > -float("inf") and hi < float("inf") else \
                (lo + 1.0 if hi == float("inf") else hi - 1.0)
    shift(best[1])
    return model.forward_routing(x)[1].float().mean().item()


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so
    that tests exercise BN folding and eval-mode normalisation for real."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=generator) * 0.8 + 0.6)
            m.bias.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
