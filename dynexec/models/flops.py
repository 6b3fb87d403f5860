"""FLOPs per block and the speedup they promise, plus the papers' official metrics.

FLOPs are 2 x multiply-accumulates of convolutions and linear layers, counted per
component with ``torch.utils.flop_counter.FlopCounterMode`` on one sample: stem, each
block's branch and shortcut, each gate evaluation or the policy, and the head.

- dense FLOPs: the backbone with every block executed (stem + branches + shortcuts + head);
- executed FLOPs of a sample: what actually ran for it, gates or policy included;
- theoretical speedup = dense FLOPs / mean executed FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import RoutedModel, run_block_dense


def _lstm_flops(input_shape, hx_shapes, param_shapes, has_biases, num_layers, dropout, train,
                bidirectional, batch_first, *, out_shape=None) -> int:
    """aten.lstm.input, which FlopCounterMode does not count: per time step, sample, layer
    and direction the two gate matrix products, 2 x (4H x I + 4H x H) (elementwise gate
    math uncounted, as for every other layer)."""
    steps, batch = (input_shape[1], input_shape[0]) if batch_first else (input_shape[0], input_shape[1])
    per_layer = 4 if has_biases else 2  # w_ih, w_hh[, b_ih, b_hh] per layer and direction
    total = 0  # (the parameter list holds one set per layer and direction)
    for k in range(0, len(param_shapes), per_layer):
        w_ih, w_hh = param_shapes[k], param_shapes[k + 1]
        total += 2 * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])
    return total * steps * batch


# FlopCounterMode looks the overload up (to decide whether to decompose it) and then the
# overload packet (to count it), so both keys are registered.
_CUSTOM_FLOPS = {torch.ops.aten.lstm.input: _lstm_flops, torch.ops.aten.lstm: _lstm_flops}


def _count(fn, *args) -> tuple[int, object]:
    # inference_mode: nn.LSTM then reaches the mode as aten.lstm (with autograd on, CPU
    # dispatches it to mkldnn_rnn_layer and CUDA to cuDNN, which no formula covers).
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        out = fn(*args)
    return int(counter.get_total_flops()), out


@dataclass(frozen=True)
class FlopTable:
    stem: int
    head: int
    branch: tuple[int, ...]      # per block, when executed
    shortcut: tuple[int, ...]    # per block, always paid (0 for identity / DownsampleB)
    gate: tuple[int, ...]        # per gate evaluation that takes effect (online routers)
    policy: int                  # planned routers: the policy network, once per sample

    @property
    def num_blocks(self) -> int:
        return len(self.branch)

    @property
    def dense(self) -> int:
        """FLOPs of the backbone with every block executed (no gates, no policy)."""
        return self.stem + self.head + sum(self.branch) + sum(self.shortcut)

    @property
    def router(self) -> int:
        return sum(self.gate) + self.policy

    def executed(self, routing: torch.Tensor) -> np.ndarray:
        """FLOPs per sample for a routing [N, K] (bool), gates or policy included."""
        r = _as_numpy_routing(routing, self.num_blocks)
        fixed = self.stem + self.head + sum(self.shortcut) + self.router
        return fixed + r.astype(np.int64) @ np.asarray(self.branch, dtype=np.int64)

    def theoretical_speedup(self, routing: torch.Tensor) -> float:
        executed = self.executed(routing)
        if executed.size == 0:
            return float("nan")
        return self.dense / float(executed.mean())


def _as_numpy_routing(routing, k: int) -> np.ndarray:
    r = routing.detach().cpu().numpy() if isinstance(routing, torch.Tensor) else np.asarray(routing)
    if r.ndim != 2 or r.shape[1] != k:
        raise ValueError(f"routing must have shape [N, {k}], got {r.shape}")
    return r.astype(bool)


def count_flops(model: RoutedModel) -> FlopTable:
    """Count the FLOPs of every component of ``model`` on one sample."""
    param = next(model.parameters())
    x = torch.zeros((1, model.in_channels, model.input_size, model.input_size),
                    dtype=param.dtype, device=param.device)
    with torch.inference_mode():
        stem, h = _count(model.stem, x)
        branch, shortcut, gate = [], [], []
        outputs = []
        for view in model.block_views():
            b, _ = _count(view.branch, h)
            s = 0 if view.shortcut is None else _count(view.shortcut, h)[0]
            branch.append(b)
            shortcut.append(s)
            h = run_block_dense(view, h)
            outputs.append(h)
        head, _ = _count(model.head, h)
        policy = 0
        if model.router == "online":
            state = model.gate_init_state(1, h)
            gates = model.gates()
            # Gate k reads block k's output and decides block k+1; the last gate is unused.
            for k in range(len(outputs) - 1):
                g, (_, state) = _count(model.gate_step, gates[k], outputs[k], state)
                gate.append(g)
        elif model.router == "planned":
            policy, _ = _count(model.policy_probs, x)
    return FlopTable(stem, head, tuple(branch), tuple(shortcut), tuple(gate), policy)


# --------------------------------------------------------------------------------------
# Official metrics
# --------------------------------------------------------------------------------------
def skipnet_computation_percentage(routing: torch.Tensor) -> float:
    """SkipNet's "computation percentage" (``validate`` in the official ``train_rl.py``):
    every block counts equally and block 0 always runs: 100 * (1 + sum_k (1 - s_k)) / B."""
    r = _as_numpy_routing(routing, routing.shape[1])
    if r.shape[0] == 0:
        return float("nan")
    b = r.shape[1]
    return 100.0 * (1.0 + r[:, 1:].mean(axis=0).sum()) / b


def blockdrop_stats(routing: torch.Tensor, table: FlopTable) -> dict[str, float]:
    """BlockDrop test.py statistics (``utils.performance_stats``): block usage mean and
    unbiased std, FLOPs/img mean and population std, number of unique policies."""
    r = _as_numpy_routing(routing, table.num_blocks)
    usage = r.sum(axis=1).astype(np.float64)
    flops = table.executed(r).astype(np.float64)
    unique = len({row.tobytes() for row in r})
    return {
        "block_usage_mean": float(usage.mean()) if usage.size else float("nan"),
        "block_usage_std": float(usage.std(ddof=1)) if usage.size > 1 else float("nan"),
        "flops_mean": float(flops.mean()) if flops.size else float("nan"),
        "flops_std": float(flops.std()) if flops.size else float("nan"),
        "unique_policies": unique,
    }
