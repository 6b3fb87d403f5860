"""Tests of the native extension dynexec._C (torch.ops.dynexec.*) against the reference.

Every op is compared BITWISE with dynexec.runtime.ops.reference on fresh random data (plus
-0.0 / NaN / Inf where it matters), across dtypes, NCHW / channels_last / non-contiguous
layouts, odd sizes and edge counts. The data comes from the ``rng`` fixture
(tests/conftest.py): drawn anew on every run, its seed shown in the header and in failure
reports (DYNEXEC_TEST_SEED replays a run). Error cases must raise RuntimeError with a message
naming what was expected and what was given. torch.library.opcheck checks the schemas
and fake kernels; hypothesis checks properties over random index lists and shapes.

Skipped (with the reason) only if the extension is not built / cannot be loaded.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynexec.runtime.ops import extension as _native
from dynexec.runtime.ops import reference as ref

_C, _REASON = _native.load()
pytestmark = pytest.mark.skipif(
    _C is None,
    reason=f"native extension dynexec._C is not available (build failed or not built): {_REASON}",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
             torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ops():
    return torch.ops.dynexec


# ------------------------------------------------------------------------ helpers
def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Bit-for-bit equality (so -0.0 != +0.0), except that NaN only has to be NaN: NaN
    payload bits are not even consistent within torch (its vectorised bfloat16 add
    returns 0xFFFF for NaN, its scalar tail loop 0x7FC0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.device == expected.device
    if actual.dtype in _INT_VIEW:
        nan = torch.isnan(actual)
        assert torch.equal(nan, torch.isnan(expected)), "NaN positions differ"
        a = actual.contiguous().view(_INT_VIEW[actual.dtype]).masked_fill(nan.contiguous(), 0)
        e = expected.contiguous().view(_INT_VIEW[expected.dtype]).masked_fill(nan.contiguous(), 0)
    else:
        a, e = actual, expected
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].tolist()
        raise AssertionError(f"not bitwise equal at {bad}: got {actual.flatten()[:8]}, "
                             f"expected {expected.flatten()[:8]}")


def assert_same_format(actual: torch.Tensor, expected: torch.Tensor):
    for fmt in (torch.contiguous_format, torch.channels_last) if expected.dim() == 4 else (
            torch.contiguous_format,):
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt), fmt


def make_x(shape, dtype, layout, gen=None):
    """Random tensor of logical `shape` in one of several memory layouts."""
    n = shape[0]
    if layout == "contiguous":
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    elif layout == "channels_last":
        assert len(shape) == 4
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":  # every other feature/channel: rows not dense
        wide = (n, shape[1] * 2, *shape[2:])
        x = torch.randn(wide, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
    elif layout == "batch_inner":  # batch not the outermost dim in memory
        x = torch.randn((*shape[1:], n), generator=gen, dtype=torch.float64).to(dtype)
        x = x.movedim(-1, 0)
    elif layout == "batch_strided":  # every other sample: dense rows, batch stride 2 rows
        x = torch.randn((2 * n, *shape[1:]), generator=gen, dtype=torch.float64).to(dtype)[::2]
    else:
        raise ValueError(layout)
    assert x.shape == torch.Size(shape)
    return x


def make_idx(n, count, extra=0, gen=None):
    """idx[:count] distinct rows in random order, then `extra` garbage entries."""
    perm = torch.randperm(n, generator=gen)[:count]
    tail = torch.randint(-5, n + 5, (extra,), generator=gen)
    return torch.cat([perm, tail]).to(torch.int64)


LAYOUTS_4D = ["contiguous", "channels_last", "slice", "batch_inner", "batch_strided"]
LAYOUTS_2D = ["contiguous", "slice", "batch_inner", "batch_strided"]
SHAPES = [(1, 3, 5, 5), (3, 1, 1, 1), (7, 5, 3, 9), (8, 16, 8, 8), (5, 2, 1, 7),
          (1, 17), (7, 33), (16, 256)]


def counts_for(n, gen):
    return sorted({0, 1, n, int(torch.randint(0, n + 1, (1,), generator=gen))} - {n + 1})


def cases():
    for shape in SHAPES:
        for layout in (LAYOUTS_4D if len(shape) == 4 else LAYOUTS_2D):
            yield shape, layout


# ------------------------------------------------------------------------ partition
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1001])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_partition_matches_reference(n, p, mask_dtype, rng):
    gen = rng
    mask = torch.rand(n, generator=gen) < p
    if mask_dtype == torch.uint8:
        mask = mask.to(torch.uint8) * torch.randint(1, 255, (n,), generator=gen, dtype=torch.uint8)
    idx, count = ops().partition(mask)
    ridx, rcount = ref.partition(mask)
    assert idx.dtype == torch.int64 and count.dtype == torch.int64
    assert idx.shape == (n,) and count.dim() == 0
    assert torch.equal(idx, ridx) and int(count) == int(rcount)


def test_partition_noncontiguous_mask(rng):
    mask = (torch.rand(40, generator=rng) < 0.5)[::3]
    idx, count = ops().partition(mask)
    ridx, rcount = ref.partition(mask)
    assert torch.equal(idx, ridx) and int(count) == int(rcount)


# ------------------------------------------------------------------------ gather
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
def test_gather_rows_matches_reference(shape, layout, dtype, rng):
    gen = rng
    x = make_x(shape, dtype, layout, gen)
    n = shape[0]
    for count in counts_for(n, gen):
        for extra in (0, 3):
            idx = make_idx(n, count, extra, gen)
            y = ops().gather_rows(x, idx, count)
            r = ref.gather_rows(x, idx, count)
            assert_bitwise_equal(y, r)
            assert_same_format(y, r)
            if count:
                assert y.data_ptr() != x.data_ptr()


def test_gather_rows_repeated_indices_and_fresh_output(rng):
    x = torch.randn(4, 3, 2, 2, generator=rng)
    idx = torch.tensor([2, 2, 0, 2])
    y = ops().gather_rows(x, idx, 4)
    assert_bitwise_equal(y, ref.gather_rows(x, idx, 4))
    y.zero_()
    assert x.abs().sum() > 0  # y does not alias x


@pytest.mark.parametrize("count", [1, 3, 64])
def test_gather_rows_large_rows(count, rng):
    x = torch.randn(64, 2048, 7, 7, generator=rng).contiguous(memory_format=torch.channels_last)
    idx = make_idx(64, count, 2, rng)
    assert_bitwise_equal(ops().gather_rows(x, idx, count), ref.gather_rows(x, idx, count))
    x = torch.randn(128, 16, 32, 32, generator=rng)
    idx = make_idx(128, count, gen=rng)
    assert_bitwise_equal(ops().gather_rows(x, idx, count), ref.gather_rows(x, idx, count))


def test_gather_rows_any_dtype(rng):
    # Rows are moved as bytes: integer and bool tensors work as well.
    for x in (torch.randint(-9, 9, (6, 5), generator=rng), torch.rand(6, 3, generator=rng) > 0.5,
              torch.randint(0, 9, (6, 2, 3), dtype=torch.uint8, generator=rng)):
        idx = make_idx(6, 4, 1, rng)
        assert torch.equal(ops().gather_rows(x, idx, 4), ref.gather_rows(x, idx, 4))


# ------------------------------------------------------------------------ scatter
def _check_scatter(out, y, idx, count):
    expected = out.clone()
    ref.scatter_residual_relu_(expected, y, idx, count)
    ptr, strides = out.data_ptr(), out.stride()
    assert ops().scatter_residual_relu_(out, y, idx, count) is None
    assert out.data_ptr() == ptr and out.stride() == strides  # modified in place
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", list(cases()))
def test_scatter_residual_relu_matches_reference(shape, layout, dtype, rng):
    gen = rng
    n = shape[0]
    for count in counts_for(n, gen):
        for y_layout in ("contiguous", layout if layout != "batch_strided" else "slice"):
            if count == 0 and y_layout != "contiguous":
                continue
            out = make_x(shape, dtype, layout, gen)
            y = make_x((max(count, 1), *shape[1:]), dtype, y_layout, gen)[:count]
            idx = make_idx(n, count, 2, gen)
            _check_scatter(out, y, idx, count)


def test_scatter_residual_relu_y_with_extra_rows(rng):
    out = torch.randn(6, 4, generator=rng)
    y = torch.randn(6, 4, generator=rng)  # more rows than count: only y[:count] is used
    _check_scatter(out, y, make_idx(6, 3, 1, rng), 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_residual_relu_special_values(dtype):
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0,
                             1e-30, -1e-30], dtype=torch.float64)
    a = specials.repeat_interleave(len(specials))
    b = specials.repeat(len(specials))
    out = a.reshape(9, 9).to(dtype)
    y = b.reshape(9, 9).to(dtype)[torch.tensor([3, 0, 8, 5])]
    _check_scatter(out, y, torch.tensor([3, 0, 8, 5]), 4)


def test_scatter_residual_relu_noncontiguous_out_writes_through(rng):
    base = torch.randn(7, 10, 3, 3, generator=rng)
    expected_base = base.clone()
    out = base[:, ::2]  # rows not dense: must still modify base itself
    y = torch.randn(4, 5, 3, 3, generator=rng)
    idx = make_idx(7, 4, gen=rng)
    ref.scatter_residual_relu_(expected_base[:, ::2], y, idx, 4)
    ops().scatter_residual_relu_(out, y, idx, 4)
    assert_bitwise_equal(base, expected_base)


@pytest.mark.parametrize("count", [1, 2, 64])
def test_scatter_residual_relu_large_rows(count, rng):
    out = torch.randn(64, 2048, 7, 7, generator=rng).contiguous(memory_format=torch.channels_last)
    _check_scatter(out, torch.randn(count, 2048, 7, 7, generator=rng), make_idx(64, count, 1, rng), count)
    out = torch.randn(128, 64, 8, 8, generator=rng)
    _check_scatter(out, torch.randn(count, 64, 8, 8, generator=rng), make_idx(128, count, gen=rng), count)


# ------------------------------------------------------------------------ downsample_b
def test_avg_pool_sum_order_is_bitwise_avg_pool2d(rng):
    """The kernels' 2x2 average, (((0 + tl) + tr) + bl) + br) * 0.25 in the accumulate type,
    is bitwise equal to F.avg_pool2d on CPU for float32 and float64 (including -0.0 windows,
    which is why the sum starts from +0)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 8, 10, 12, dtype=dtype, generator=rng) * torch.logspace(-30, 30, 12, dtype=dtype)
        x[0, 0, :2, :2] = -0.0
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            tl, tr = xx[:, :, 0::2, 0::2], xx[:, :, 0::2, 1::2]
            bl, br = xx[:, :, 1::2, 0::2], xx[:, :, 1::2, 1::2]
            manual = (((torch.zeros_like(tl) + tl) + tr) + bl + br) * 0.25
            assert_bitwise_equal(manual, F.avg_pool2d(xx, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "batch_inner"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 3, 5, 7), (7, 5, 9, 4), (2, 16, 32, 32),
                                   (4, 32, 16, 16), (3, 2, 3, 3), (2, 7, 2, 9)])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_downsample_b_matches_reference(shape, layout, dtype, ratio, rng):
    x = make_x(shape, dtype, layout, rng)
    z = ops().downsample_b(x, shape[1] * ratio)
    r = ref.downsample_b(x, shape[1] * ratio)
    assert_bitwise_equal(z, r)
    assert_same_format(z, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_downsample_b_special_values(dtype, channels_last, rng):
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=rng)
    x[0, 0, :2, :2] = -0.0
    x[0, 1, 0, 0] = float("nan")
    x[1, 2, 1, 1] = float("inf")
    x[1, 0, 2, 2:4] = -float("inf")
    x[1, 1] = -x[1, 1].abs()  # negative pooled values: their zero copies are -0.0
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_bitwise_equal(ops().downsample_b(x, 9), ref.downsample_b(x, 9))


def test_downsample_b_empty_batch():
    x = torch.randn(0, 4, 8, 8)
    z = ops().downsample_b(x, 8)
    assert z.shape == (0, 8, 4, 4)
    assert_bitwise_equal(z, ref.downsample_b(x, 8))


# ------------------------------------------------------------------------ errors
def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_partition_errors():
    _raises(r"dtype torch.bool.*got Float", ops().partition, torch.ones(4))
    _raises(r"1-D mask.*2-D", ops().partition, torch.ones(2, 2, dtype=torch.bool))


def test_gather_rows_errors():
    x = torch.randn(5, 3)
    idx = torch.arange(5)
    _raises(r"dtype torch.int64.*got Int", ops().gather_rows, x, idx.int(), 2)
    _raises(r"1-D idx.*2-D", ops().gather_rows, x, idx.reshape(5, 1), 2)
    _raises(r"count in \[0, 5\].*count=6", ops().gather_rows, x, torch.arange(6), 6)
    _raises(r"count in \[0, 5\].*count=-1", ops().gather_rows, x, idx, -1)
    _raises(r"idx.numel\(\) >= count.*idx.numel\(\)=2 < count=3", ops().gather_rows, x,
            idx[:2], 3)
    _raises(r"idx\[1\]=5 is out of range.*5 rows", ops().gather_rows, x,
            torch.tensor([0, 5, 1]), 3)
    _raises(r"idx\[0\]=-1 is out of range", ops().gather_rows, x, torch.tensor([-1]), 1)
    _raises(r"at least 1 dimension", ops().gather_rows, torch.tensor(1.0), idx, 0)
    # (a meta idx dispatches to the fake kernel, which checks the device as well)
    meta_idx = torch.arange(5, device="meta")
    _raises(r"idx on device cpu.*meta", ops().gather_rows, x, meta_idx, 2)


def test_scatter_residual_relu_errors():
    out = torch.randn(5, 3, 2, 2)
    y = torch.randn(3, 3, 2, 2)
    idx = torch.tensor([0, 2, 4])
    f = ops().scatter_residual_relu_
    _raises(r"duplicate|distinct.*row 2", f, out, y, torch.tensor([0, 2, 2]), 3)
    _raises(r"idx\[2\]=5 is out of range", f, out, y, torch.tensor([0, 2, 5]), 3)
    _raises(r"y of dtype Float.*got Double", f, out, y.double(), idx, 3)
    _raises(r"y of shape \[count, \*out.shape\[1:\]\].*\[3, 3, 2, 3\]", f, out,
            torch.randn(3, 3, 2, 3), idx, 3)
    _raises(r"y of shape", f, out, torch.randn(3, 12), idx, 3)
    _raises(r"at least count=3 rows", f, out, y[:2], idx, 3)
    _raises(r"count in \[0, 5\].*count=7", f, out, y, torch.arange(7), 7)
    _raises(r"dtype torch.int64", f, out, y, idx.float(), 3)
    _raises(r"floating point", f, torch.zeros(5, 2, dtype=torch.int64),
            torch.zeros(3, 2, dtype=torch.int64), idx, 3)
    before = out.clone()
    with pytest.raises(RuntimeError):
        f(out, y, torch.tensor([0, 9, 1]), 3)
    assert torch.equal(out, before)  # a rejected call leaves out untouched


def test_downsample_b_errors():
    f = ops().downsample_b
    x = torch.randn(2, 4, 8, 8)
    _raises(r"positive multiple of C=4.*out_channels=6", f, x, 6)
    _raises(r"positive multiple of C=4.*out_channels=0", f, x, 0)
    _raises(r"positive multiple of C=4.*out_channels=-4", f, x, -4)
    _raises(r"4-D x.*3-D", f, torch.randn(4, 8, 8), 8)
    _raises(r"H >= 2 and W >= 2", f, torch.randn(2, 4, 1, 8), 8)
    _raises(r"floating point", f, torch.zeros(2, 4, 8, 8, dtype=torch.int32), 8)


def test_loader_rejects_cuda_version_mismatch(monkeypatch):
    monkeypatch.setattr(_native, "extension_cuda_version", lambda: 12040)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match=r"built with CUDA 12.4.*CUDA 13.0"):
        _native._check_cuda_version()
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match=r"built with CUDA 12.4.*no CUDA support"):
        _native._check_cuda_version()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    _native._check_cuda_version()


def test_loader_reports_the_cuda_version_it_was_built_with():
    """0 for a CPU-only build (the only kind a torch without CUDA can load); otherwise the
    CUDA_VERSION the extension was compiled against, which load() has accepted, so it is
    torch.version.cuda's major.minor (parsed here independently of the loader)."""
    module, reason = _native.load()
    assert module is not None and reason is None
    built = _native.extension_cuda_version()
    if torch.version.cuda is None:
        assert built == 0
    elif built != 0:
        major, minor = (int(p) for p in torch.version.cuda.split(".")[:2])
        assert (built // 1000, built % 1000 // 10) == (major, minor), (built, torch.version.cuda)


# ------------------------------------------------------------------------ opcheck
def _mask_case(n, kind):
    """partition's mask of n entries: none, all, a single or a random set of rows set, or
    a non-contiguous view."""
    def build(g):
        if kind == "strided":
            return ((torch.rand(2 * n, generator=g) < 0.5)[::2],)
        mask = {"none": torch.zeros(n, dtype=torch.bool), "all": torch.ones(n, dtype=torch.bool),
                "random": torch.rand(n, generator=g) < 0.5}.get(kind)
        if kind == "single":
            mask = torch.zeros(n, dtype=torch.bool)
            mask[int(torch.randint(0, n, (1,), generator=g))] = True
        return (mask,)
    return "partition", build


def _rows_case(op, shape, count, layout, dtype=torch.float32):
    """gather_rows / scatter_residual_relu_ arguments: `count` of the rows of an x / out of
    `shape` in `layout`, two garbage entries after idx[:count] (ignored)."""
    def build(g):
        x = make_x(shape, dtype, layout, g)
        idx = make_idx(shape[0], count, 2, g)
        if op == "gather_rows":
            return x, idx, count
        return x, make_x((count, *shape[1:]), dtype, "contiguous", g), idx, count
    return op, build


def _downsample_case(shape, ratio, layout, dtype=torch.float32):
    return "downsample_b", lambda g: (make_x(shape, dtype, layout, g), shape[1] * ratio)


# name -> (op, builder(generator) -> args)
OPCHECK_CASES = {
    "partition-random": _mask_case(9, "random"),
    "partition-none": _mask_case(5, "none"),
    "partition-all": _mask_case(5, "all"),
    "partition-single": _mask_case(7, "single"),
    "partition-empty": _mask_case(0, "none"),
    "partition-noncontiguous": _mask_case(11, "strided"),
    "gather-some-contiguous": _rows_case("gather_rows", (5, 3, 4, 6), 3, "contiguous"),
    "gather-all-channels_last": _rows_case("gather_rows", (5, 3, 4, 6), 5, "channels_last"),
    "gather-none-2d": _rows_case("gather_rows", (5, 7), 0, "contiguous"),
    "gather-single-odd-sizes": _rows_case("gather_rows", (7, 3, 5, 3), 1, "contiguous"),
    "gather-noncontiguous-float64": _rows_case("gather_rows", (6, 4, 3, 3), 4, "slice", torch.float64),
    "scatter-some-contiguous": _rows_case("scatter_residual_relu_", (5, 3, 4, 6), 3, "contiguous"),
    "scatter-all-channels_last": _rows_case("scatter_residual_relu_", (5, 3, 4, 6), 5, "channels_last"),
    "scatter-none": _rows_case("scatter_residual_relu_", (5, 3, 4, 6), 0, "contiguous"),
    "scatter-single-odd-sizes": _rows_case("scatter_residual_relu_", (7, 3, 5, 3), 1, "contiguous"),
    "scatter-noncontiguous-2d": _rows_case("scatter_residual_relu_", (6, 9), 4, "slice"),
    "downsample-contiguous": _downsample_case((5, 3, 4, 6), 2, "contiguous"),
    "downsample-channels_last": _downsample_case((5, 3, 4, 6), 1, "channels_last"),
    "downsample-odd-sizes": _downsample_case((3, 3, 5, 7), 3, "contiguous"),
    "downsample-noncontiguous-float64": _downsample_case((2, 2, 6, 4), 2, "slice", torch.float64),
    "downsample-empty": _downsample_case((0, 4, 4, 4), 2, "contiguous"),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, rng):
    name, build = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(ops(), name).default, build(rng))


# ------------------------------------------------------------------------ hypothesis
HYP = settings(max_examples=250, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def rows_case(draw, max_n=12):
    n = draw(st.integers(1, max_n))
    rank = draw(st.sampled_from([2, 4]))
    if rank == 2:
        shape = (n, draw(st.integers(1, 40)))
        layout = draw(st.sampled_from(LAYOUTS_2D))
    else:
        shape = (n, draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        layout = draw(st.sampled_from(LAYOUTS_4D))
    dtype = draw(st.sampled_from(DTYPES))
    order = draw(st.permutations(list(range(n))))
    count = draw(st.integers(0, n))
    extra = draw(st.lists(st.integers(-3, n + 3), max_size=3))
    idx = torch.tensor(list(order[:count]) + extra, dtype=torch.int64)
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, layout, dtype, idx, count, seed


@HYP
@given(st.lists(st.booleans(), max_size=80))
def test_partition_property(bits):
    mask = torch.tensor(bits, dtype=torch.bool)
    idx, count = ops().partition(mask)
    c = int(count)
    assert c == sum(bits)
    assert sorted(idx.tolist()) == list(range(len(bits)))  # a permutation
    assert all(bits[i] for i in idx[:c].tolist()) and not any(bits[i] for i in idx[c:].tolist())
    assert idx[:c].tolist() == sorted(idx[:c].tolist())  # stable
    assert idx[c:].tolist() == sorted(idx[c:].tolist())


@HYP
@given(rows_case())
def test_gather_rows_property(case):
    shape, layout, dtype, idx, count, seed = case
    x = make_x(shape, dtype, layout, torch.Generator().manual_seed(seed))
    y = ops().gather_rows(x, idx, count)
    r = ref.gather_rows(x, idx, count)
    assert_bitwise_equal(y, r)
    assert_same_format(y, r)


@HYP
@given(rows_case())
def test_scatter_residual_relu_property(case):
    shape, layout, dtype, idx, count, seed = case
    gen = torch.Generator().manual_seed(seed)
    out = make_x(shape, dtype, layout, gen)
    y = make_x((count + 1, *shape[1:]), dtype, "contiguous", gen)
    untouched = torch.ones(shape[0], dtype=torch.bool)
    untouched[idx[:count]] = False
    before = out.clone()
    _check_scatter(out, y, idx, count)
    assert_bitwise_equal(out[untouched], before[untouched])


@HYP
@given(n=st.integers(0, 5), c=st.integers(1, 9), h=st.integers(2, 11), w=st.integers(2, 11),
       ratio=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "channels_last", "slice", "batch_inner"]),
       seed=st.integers(0, 2**31 - 1))
def test_downsample_b_property(n, c, h, w, ratio, dtype, layout, seed):
    if n == 0 and layout != "contiguous":
        layout = "contiguous"
    x = make_x((n, c, h, w), dtype, layout, torch.Generator().manual_seed(seed))
    z = ops().downsample_b(x, c * ratio)
    r = ref.downsample_b(x, c * ratio)
    assert_bitwise_equal(z, r)
    assert_same_format(z, r)
