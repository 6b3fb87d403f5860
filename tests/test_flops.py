"""FLOPs per component and the official metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dynexec
from dynexec.models.flops import blockdrop_stats, count_flops, skipnet_computation_percentage


@pytest.mark.parametrize("name,dense,policy", [
    ("R110_C10", 505_775_360, 24_484_736),
    ("R32_C10", 137_725_184, 24_479_744),
    ("R110_C100", 505_786_880, 24_484_736),
    ("R101_ImgNet", 15_602_810_880, 471_918_592),
])
def test_blockdrop_tables_match_the_official_counts(name, dense, policy):
    table = count_flops(dynexec.build(name).eval())
    assert table.dense == dense
    assert table.policy == policy


def test_block_flops_and_executed():
    table = count_flops(dynexec.build("R110_C10").eval())
    assert table.branch[0] == 9_437_184 and table.branch[18] == 7_077_888
    assert table.stem + table.head == 886_016
    routing = torch.zeros(2, 54, dtype=torch.bool)
    routing[1, :] = True
    executed = table.executed(routing)
    assert executed[0] == 886_016 + 24_484_736
    assert executed[1] == 505_775_360 + 24_484_736
    assert table.theoretical_speedup(routing) == pytest.approx(505_775_360 / executed.mean())


def test_skipnet_gates_counted_per_decision():
    model = dynexec.build("cifar10_feedforward_110").eval()
    table = count_flops(model)
    assert len(table.gate) == 53 and table.policy == 0
    # FFGate-II at 16 channels, 32 px: 3x3 stride-2 conv to 16x16 plus the 1x1 to 2 logits.
    assert table.gate[0] == 2 * 16 * 16 * 9 * 16 * 16 + 2 * 16 * 2
    # Projection shortcuts of groups 2 and 3 always run.
    assert sum(table.shortcut) == 2 * 32 * 16 * 16 * 16 + 2 * 64 * 32 * 8 * 8


def test_recurrent_gate_counts_embedding_lstm_step_and_projection():
    """SkipNet's recurrent gate: the 1x1 embedding of the pooled block output, one LSTM
    step (2 x (4H x E + 4H x H), which FlopCounterMode does not know and dynexec.models.flops
    adds) and the projection."""
    model = dynexec.build("cifar10_rnn_gate_110").eval()
    table = count_flops(model)
    e = h = 10
    lstm = 2 * (4 * h * e + 4 * h * h)
    assert lstm == 1600
    assert table.gate[0] == 2 * 16 * e + lstm + 2 * h  # 16-channel group
    assert table.gate[-1] == 2 * 64 * e + lstm + 2 * h  # 64-channel group
    assert len(table.gate) == 53


def test_computation_percentage():
    routing = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    # skip rates: block1 0.5, block2 1.0, block3 0.5 -> 100 * (1 + 0.5 + 0 + 0.5) / 4
    assert skipnet_computation_percentage(routing) == pytest.approx(50.0)


def test_blockdrop_stats():
    table = count_flops(dynexec.build("R32_C10").eval())
    routing = torch.tensor([[1] * 15, [0] * 15, [1] * 15], dtype=torch.bool)
    stats = blockdrop_stats(routing, table)
    assert stats["unique_policies"] == 2
    assert stats["block_usage_mean"] == pytest.approx(10.0)
    assert stats["block_usage_std"] == pytest.approx(np.std([15, 0, 15], ddof=1))
    flops = table.executed(routing)
    assert stats["flops_std"] == pytest.approx(np.std(flops))
