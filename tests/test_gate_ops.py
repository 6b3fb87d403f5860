"""Tests of the SkipNet gate ops, scatter_residual_relu_pool_, relu_pool_ and recurrent_gate_step, on
every backend available here (native C++, Triton under the interpreter, the torch
reference), against simple independent references computed in float64 on fresh seeded
random data: all counts (none, one, some, all), odd sizes, NCHW / channels_last /
non-dense layouts, float32 and float64 (float16 / bfloat16 with loose tolerances), the
pooled rows outside idx left untouched, bad arguments and torch.library.opcheck.

Random data comes from the ``rng`` fixture (tests/conftest.py): drawn anew on every run,
its seed shown in the header and in failure reports (DYNEXEC_TEST_SEED replays a run)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dynexec.runtime.ops import backend_status, get_backend

BACKENDS = ("native", "triton", "torch")
ERRORS = (RuntimeError, ValueError)
CL = torch.channels_last
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def backend(name):
    ok, reason = backend_status("cpu")[name]
    if not ok:
        pytest.skip(f"backend {name} is not available here: {reason}")
    return get_backend(name, "cpu")


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-12),
            torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, dict(rtol=2e-2, atol=2e-2))


# ------------------------------------------------------------------ scatter_residual_relu_pool_
def make_out(shape, dtype, layout, g):
    """A random 4-D `out` of logical `shape` in one of several memory layouts, drawn from
    the generator `g`."""
    n, c, h, w = shape
    if layout == "contiguous":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif layout == "channels_last":
        x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    elif layout == "slice":  # every other channel of a wider tensor: rows not dense
        x = torch.randn((n, 2 * c, h, w), generator=g, dtype=torch.float64)[:, ::2]
    elif layout == "transposed":  # H and W swapped in memory
        x = torch.randn((n, c, w, h), generator=g, dtype=torch.float64).transpose(2, 3)
    else:
        raise ValueError(layout)
    out = x.to(dtype)
    assert out.shape == shape
    return out


def expected_pool(out, y, idx, count, pooled):
    """Row by row: out[r] = relu(y[i] + out[r]) (in out's dtype, like the scatter) and
    pooled[r] = the float64 mean of the new row, rounded once."""
    out, pooled = out.clone(), pooled.clone()
    for i, r in enumerate(idx[:count].tolist()):
        out[r] = torch.relu(y[i] + out[r])
        pooled[r] = out[r].double().mean(dim=(1, 2)).to(pooled.dtype)
    return out, pooled


def check_pool(ops, out, y, idx, count):
    n, c = out.shape[:2]
    pooled = torch.full((n, c), -7.0, dtype=out.dtype)
    want_out, want_pooled = expected_pool(out, y, idx, count, pooled)
    scattered = out.clone()
    scatter = ops.scatter_residual_relu_
    if ops.name == "triton" and not (out.is_contiguous() or out.is_contiguous(memory_format=CL)):
        scatter = get_backend("torch").scatter_residual_relu_  # (Triton's needs dense rows)
    scatter(scattered, y, idx, count)
    ptr, strides = out.data_ptr(), out.stride()
    assert ops.scatter_residual_relu_pool_(out, y, idx, count, pooled) is None
    assert out.data_ptr() == ptr and out.stride() == strides  # in place
    assert torch.equal(out, want_out)
    assert torch.equal(out, scattered)  # the same out as scatter_residual_relu_
    torch.testing.assert_close(pooled, want_pooled, equal_nan=True, **_tol(out.dtype))
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx[:count]] = False
    assert (pooled[untouched] == -7.0).all()


def counts(n, g):
    """None, one, all and a random number of the n rows."""
    return sorted({0, 1, n, int(torch.randint(0, n + 1, (1,), generator=g))})


SHAPES = [(1, 3, 5, 5), (7, 5, 3, 9), (8, 16, 8, 8), (5, 4, 1, 1), (3, 17, 2, 3)]
LAYOUTS = ["contiguous", "channels_last", "slice", "transposed"]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_pool_matches_reference(name, dtype, layout, rng):
    ops = backend(name)
    for shape in SHAPES:
        n = shape[0]
        for count in counts(n, rng):
            out = make_out(shape, dtype, layout, rng)
            y = torch.randn((count + 1,) + shape[1:], generator=rng, dtype=dtype)
            idx = torch.cat([torch.randperm(n, generator=rng)[:count],
                             torch.tensor([n + 3, -1])])  # entries past count are ignored
            check_pool(ops, out, y, idx, count)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scatter_pool_low_precision(name, dtype, layout, rng):
    ops = backend(name)
    out = make_out((6, 5, 4, 3), dtype, layout, rng)
    y = torch.randn((4, 5, 4, 3), generator=rng).to(dtype)
    check_pool(ops, out, y, torch.randperm(6, generator=rng)[:4], 4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scatter_pool_stage_shape(name, layout, rng):
    """SkipNet's stage-1 shape (H * W = 1024 values per mean), half the rows."""
    ops = backend(name)
    out = make_out((64, 16, 32, 32), torch.float32, layout, rng)
    y = torch.randn((32, 16, 32, 32), generator=rng)
    check_pool(ops, out, y, torch.randperm(64, generator=rng), 32)


def test_scatter_pool_native_threads(rng):
    """Enough work for at::parallel_for to split it: every sum stays within one task."""
    ops = backend("native")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for layout in ("contiguous", "channels_last"):
            out = make_out((48, 24, 16, 16), torch.float32, layout, rng)
            y = torch.randn((40, 24, 16, 16), generator=rng)
            check_pool(ops, out, y, torch.randperm(48, generator=rng), 40)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", BACKENDS)
def test_scatter_pool_empty_planes(name):
    """H * W == 0: the mean of nothing is NaN, as out.mean((2, 3)) gives."""
    ops = backend(name)
    out = torch.randn(4, 3, 0, 5)
    pooled = torch.zeros(4, 3)
    ops.scatter_residual_relu_pool_(out, torch.randn(2, 3, 0, 5), torch.tensor([2, 0]), 2, pooled)
    assert torch.isnan(pooled[[0, 2]]).all() and (pooled[[1, 3]] == 0).all()


def _pool_args(**override):
    args = dict(out=torch.randn(5, 3, 4, 4), y=torch.randn(3, 3, 4, 4), idx=torch.tensor([4, 0, 2]),
                count=3, pooled=torch.zeros(5, 3))
    args.update(override)
    return args


POOL_ERRORS = {
    "pooled_shape": (dict(pooled=torch.zeros(5, 4)), r"pooled.*shape.*\[5, 3\].*\[5, 4\]"),
    "pooled_rows": (dict(pooled=torch.zeros(4, 3)), r"pooled.*shape.*\[5, 3\].*\[4, 3\]"),
    "pooled_dtype": (dict(pooled=torch.zeros(5, 3, dtype=torch.float64)),
                     r"pooled.*dtype.*(Float|float32).*(Double|float64)"),
    "pooled_strided": (dict(pooled=torch.zeros(3, 5).t()), r"contiguous.*strides"),
    "pooled_meta": (dict(pooled=torch.zeros(5, 3, device="meta")), r"device|meta"),
    "out_3d": (dict(out=torch.randn(5, 3, 4), y=torch.randn(3, 3, 4)), r"4-D.*5, 3, 4"),
    "duplicate_idx": (dict(idx=torch.tensor([4, 0, 4])), r"distinct|duplicate"),
    "idx_out_of_range": (dict(idx=torch.tensor([4, 0, 5])), r"out of range|\[0, 5\)"),
    "y_shape": (dict(y=torch.randn(3, 3, 4, 5)), r"shape"),
    "count_too_large": (dict(count=6, idx=torch.arange(6), y=torch.randn(6, 3, 4, 4)), r"count"),
}


@pytest.mark.parametrize("case", sorted(POOL_ERRORS))
@pytest.mark.parametrize("name", BACKENDS)
def test_scatter_pool_bad_arguments(name, case):
    """A clear error naming what was expected and what was given; nothing is modified."""
    ops = backend(name)
    override, pattern = POOL_ERRORS[case]
    args = _pool_args(**override)
    before = {k: args[k].clone() for k in ("out", "pooled") if args[k].device.type != "meta"}
    with pytest.raises(ERRORS, match=pattern):
        ops.scatter_residual_relu_pool_(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"a rejected call modified {k}"


# ------------------------------------------------------------------ relu_pool_
def expected_relu_pool(x):
    """x with its negative entries set to 0 (NaN and -0.0 kept) and the float64 mean of
    each new (n, c) plane, rounded once to x's dtype."""
    new = x.clone()
    new[new < 0] = 0
    return new, new.double().mean(dim=(2, 3)).to(x.dtype)


def check_relu_pool(ops, x):
    want_x, want_pooled = expected_relu_pool(x)
    pooled = torch.full(x.shape[:2], -7.0, dtype=x.dtype)
    ptr, strides = x.data_ptr(), x.stride()
    assert ops.relu_pool_(x, pooled) is None
    assert x.data_ptr() == ptr and x.stride() == strides  # in place
    torch.testing.assert_close(x, want_x, rtol=0, atol=0, equal_nan=True)
    keep = ~torch.isnan(want_x)
    assert torch.equal(torch.signbit(x)[keep], torch.signbit(want_x)[keep])  # -0.0 stays -0.0
    assert pooled.is_contiguous() and pooled.shape == x.shape[:2]
    torch.testing.assert_close(pooled, want_pooled, equal_nan=True, **_tol(x.dtype))


RELU_POOL_SHAPES = [(0, 3, 4, 4), (1, 3, 5, 5), (7, 5, 3, 9), (8, 16, 8, 8), (5, 4, 1, 1),
                    (3, 17, 2, 3), (9, 2, 4, 1)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS + ["permuted"])
def test_relu_pool_matches_reference(name, dtype, layout, rng):
    ops = backend(name)
    for shape in RELU_POOL_SHAPES:
        if layout == "permuted":  # a view of a [C, N, W, H] tensor: no dense rows at all
            n, c, h, w = shape
            x = torch.randn((c, n, w, h), generator=rng, dtype=dtype).permute(1, 0, 3, 2)
        else:
            x = make_out(shape, dtype, layout, rng)
        check_relu_pool(ops, x)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_relu_pool_low_precision(name, dtype, layout, rng):
    check_relu_pool(backend(name), make_out((6, 5, 4, 3), dtype, layout, rng))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_pool_special_values(name, dtype, layout, rng):
    """NaN stays NaN in x and makes its plane's mean NaN; +-Inf, -0.0 as torch.relu_."""
    ops = backend(name)
    x = torch.randn((3, 4, 3, 5), generator=rng, dtype=torch.float64)
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    x[0, 2, 2, 4] = -float("inf")
    x[1, :, 0, :] = -0.0
    x[2, 3] = -0.0  # a whole plane of -0.0: mean 0
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    composite = x.clone()
    check_relu_pool(ops, x)
    assert torch.isnan(x[0, 0, 1, 2])
    torch.relu_(composite)  # the ops it replaces, for the record
    torch.testing.assert_close(x, composite, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_pool_stage_shape(name, layout, rng):
    """SkipNet's stage-1 block output at batch 64 (H * W = 1024 values per mean)."""
    check_relu_pool(backend(name), make_out((64, 16, 32, 32), torch.float32, layout, rng))


def test_relu_pool_native_threads_and_empty_planes(rng):
    ops = backend("native")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # enough work for at::parallel_for to split it
    try:
        for layout in ("contiguous", "channels_last", "slice"):
            check_relu_pool(ops, make_out((48, 24, 16, 16), torch.float32, layout, rng))
    finally:
        torch.set_num_threads(threads)
    pooled = torch.zeros(4, 3)
    ops.relu_pool_(torch.randn(4, 3, 0, 5), pooled)  # H * W == 0: NaN means, as in torch
    assert torch.isnan(pooled).all()


RELU_POOL_ERRORS = {
    "pooled_shape": (dict(pooled=torch.zeros(5, 4)), r"pooled.*shape.*\[5, 3\].*\[5, 4\]"),
    "pooled_rows": (dict(pooled=torch.zeros(4, 3)), r"pooled.*shape.*\[5, 3\].*\[4, 3\]"),
    "pooled_3d": (dict(pooled=torch.zeros(5, 3, 1)), r"pooled.*shape.*\[5, 3\].*\[5, 3, 1\]"),
    "pooled_dtype": (dict(pooled=torch.zeros(5, 3, dtype=torch.float64)),
                     r"pooled.*dtype.*(Float|float32).*(Double|float64)"),
    "pooled_strided": (dict(pooled=torch.zeros(3, 5).t()), r"contiguous.*strides"),
    "pooled_meta": (dict(pooled=torch.zeros(5, 3, device="meta")), r"device|meta"),
    "x_3d": (dict(x=torch.randn(5, 3, 4)), r"4-D.*5, 3, 4"),
    "x_int": (dict(x=torch.ones(5, 3, 4, 4, dtype=torch.int32),
                   pooled=torch.zeros(5, 3, dtype=torch.int32)), r"floating|float32.*int32"),
}


@pytest.mark.parametrize("case", sorted(RELU_POOL_ERRORS))
@pytest.mark.parametrize("name", BACKENDS)
def test_relu_pool_bad_arguments(name, case):
    """A clear error naming what was expected and what was given; nothing is modified."""
    ops = backend(name)
    override, pattern = RELU_POOL_ERRORS[case]
    args = dict(x=torch.randn(5, 3, 4, 4), pooled=torch.zeros(5, 3))
    args.update(override)
    before = {k: v.clone() for k, v in args.items() if v.device.type != "meta"}
    with pytest.raises(ERRORS, match=pattern):
        ops.relu_pool_(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"a rejected call modified {k}"


# ------------------------------------------------------------------ recurrent_gate_step
def gate_args(n, c, e, h, dtype, g):
    """Arguments at the scale of a trained gate: pooled >= 0 (means of ReLU outputs), weights
    ~ 1 / sqrt(fan_in), a nonzero recurrent state; drawn from the generator `g`."""

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return [torch.rand((n, c), generator=g, dtype=torch.float64).to(dtype) * 2,
            rnd(c, e, scale=c ** -0.5), rnd(e, scale=0.1),
            rnd(4 * h, e, scale=e ** -0.5), rnd(4 * h, h, scale=h ** -0.5),
            rnd(4 * h, scale=0.1), rnd(4 * h, scale=0.1),
            rnd(h, 1, scale=h ** -0.5), rnd(1, scale=0.1),
            rnd(n, h, scale=0.5), rnd(n, h)]


def expected_gate(pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b, hx, cx):
    """The gate step written out in float64 (no torch.lstm_cell / addmm)."""
    d = [t.double() for t in (pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b,
                              hx, cx)]
    pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b, hx, cx = d
    e = pooled @ embed_w + embed_b
    i, f, g, o = (e @ w_ih.t() + b_ih + hx @ w_hh.t() + b_hh).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return torch.sigmoid(h_new @ proj_w + proj_b).reshape(-1), h_new, c_new


def check_gate(ops, args):
    got = ops.recurrent_gate_step(*args)
    want = expected_gate(*args)
    n, h = args[-1].shape
    for g, w, shape in zip(got, want, [(n,), (n, h), (n, h)]):
        assert g.shape == shape and g.dtype == args[0].dtype and g.is_contiguous()
        torch.testing.assert_close(g.double(), w, **_tol(args[0].dtype))
    return got


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_step_matches_reference(name, dtype, rng):
    ops = backend(name)
    for n in (0, 1, 7, 64, 67):
        for c, e, h in ((16, 10, 10), (64, 10, 10), (33, 3, 5), (1, 1, 1)):
            check_gate(ops, gate_args(n, c, e, h, dtype, rng))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_step_low_precision(name, dtype, rng):
    check_gate(backend(name), gate_args(9, 16, 10, 10, dtype, rng))


def test_gate_step_native_agrees_with_composite(rng):
    """The native op against the composite it replaces (addmm, lstm_cell, addmm, sigmoid),
    including saturating gates (large pre-activations) and tiny ones. float32 rounding grows
    with the pre-activations (x scale), so the two may differ by that much; against the
    float64 gate, the native op is about as accurate as the composite."""
    native, composite = backend("native"), backend("torch")
    for scale in (1.0, 30.0, 1e-6):
        args = gate_args(19, 32, 10, 10, torch.float32, rng)
        args[0] = args[0] * scale
        args[9] = args[9] * scale
        want = expected_gate(*args)
        for g, c, w in zip(native.recurrent_gate_step(*args), composite.recurrent_gate_step(*args), want):
            torch.testing.assert_close(g, c, rtol=1e-5, atol=1e-6 * max(1.0, scale))
            native_err, composite_err = (g.double() - w).abs().max(), (c.double() - w).abs().max()
            assert native_err <= 4 * composite_err + 1e-7, (scale, native_err, composite_err)


def test_gate_step_native_strided_inputs_and_threads(rng):
    ops = backend("native")
    args = gate_args(300, 64, 10, 10, torch.float32, rng)
    want = expected_gate(*args)
    strided = list(args)
    strided[0] = args[0].repeat_interleave(2, dim=1)[:, ::2]  # not contiguous, same values
    strided[1] = args[1].t().contiguous().t()
    strided[9] = args[9].t().contiguous().t()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 300 samples are split over both threads
    try:
        got = ops.recurrent_gate_step(*strided)
    finally:
        torch.set_num_threads(threads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **_tol(torch.float32))


def _bad_gate(index, value):
    args = gate_args(3, 5, 4, 3, torch.float32, torch.Generator())  # (values do not matter)
    args[index] = value
    return args


GATE_ERRORS = {  # argument index, bad value, pattern
    "pooled_1d": (0, torch.rand(5), r"2-D.*\[5\]"),
    "pooled_int": (0, torch.ones(3, 5, dtype=torch.int64), r"floating"),
    "embed_w_channels": (1, torch.randn(6, 4), r"embed_w.*C=5.*\[6, 4\]"),
    "embed_b_shape": (2, torch.randn(3), r"embed_b.*\[E\] = \[4\].*\[3\]"),
    "w_ih_shape": (3, torch.randn(12, 5), r"w_ih.*\[4H, E\] = \[12, 4\].*\[12, 5\]"),
    "w_hh_shape": (4, torch.randn(12, 4), r"w_hh.*\[4H, H\] = \[12, 3\].*\[12, 4\]"),
    "b_hh_shape": (6, torch.randn(9), r"b_hh.*\[12\].*\[9\]"),
    "proj_w_transposed": (7, torch.randn(1, 3), r"proj_w.*\[H, 1\] = \[3, 1\].*\[1, 3\]"),
    "proj_b_shape": (8, torch.randn(2), r"proj_b.*\[1\].*\[2\]"),
    "hx_batch": (9, torch.randn(4, 3), r"hx.*N=3.*\[4, 3\]"),
    "hx_dtype": (9, torch.randn(3, 3, dtype=torch.float64), r"hx.*dtype.*(Float|float32).*(Double|float64)"),
    "cx_shape": (10, torch.randn(3, 2), r"cx.*\[N, H\] = \[3, 3\].*\[3, 2\]"),
}


@pytest.mark.parametrize("case", sorted(GATE_ERRORS))
@pytest.mark.parametrize("name", BACKENDS)
def test_gate_step_bad_arguments(name, case):
    index, value, pattern = GATE_ERRORS[case]
    with pytest.raises(ERRORS, match=pattern):
        backend(name).recurrent_gate_step(*_bad_gate(index, value))


# ------------------------------------------------------------------ opcheck
def _pool_case(shape, count, layout, dtype=torch.float32):
    """scatter_residual_relu_pool_'s arguments on fresh data: `count` of the rows of an
    `out` of `shape` in `layout`, two ignored garbage entries after idx[:count]."""
    def build(g):
        n, c = shape[:2]
        out = make_out(shape, dtype, layout, g)
        y = torch.randn((count, *shape[1:]), generator=g, dtype=dtype)
        idx = torch.cat([torch.randperm(n, generator=g)[:count], torch.tensor([n + 2, -1])])
        return out, y, idx, count, torch.zeros(n, c, dtype=dtype)
    return "scatter_residual_relu_pool_", build


def _gate_case(n, dtype=torch.float32):
    return "recurrent_gate_step", lambda g: tuple(gate_args(n, 8, 4, 3, dtype, g))


def _relu_pool_case(shape, layout, dtype=torch.float32):
    def build(g):
        if layout == "permuted":
            n, c, h, w = shape
            x = torch.randn((c, n, w, h), generator=g, dtype=dtype).permute(1, 0, 3, 2)
        else:
            x = make_out(shape, dtype, layout, g)
        return x, torch.zeros(shape[:2], dtype=dtype)
    return "relu_pool_", build


# name -> (op, builder(generator) -> args): none / one / some / all rows, odd sizes, empty
# batches, contiguous / channels_last / non-contiguous layouts, float32 and float64.
OPCHECK_CASES = {
    "pool-some-contiguous": _pool_case((5, 3, 4, 6), 3, "contiguous"),
    "pool-all-channels_last": _pool_case((5, 3, 4, 6), 5, "channels_last"),
    "pool-none": _pool_case((5, 3, 4, 6), 0, "contiguous"),
    "pool-single-odd-sizes": _pool_case((7, 3, 5, 3), 1, "contiguous"),
    "pool-some-noncontiguous-float64": _pool_case((6, 2, 3, 5), 4, "slice", torch.float64),
    "gate-float32": _gate_case(6),
    "gate-single": _gate_case(1),
    "gate-empty-float64": _gate_case(0, torch.float64),
    "relu_pool-contiguous": _relu_pool_case((5, 3, 4, 6), "contiguous"),
    "relu_pool-channels_last": _relu_pool_case((5, 3, 4, 6), "channels_last"),
    "relu_pool-noncontiguous-float64": _relu_pool_case((6, 2, 3, 3), "slice", torch.float64),
    "relu_pool-permuted-odd-sizes": _relu_pool_case((3, 5, 7, 1), "permuted"),
    "relu_pool-empty": _relu_pool_case((0, 3, 4, 6), "contiguous"),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_native(case, rng):
    backend("native")
    name, build = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(torch.ops.dynexec, name).default, build(rng))


TRITON_OPCHECK_CASES = sorted(c for c, (name, _) in OPCHECK_CASES.items() if name != "recurrent_gate_step")


@pytest.mark.parametrize("case", TRITON_OPCHECK_CASES)  # (Triton has no recurrent_gate_step)
def test_opcheck_triton(case, rng):
    backend("triton")
    name, build = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(torch.ops.dynexec, f"triton_{name}"), build(rng))


def test_pool_kernel_compiles_to_ptx_for_sm80():
    """The real (non-interpreted) Triton compiler takes the pool kernel down to PTX for an
    A100 target in a subprocess (no GPU needed): fp32/bf16 with a flat (h, w) plane,
    fp64/fp16 through (h, w) strides, and relu_pool_'s variant (no y, no idx). Skipped if
    this triton has no NVIDIA backend."""
    code = textwrap.dedent(
        """
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        import triton
        import triton.language as tl
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError as e:
            print("SKIP", e); raise SystemExit(0)
        from dynexec.kernels import regroup as rg
        ints = ["N", "C", "W", "HW", "count", "soc", "soh", "sow", "son", "syc", "syh", "syw", "syn"]
        consts = ["BLOCK_C", "BLOCK_HW", "FLAT_HW", "ACC_DTYPE", "UPCAST", "SOFT_BF16", "HAS_Y", "HAS_IDX"]
        # the scatter's variant (HAS_Y, HAS_IDX) and relu_pool_'s (neither)
        for dt, flat, has in (("fp32", True, True), ("bf16", True, True), ("fp64", False, True),
                              ("fp16", False, True), ("fp32", True, False), ("bf16", False, False)):
            sig = {"out_ptr": "*" + dt, "y_ptr": "*" + dt, "idx_ptr": "*i64", "pooled_ptr": "*" + dt}
            sig.update({a: "i32" for a in ints})
            sig.update({a: "constexpr" for a in consts})
            values = {"BLOCK_C": 16, "BLOCK_HW": 256, "FLAT_HW": flat, "UPCAST": dt in ("fp16", "bf16"),
                      "ACC_DTYPE": tl.float64 if dt == "fp64" else tl.float32, "SOFT_BF16": False,
                      "HAS_Y": has, "HAS_IDX": has}
            src = ASTSource(fn=rg._scatter_residual_relu_pool_kernel, signature=sig, constexprs=values)
            try:
                target = GPUTarget("cuda", 80, 32)
                ptx = triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]
            except Exception as e:  # no NVIDIA backend / ptxas in this build
                if "backend" in str(e).lower() or "ptxas" in str(e).lower():
                    print("SKIP", e); raise SystemExit(0)
                raise
            assert "ld.global" in ptx and "st.global" in ptx
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    if res.returncode == 0 and res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
