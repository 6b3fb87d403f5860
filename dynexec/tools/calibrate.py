"""Calibrating a router's bias so that a model executes a chosen fraction of its blocks.

Used to give random-weight models realistic routing (e.g. SkipNet-110 HRL executes
49.5 % of its blocks, BlockDrop R110 16.9 of 54), labelled ``calibrated`` wherever the
numbers are reported; and by the tests to get mixed, all-on and all-off routings.
"""
from __future__ import annotations

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


@torch.no_grad()
def calibrate(model: RoutedModel, x: torch.Tensor, target: float, *, iters: int = 16,
              span: float = 20.0, edge_iters: int = 10) -> float:
    """Shift the router bias so that the executed fraction on ``x`` is close to ``target``
    (bisection on one common offset). Returns the fraction reached."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a fraction in [0, 1], got {target}")
    biases = _router_bias(model)
    base = [b.detach().clone() for b in biases]

    def routing_at(offset: float) -> torch.Tensor:
        for b, b0 in zip(biases, base):
            b.copy_(b0 + offset)
        return model.forward_routing(x)[1]

    if target >= 1.0 or target <= 0.0:
        return routing_at(span * 10 if target >= 1.0 else -span * 10).float().mean().item()
    lo, hi = -span, span
    best, best_err = 0.0, float("inf")
    for _ in range(iters):
        mid = (lo + hi) / 2
        frac = routing_at(mid).float().mean().item()
        if abs(frac - target) < best_err:
            best, best_err = mid, abs(frac - target)
        if frac < target:
            lo = mid
        else:
            hi = mid
    # Bisection ends next to an offset where some decision flips, i.e. with a probability
    # right at the threshold. Move to the middle of the offsets giving the same routing, so
    # that float rounding elsewhere cannot flip a decision.
    routing = routing_at(best)
    same = lambda offset: torch.equal(routing_at(offset), routing)
    left = _edge(same, best, best - 1.0, edge_iters)
    right = _edge(same, best, best + 1.0, edge_iters)
    return routing_at((left + right) / 2).float().mean().item()


def _edge(same, inside: float, outside: float, iters: int) -> float:
    """Bisect for the boundary between an offset where ``same`` holds and one where it
    does not (returns ``outside`` when ``same`` holds there too)."""
    if same(outside):
        return outside
    for _ in range(iters):
        mid = (inside + outside) / 2
        if same(mid):
            inside = mid
        else:
            outside = mid
    return inside


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
