"""The classifier head as one kernel (dynexec::pooled_linear, FoldedHead) and the whole
forward in C++ (BlockLoop.forward: stem, router, blocks and head shard by shard)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import dynexec
from dynexec.models.common import HeadView
from dynexec.runtime.folding import FoldedHead
from dynexec.runtime.ops import extension as _native
from dynexec.runtime.ops import reference as ref
from dynexec.runtime.program import build_cpu_loop

from conftest import make_model

_C, _REASON = _native.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"native extension dynexec._C is not available: {_REASON}")
needs_onednn = pytest.mark.skipif(not dynexec.runtime.program.onednn_direct_available(),
                                  reason="dynexec._C built without oneDNN")


def op(*args):
    return torch.ops.dynexec.pooled_linear(*args)


def _float64_reference(h, w, b, sigmoid):
    return ref.pooled_linear(h.double(), w.double(), b.double(), sigmoid)


@pytest.mark.parametrize("n,c,size,k", [(0, 16, 8, 10), (1, 1, 1, 1), (2, 3, 3, 5), (5, 64, 8, 54),
                                        (7, 17, 7, 1000), (3, 2048, 7, 10)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_pooled_linear_matches_the_reference(n, c, size, k, layout, sigmoid):
    gen = torch.Generator().manual_seed(n * 1000 + c + k)
    h = torch.randn(n, c, size + 1, size + 1, generator=gen)
    if layout == "sliced":  # non-contiguous in every format
        h = h[:, :, 1:, 1:]
    else:
        h = h[:, :, :size, :size].contiguous()
        if layout == "channels_last":
            h = h.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, generator=gen) / c ** 0.5, torch.randn(k, generator=gen)
    out = op(h, w, b, sigmoid)
    expected = _float64_reference(h, w, b, sigmoid)
    assert out.dtype == torch.float32 and out.shape == (n, k) and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_pooled_linear_rows_do_not_depend_on_the_batch():
    """Every row is computed alone, in a fixed order: the C++ forward's shards (any split)
    give the same bits as the whole batch."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(9, 64, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(10, 64, generator=gen), torch.randn(10, generator=gen)
    whole = op(h, w, b, False)
    for lo, hi in ((0, 1), (3, 4), (2, 9), (0, 5)):
        assert torch.equal(op(h[lo:hi], w, b, False), whole[lo:hi])


def test_pooled_linear_special_values():
    h = torch.randn(3, 4, 2, 2)
    h[1, 2, 0, 1] = float("nan")
    w, b = torch.randn(5, 4), torch.randn(5)
    out = op(h, w, b, True)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()
    big = torch.full((1, 4, 2, 2), 1e4)
    probs = op(big, torch.ones(2, 4), torch.tensor([0.0, -1e6]), True)
    assert probs.tolist() == [[1.0, 0.0]]  # sigmoid saturates without overflow to NaN


def test_pooled_linear_errors():
    h, w, b = torch.randn(2, 4, 3, 3), torch.randn(5, 4), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"expected a float32 feature map h \[N, C, H, W\], got Double"):
        op(h.double(), w, b, False)
    with pytest.raises(RuntimeError, match=r"feature map .* with shape \[2, 4, 9\]"):
        op(h.reshape(2, 4, 9), w, b, False)
    with pytest.raises(RuntimeError, match=r"expected a float32 weight \[K, 4\].*shape \[5, 3\]"):
        op(h, torch.randn(5, 3), b, False)
    with pytest.raises(RuntimeError, match=r"expected a float32 bias \[5\].*shape \[4\]"):
        op(h, w, torch.randn(4), False)
    with pytest.raises(RuntimeError, match=r"weight \[K, 4\].*got Double"):
        op(h, w.double(), b, False)


@pytest.mark.parametrize("args", [
    (torch.randn(3, 8, 4, 4), torch.randn(5, 8), torch.randn(5), False),
    (torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last), torch.randn(3, 8), torch.randn(3),
     True),
    (torch.randn(0, 8, 2, 2), torch.randn(3, 8), torch.randn(3), False),
])
def test_pooled_linear_opcheck(args):
    torch.library.opcheck(torch.ops.dynexec.pooled_linear.default, args)


# ---------------------------------------------------------------------- FoldedHead
def _head(pool: nn.AvgPool2d, sigmoid: bool = False, dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).to(dtype)

    def original(h):
        h = pool(h)
        out = linear(h.reshape(h.shape[0], -1))
        return torch.sigmoid(out) if sigmoid else out
    return HeadView(pool, linear, sigmoid), original


@pytest.mark.parametrize("sigmoid", [False, True])
def test_folded_head_equals_the_models_head(sigmoid):
    view, original = _head(nn.AvgPool2d(4), sigmoid)
    assert FoldedHead.foldable(view)
    head = FoldedHead(view, original)
    h = torch.randn(5, 6, 4, 4)
    torch.testing.assert_close(head(h), original(h), rtol=1e-5, atol=1e-6)
    # another map size, dtype or a non-CPU-float32 map: the model's own head, as is
    for other in (torch.randn(2, 6, 5, 5), torch.randn(2, 6, 4, 4).double()):
        fallback = FoldedHead(*_head(nn.AvgPool2d(4), sigmoid, other.dtype))
        assert torch.equal(fallback(other), fallback.fallback(other))


@pytest.mark.parametrize("pool", [nn.AvgPool2d(4, stride=2), nn.AvgPool2d(4, padding=1),
                                  nn.AvgPool2d(4, ceil_mode=True), nn.AvgPool2d(4, divisor_override=3),
                                  nn.AvgPool2d((4, 2))])
def test_folded_head_refuses_windows_that_are_not_the_whole_map(pool):
    assert not FoldedHead.foldable(HeadView(pool, nn.Linear(6, 4)))
    assert not FoldedHead.foldable(None)


@pytest.mark.parametrize("family,runs_at_half", [("skipnet-cifar-rnn", False), ("blockdrop-cifar", True)])
def test_decision_rule_is_the_official_one(family, runs_at_half):
    """SkipNet runs a block iff p > 0.5, BlockDrop keeps it iff p >= 0.5; NaN never runs."""
    model = make_model(family)
    p = torch.tensor([0.5, float("nan"), 0.49999997, 0.50000006, 0.0, 1.0])
    assert model.decide(p).tolist() == [runs_at_half, False, False, True, False, True]


@needs_onednn
@pytest.mark.parametrize("threshold,at_threshold", [(0.5, True), (0.5, False), (0.3, True), (0.7, False)])
def test_cpp_loop_applies_the_models_declared_rule(threshold, at_threshold):
    """The C++ loop decides with the rule the model declares (no rule of its own): with a
    changed threshold it gives the same routing as the model's decide."""
    model = make_model("blockdrop-cifar")
    model.threshold, model.runs_at_threshold = threshold, at_threshold
    engine = dynexec.compile(model, backend="native", convolutions="onednn")
    assert engine.program.cpu_loop.runs_policy
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _, routing = engine(x, return_routing=True)
    assert torch.equal(routing, model.decide(model.policy_probs(x)))
    skipnet = make_model("skipnet-cifar-rnn")
    skipnet.threshold, skipnet.runs_at_threshold = threshold, at_threshold
    got = dynexec.compile(skipnet, backend="native", convolutions="onednn")(x, return_routing=True)[1]
    assert torch.equal(got, skipnet.forward_routing(x)[1])


# ---------------------------------------------------------------------- whole forward
@needs_onednn
@pytest.mark.parametrize("family,whole,policy_in_loop", [
    ("skipnet-cifar-rnn", True, None), ("blockdrop-cifar", True, True), ("resnet-cifar", True, None),
    ("blockdrop-imagenet", False, False), ("skipnet-imagenet-basic", False, None)])
def test_whole_forward_in_cpp_where_the_program_allows(family, whole, policy_in_loop):
    """CIFAR programs run input -> logits in one C++ call. ImageNet stems end in a max-pool
    and the ImageNet BlockDrop policy pools its input first: those keep their Python stem
    around the C++ loop, which runs the head. Results equal the reference model either way."""
    model = make_model(family)
    engine = dynexec.compile(model, backend="native", convolutions="onednn")
    cpu = engine.program.cpu_loop
    assert cpu.runs_stem is whole and cpu.loop.has_stem() is whole
    assert cpu.runs_head and cpu.loop.has_head()
    if policy_in_loop is not None:
        assert cpu.runs_policy is policy_in_loop and cpu.loop.has_policy() is policy_in_loop
    x = torch.randn(3, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(2))
    logits, routing = engine(x, return_routing=True)
    ref_logits, ref_routing = model.forward_routing(x)
    assert torch.equal(routing, ref_routing)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())


@needs_onednn
def test_block_loop_forward_errors():
    engine = dynexec.compile(make_model("blockdrop-cifar"), backend="native", convolutions="onednn")
    loop, policy = engine.program.cpu_loop.loop, engine.program.policy.cpu_loop.loop
    bare = torch.classes.dynexec.BlockLoop()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"expected a float32 CPU input \[N, C, H, W\], got Double"):
        loop.forward(x.double(), torch.ones(2, engine.num_blocks, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"BlockLoop.forward: expected a bool routing \[2, \d+\]"):
        loop.forward(x, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError,
                       match="expected a loop without a router, with a stem and a head giving"):
        loop.set_policy(loop)  # it has a router of its own, and its head gives classes, not blocks
    with pytest.raises(RuntimeError,
                       match="expected a loop without a router, .* got a loop without a stem or head"):
        bare.set_policy(bare)
    router_without_rule = torch.classes.dynexec.BlockLoop()
    for b in engine.program.blocks:
        router_without_rule.add_block(b.branch.fused, None,
                                      b.out_channels if b.shortcut_kind == "downsample_b" else 0)
    router_without_rule.set_policy(policy)
    with pytest.raises(RuntimeError, match="has a router but no decision rule"):
        router_without_rule.forward(x, None)
    with pytest.raises(RuntimeError, match=r"BlockLoop.set_head: expected a float32 CPU weight \[K, C\]"):
        bare.set_head(torch.randn(3, 4), torch.randn(2), 8, False)
    # a head whose window is not the last map: a clear error, not a wrong mean
    head = engine.program.head
    loop.set_head(head.weight, head.bias, 4, False)
    with pytest.raises(RuntimeError,
                       match=r"the head pools a 4x4 map of 64 channels, but the last block gives"):
        loop.forward(x, None)
    assert policy.has_stem() and policy.has_head() and not policy.has_policy()


@needs_onednn
def test_whole_forward_equals_the_split_forward():
    """The whole forward (one C++ call) and the parts run one by one from Python (stem,
    loop, head; policy, decision, network) give the same bits."""
    model = make_model("blockdrop-cifar")
    engine = dynexec.compile(model, backend="native", convolutions="onednn")
    p = engine.program
    assert p.cpu_loop.runs_stem and p.cpu_loop.runs_head and p.cpu_loop.runs_policy
    # the same blocks in loops without a stem, head or policy
    split = dynexec.runtime.engine.Engine(dataclasses.replace(
        p, cpu_loop=build_cpu_loop(p.blocks, None, None, p.router, p.gates, 0, model, None),
        policy=dataclasses.replace(
            p.policy, cpu_loop=build_cpu_loop(p.policy.blocks, None, None, "none", None, 0, model, None))))
    assert not (split.program.cpu_loop.runs_stem or split.program.cpu_loop.runs_head
                or split.program.cpu_loop.runs_policy)
    gen = torch.Generator().manual_seed(9)
    for n in (1, 2, 5, 8):
        x = torch.randn(n, 3, 32, 32, generator=gen)
        if n == 5:
            x[2] = float("nan")
        for routing in (None, torch.rand(n, engine.num_blocks, generator=gen) < 0.5):
            (a, ra), (b, rb) = (e(x, return_routing=True, routing=routing) for e in (engine, split))
            assert torch.equal(ra, rb)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
