"""Tests of torch.classes.dynexec.OneDnnChain (dynexec's own oneDNN convolutions and the
per-block steps around them) against F.conv2d / plain torch composites computed in
float64, on fresh seeded random data: sub-batches of every size incl. empty, single and
odd, first calls at one size then others (the primitives and the weight layout are
cached per geometry), NCHW / channels_last / non-contiguous inputs, strided and 1x1
convolutions, 2- and 3-convolution chains, NaN propagation through the ReLUs, routed
steps with none / one / some / all rows, concurrent calls, and bad arguments."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import dynexec  # noqa: F401  (loads dynexec._C)
from dynexec.runtime.program import onednn_direct_available, winograd_available

pytestmark = pytest.mark.skipif(not onednn_direct_available(),
                                reason="dynexec._C was built without oneDNN (see setup.py)")
CL = torch.channels_last
TOL = dict(rtol=1e-4, atol=1e-4)
# Every chain test runs on oneDNN's convolutions and, where this CPU has AVX2 and FMA, with
# the eligible 3x3 stride-1 convolutions on dynexec's Winograd kernel (enable_winograd).
WINOGRAD = [False] + ([True] if winograd_available() else [])


def make_chain(channels, strides, paddings, kernels, relu_last=False, seed=0, winograd=False):
    """A random chain: conv i maps channels[i] -> channels[i+1]; with ``winograd``, its
    eligible convolutions run on the Winograd kernel (checked: as many as expected)."""
    gen = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for i, k in enumerate(kernels):
        fan_in = channels[i] * k * k
        weights.append(torch.randn(channels[i + 1], channels[i], k, k, generator=gen) / fan_in ** 0.5)
        biases.append(torch.randn(channels[i + 1], generator=gen) * 0.1)
    chain = torch.classes.dynexec.OneDnnChain(weights, biases, list(strides), list(paddings), relu_last)
    if winograd:
        eligible = sum(k == 3 and s == 1 and p == 1 and channels[i] % 8 == 0 and channels[i + 1] % 16 == 0
                       for i, (k, s, p) in enumerate(zip(kernels, strides, paddings)))
        assert chain.enable_winograd() == eligible == chain.winograd_convs()
    return chain, (weights, biases, strides, paddings, relu_last)


def reference(spec, x):
    weights, biases, strides, paddings, relu_last = spec
    y = x.double()
    for i, (w, b, s, p) in enumerate(zip(weights, biases, strides, paddings)):
        y = F.conv2d(y, w.double(), b.double(), s, p)
        if i + 1 < len(weights) or relu_last:
            y = y.relu()
    return y


BASIC = dict(channels=(16, 16, 16), strides=(1, 1), paddings=(1, 1), kernels=(3, 3))
DOWN = dict(channels=(16, 32, 32), strides=(2, 1), paddings=(1, 1), kernels=(3, 3))
BOTTLENECK = dict(channels=(24, 8, 8, 24), strides=(1, 1, 1), paddings=(0, 1, 0), kernels=(1, 3, 1))
SHAPES = {"basic": (BASIC, 16, 9), "down": (DOWN, 16, 9), "bottleneck": (BOTTLENECK, 24, 7)}


def _x(n, c, size, seed=1, layout="cl"):
    x = torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))
    if layout == "cl":
        return x.contiguous(memory_format=CL)
    if layout == "strided":  # every other row of a larger batch, channels_last
        return torch.randn(2 * n, c, size, size).contiguous(memory_format=CL)[::2].copy_(x)
    return x


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["cl", "nchw", "strided"])
@pytest.mark.parametrize("winograd", WINOGRAD)
def test_forward_matches_conv2d_for_every_sub_batch_size(shape, layout, winograd):
    spec_kw, c, size = SHAPES[shape]
    chain, spec = make_chain(**spec_kw, seed=3, winograd=winograd)
    for n in (5, 1, 0, 2, 7, 16, 3):  # first call at 5: the weight layout is chosen there
        x = _x(n, c, size, seed=n, layout=layout)
        y = chain.forward(x)
        assert y.shape == reference(spec, x).shape
        assert y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y.double(), reference(spec, x), **TOL)


def test_stem_chain_applies_its_last_relu_and_refuses_adds():
    chain, spec = make_chain((3, 8), (1,), (1,), (3,), relu_last=True, seed=4)
    x = _x(4, 3, 11)
    torch.testing.assert_close(chain.forward(x).double(), reference(spec, x), **TOL)
    assert (chain.forward(x) >= 0).all()
    with pytest.raises(RuntimeError, match="ends in a ReLU"):
        chain.add_(x, torch.zeros(4, 8, 11, 11).contiguous(memory_format=CL))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("residual_layout", ["cl", "nchw"])
@pytest.mark.parametrize("winograd", WINOGRAD)
def test_add_and_add_relu_and_pool_in_place(shape, residual_layout, winograd):
    spec_kw, c, size = SHAPES[shape]
    chain, spec = make_chain(**spec_kw, seed=5, winograd=winograd)
    for n in (3, 1, 8, 0):
        x = _x(n, c, size, seed=10 + n)
        ref = reference(spec, x)
        residual = torch.randn(ref.shape, generator=torch.Generator().manual_seed(n))
        residual = residual.contiguous(memory_format=CL) if residual_layout == "cl" else residual
        expect = residual.double() + ref
        r = residual.clone()
        assert chain.add_(x, r) is not None
        torch.testing.assert_close(r.double(), expect, **TOL)
        r = residual.clone()
        chain.add_relu_(x, r)
        torch.testing.assert_close(r.double(), expect.relu(), **TOL)
        r = residual.clone()
        pooled = torch.full((n, ref.shape[1]), float("nan"))
        chain.add_relu_pool_(x, r, pooled)
        torch.testing.assert_close(r.double(), expect.relu(), **TOL)
        torch.testing.assert_close(pooled.double(), expect.relu().mean((2, 3)), **TOL)


@pytest.mark.parametrize("rows", ["none", "one", "some", "all"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("winograd", WINOGRAD)
def test_routed_step_touches_only_the_routed_rows(rows, pool, winograd):
    chain, spec = make_chain(**BASIC, seed=6, winograd=winograd)
    n, c, size = 9, 16, 9
    gen = torch.Generator().manual_seed(7)
    mask = {"none": torch.zeros(n, dtype=torch.bool), "one": torch.arange(n) == 4,
            "some": torch.rand(n, generator=gen) < 0.5, "all": torch.ones(n, dtype=torch.bool)}[rows]
    idx, _ = torch.ops.dynexec.partition(mask)
    count = int(mask.sum())
    h = _x(n, c, size, seed=8)
    out = h.clone()
    expect = h.double().clone()
    if count:
        active = idx[:count]
        expect[active] = (expect[active] + reference(spec, h[active])).relu()
    pooled = torch.full((n, c), -7.0)
    if pool:
        chain.rows_add_relu_pool_(h, idx, count, out, pooled)
    else:
        chain.rows_add_relu_(h, idx, count, out)
    torch.testing.assert_close(out.double(), expect, **TOL)
    if pool:
        skipped = ~mask
        assert (pooled[skipped] == -7.0).all()
        torch.testing.assert_close(pooled[mask].double(), expect[mask].mean((2, 3)), **TOL)


@pytest.mark.parametrize("winograd", WINOGRAD)
def test_routed_step_in_place_on_its_own_input(winograd):
    """The engine scatters an identity block's result into the block input itself."""
    chain, spec = make_chain(**BASIC, seed=9, winograd=winograd)
    h = _x(6, 16, 8, seed=2)
    idx, _ = torch.ops.dynexec.partition(torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool))
    expect = h.double().clone()
    expect[idx[:4]] = (expect[idx[:4]] + reference(spec, h[idx[:4]])).relu()
    chain.rows_add_relu_(h, idx, 4, h)
    torch.testing.assert_close(h.double(), expect, **TOL)


@pytest.mark.parametrize("winograd", WINOGRAD)
def test_nan_propagates_through_every_relu(winograd):
    chain, _ = make_chain(**BASIC, seed=10, winograd=winograd)
    x = _x(2, 16, 8)
    x[0, 3, 4, 4] = float("nan")
    y = chain.forward(x)
    assert y[0].isnan().any() and not y[1].isnan().any()
    r = torch.zeros_like(y)
    chain.add_relu_(x, r)
    assert r[0].isnan().any() and not r[1].isnan().any()


@pytest.mark.parametrize("winograd", WINOGRAD)
def test_concurrent_calls_from_two_threads(winograd):
    chain, spec = make_chain(**BASIC, seed=11, winograd=winograd)
    errors = []

    def work(seed):
        try:
            for i in range(20):
                x = _x(1 + (seed + i) % 7, 16, 8, seed=seed * 100 + i)
                torch.testing.assert_close(chain.forward(x).double(), reference(spec, x), **TOL)
        except Exception as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_bad_arguments_name_what_was_expected():
    chain, _ = make_chain(**BASIC, seed=12)
    OneDnnChain = torch.classes.dynexec.OneDnnChain
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    with pytest.raises(RuntimeError, match="one weight, bias, stride and padding per convolution"):
        OneDnnChain([w, w], [b], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="float32 CPU weight"):
        OneDnnChain([w.double()], [b], [1], [1], False)
    with pytest.raises(RuntimeError, match=r"float32 CPU bias \[16\]"):
        OneDnnChain([w], [torch.randn(15)], [1], [1], False)
    with pytest.raises(RuntimeError, match="stride >= 1"):
        OneDnnChain([w], [b], [0], [1], False)
    with pytest.raises(RuntimeError, match="expects 8 input channels but conv 0 outputs 16"):
        OneDnnChain([w, torch.randn(16, 8, 3, 3)], [b, b], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"float32 CPU input \[N, 16, H, W\]"):
        chain.forward(torch.randn(2, 8, 8, 8))
    with pytest.raises(RuntimeError, match="float32 CPU input"):
        chain.forward(torch.randn(2, 16, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        too_small = OneDnnChain([torch.randn(4, 4, 5, 5)], [torch.randn(4)], [1], [0], False)
        too_small.forward(torch.randn(1, 4, 3, 3))
    x = _x(2, 16, 8)
    with pytest.raises(RuntimeError, match=r"residual of shape \[2, 16, 8, 8\]"):
        chain.add_(x, torch.zeros(2, 16, 4, 4))
    single, _ = make_chain((16, 16), (1,), (1,), (3,), seed=13)
    with pytest.raises(RuntimeError, match="single memory location"):
        single.add_(x, x)  # the residual would be overwritten while the conv reads it
    idx = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="gather_rows"):
        chain.rows_add_relu_(x, idx, 2, x.clone())


@pytest.mark.parametrize("winograd", WINOGRAD)
def test_routed_pooled_step_refuses_repeated_rows(winograd):
    """A row routed twice would be updated twice; the pooled step (in the Winograd
    kernel's output pass or in the separate scatter) says which row repeats."""
    chain, _ = make_chain(**BASIC, seed=14, winograd=winograd)
    h = _x(4, 16, 8, seed=3)
    out, pooled = h.clone(), torch.zeros(4, 16)
    with pytest.raises(RuntimeError, match="distinct rows, but row 2 appears more than once"):
        chain.rows_add_relu_pool_(h, torch.tensor([0, 2, 2, 1]), 3, out, pooled)
    torch.testing.assert_close(out, h, rtol=0, atol=0)  # nothing written


# ---------------------------------------------------------------- BlockLoop, built by hand
# The C++ block loop runs branches on NHWC sub-batches in reused workspace buffers with
# the regrouping kernels called directly (no per-call checks); these tests build loops
# from chains directly, so that every shortcut kind, a one-convolution branch on its own
# residual, any routing and bad inputs are covered without a model around them.

def _block_loop(seed=20):
    """Blocks: basic identity, one-conv identity, projection (16 -> 32, stride 2),
    basic identity at 32, DownsampleB (32 -> 64, stride 2). Returns the loop and the
    float64 reference of each block as (branch spec, shortcut)."""
    loop = torch.classes.dynexec.BlockLoop()
    specs = []
    basic16, s1 = make_chain(**BASIC, seed=seed)
    loop.add_block(basic16, None, 0)
    specs.append((s1, None))
    single, s2 = make_chain((16, 16), (1,), (1,), (3,), seed=seed + 1)
    loop.add_block(single, None, 0)
    specs.append((s2, None))
    down, s3 = make_chain(**DOWN, seed=seed + 2)
    proj, sp = make_chain((16, 32), (2,), (0,), (1,), seed=seed + 3)
    loop.add_block(down, proj, 0)
    specs.append((s3, ("projection", sp)))
    basic32, s4 = make_chain((32, 32, 32), (1, 1), (1, 1), (3, 3), seed=seed + 4)
    loop.add_block(basic32, None, 0)
    specs.append((s4, None))
    down64, s5 = make_chain((32, 64, 64), (2, 1), (1, 1), (3, 3), seed=seed + 5)
    loop.add_block(down64, None, 64)
    specs.append((s5, ("downsample_b", 64)))
    return loop, specs


def _loop_reference(specs, x, routing):
    h = x.double()
    for k, (spec, shortcut) in enumerate(specs):
        if shortcut is None:
            out = h.clone()
        elif shortcut[0] == "projection":
            out = reference(shortcut[1], h)
        else:
            out = torch.ops.dynexec.downsample_b(h, shortcut[1])
        rows = routing[:, k]
        out[rows] = (out[rows] + reference(spec, h[rows])).relu()
        h = out
    return h


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_block_loop_matches_reference_for_every_shortcut_and_routing(shards, layout):
    loop, specs = _block_loop()
    loop.set_shards(shards)
    gen = torch.Generator().manual_seed(7)
    for n in (5, 1, 8, 3, 0, 2):
        x = _x(n, 16, 8, seed=30 + n, layout=layout)
        for routing in (torch.ones(n, 5, dtype=torch.bool), torch.zeros(n, 5, dtype=torch.bool),
                        torch.rand(n, 5, generator=gen) < 0.5):
            y = loop.forward(x.clone(), routing)[0]
            assert y.shape == (n, 64, 2, 2) and y.is_contiguous(memory_format=CL)
            torch.testing.assert_close(y.double(), _loop_reference(specs, x, routing), **TOL)


def test_block_loop_rejects_inputs_its_blocks_cannot_take():
    loop, _ = _block_loop()
    every = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"expected an input \[N, 16, H, W\].*got \[2, 8, 8, 8\]"):
        loop.forward(torch.randn(2, 8, 8, 8), every)
    with pytest.raises(RuntimeError, match="expected a float32 CPU input"):
        loop.forward(torch.randn(2, 16, 8, 8, dtype=torch.float64), every)
    with pytest.raises(RuntimeError, match="expected a float32 CPU input"):
        loop.forward(torch.randn(2, 16, 8), every)
    # a block whose input channels do not follow from the previous block's output
    bad = torch.classes.dynexec.BlockLoop()
    bad.add_block(make_chain(**BASIC, seed=1)[0], None, 0)
    bad.add_block(make_chain((32, 32, 32), (1, 1), (1, 1), (3, 3), seed=2)[0], None, 0)
    with pytest.raises(RuntimeError, match=r"expected an input \[N, 32, H, W\].*got \[2, 16, 8, 8\]"):
        bad.forward(_x(2, 16, 8), torch.ones(2, 2, dtype=torch.bool))
    # a shortcut whose output does not match the branch's
    mismatched = torch.classes.dynexec.BlockLoop()
    mismatched.add_block(make_chain(**DOWN, seed=3)[0], None, 48)
    with pytest.raises(RuntimeError, match="shortcut gives"):
        mismatched.forward(_x(2, 16, 8), torch.ones(2, 1, dtype=torch.bool))
