"""Online routers lowered for the Python loop: the gate after block k gives the
probability that block k + 1 runs."""
from __future__ import annotations

from typing import Callable

import torch

from ..models.common import RecurrentGateView, RoutedModel
from .ops import reference


class RecurrentGates:
    """SkipNet's recurrent gate, lowered: global average pool, the 1x1 embedding as a
    matrix product, one LSTM cell step, the projection and sigmoid — one
    ``recurrent_gate_step`` op per gate. The executor passes the pooled block output
    (``step_pooled``), which its fused scatter computes; ``step`` pools itself."""

    takes_pooled = True

    def __init__(self, view: RecurrentGateView):
        self.embed_w = [e.weight.detach().flatten(1).t().contiguous() for e in view.embeddings]
        self.embed_b = [e.bias.detach() for e in view.embeddings]
        rnn = view.lstm
        self.w_ih, self.w_hh = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach()
        self.b_ih, self.b_hh = rnn.bias_ih_l0.detach(), rnn.bias_hh_l0.detach()
        self.proj_w = view.proj.weight.detach().reshape(1, -1).t().contiguous()
        self.proj_b = view.proj.bias.detach()
        self.hidden = rnn.hidden_size

    def init_state(self, n: int, like: torch.Tensor):
        zeros = like.new_zeros((n, self.hidden))
        return zeros, zeros.clone()

    def step_pooled(self, k: int, pooled: torch.Tensor, state, gate_step: Callable):
        p, hx, cx = gate_step(pooled, self.embed_w[k], self.embed_b[k], self.w_ih, self.w_hh,
                              self.b_ih, self.b_hh, self.proj_w, self.proj_b, *state)
        return p, (hx, cx)

    def step(self, k: int, h: torch.Tensor, state):
        return self.step_pooled(k, h.mean(dim=(2, 3)), state, reference.recurrent_gate_step)


class ModuleGates:
    """Any other gate: the model's own modules through ``gate_step`` (feed-forward gates;
    every gate when BatchNorm is not folded)."""

    takes_pooled = False

    def __init__(self, model: RoutedModel):
        self.model = model
        self.gates = tuple(model.gates())

    def init_state(self, n: int, like: torch.Tensor):
        return self.model.gate_init_state(n, like)

    def step(self, k: int, h: torch.Tensor, state):
        return self.model.gate_step(self.gates[k], h, state)


def lower_gates(model: RoutedModel, fuse: bool):
    view = model.recurrent_gate_view() if fuse else None
    return RecurrentGates(view) if view is not None else ModuleGates(model)
