"""The regrouping ops on bad arguments, on all three backends (native, Triton under the
interpreter, torch reference), and differential fuzzing with arbitrary (often invalid)
arguments: each backend must raise exactly when the reference raises, and otherwise
agree with it bit for bit. Complements the per-backend tests in tests/test_native_ops.py
and tests/test_triton_ops.py (README, "Robustness").

The data is CPU tensors: Triton is fuzzed under its interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU), and skipped on a machine with a GPU."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynexec.runtime.ops import extension as _native
from dynexec.runtime.ops import reference as ref

ERRORS = (RuntimeError, ValueError, IndexError)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _native_ops():
    module, _ = _native.load()
    return None if module is None else torch.ops.dynexec


def _triton_ops():
    """The Triton ops when they run on CPU tensors (under the interpreter), else None."""
    try:
        from dynexec.kernels import ops as tops
        from dynexec.kernels import regroup as rg
    except Exception:  # triton missing
        return None
    return tops if rg.kernels_interpreted() and tops.is_available()[0] else None


IMPLS = {"native": _native_ops(), "triton": _triton_ops(), "torch": ref}
AVAILABLE = [name for name, impl in IMPLS.items() if impl is not None]


def impl(name):
    if IMPLS[name] is None:
        pytest.skip(f"backend {name} is not available here")
    return IMPLS[name]


# ------------------------------------------------------------------ error table
def _x():
    return torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))


OUT_OF_RANGE = r"out of range|\[0, 5\)"


def _pool_args(out, y_shape, idx, pooled):
    return out, torch.randn(y_shape), torch.tensor(idx), len(idx), pooled


CASES = {
    # name: (op, args builder, regex the message must match)
    "gather_idx_too_large": ("gather_rows", lambda: (_x(), torch.tensor([0, 5, 1]), 3), OUT_OF_RANGE),
    "gather_idx_huge": ("gather_rows", lambda: (_x(), torch.tensor([2 ** 40]), 1), r"out of range|\[0, 5\)"),
    "gather_idx_negative": ("gather_rows", lambda: (_x(), torch.tensor([1, -1]), 2), OUT_OF_RANGE),
    "gather_idx_int32": ("gather_rows", lambda: (_x(), torch.arange(5, dtype=torch.int32), 2), r"int64|Long"),
    "gather_idx_float": ("gather_rows", lambda: (_x(), torch.arange(5.0), 2), r"int64|Long"),
    "gather_idx_bool": ("gather_rows", lambda: (_x(), torch.ones(5, dtype=torch.bool), 2), r"int64|Long"),
    "gather_idx_2d": ("gather_rows", lambda: (_x(), torch.arange(6).reshape(2, 3), 2), r"1-D"),
    "gather_idx_meta": ("gather_rows", lambda: (_x(), torch.arange(5, device="meta"), 2), r"device|meta"),
    "gather_count_too_large": ("gather_rows", lambda: (_x(), torch.arange(5), 6), r"count"),
    "gather_count_negative": ("gather_rows", lambda: (_x(), torch.arange(5), -1), r"count"),
    "gather_count_beyond_idx": ("gather_rows", lambda: (_x(), torch.arange(2), 3), r"count"),
    "gather_scalar_x": ("gather_rows", lambda: (torch.tensor(1.0), torch.arange(1), 0), r"dimension|0-dim"),
    "scatter_duplicate": ("scatter_residual_relu_",
                          lambda: (_x(), torch.randn(3, 3, 2, 2), torch.tensor([0, 2, 2]), 3),
                          r"duplicate|distinct"),
    "scatter_idx_too_large": ("scatter_residual_relu_",
                              lambda: (_x(), torch.randn(3, 3, 2, 2), torch.tensor([0, 2, 5]), 3),
                              OUT_OF_RANGE),
    "scatter_idx_negative": ("scatter_residual_relu_",
                             lambda: (_x(), torch.randn(2, 3, 2, 2), torch.tensor([-2, 1]), 2), OUT_OF_RANGE),
    "scatter_idx_int32": ("scatter_residual_relu_",
                          lambda: (_x(), torch.randn(2, 3, 2, 2), torch.tensor([0, 1], dtype=torch.int32), 2),
                          r"int64|Long"),
    "scatter_idx_meta": ("scatter_residual_relu_",
                         lambda: (_x(), torch.randn(2, 3, 2, 2), torch.arange(2, device="meta"), 2),
                         r"device|meta"),
    "scatter_y_shape": ("scatter_residual_relu_",
                        lambda: (_x(), torch.randn(2, 3, 2, 3), torch.tensor([0, 1]), 2), r"shape"),
    "scatter_y_rank": ("scatter_residual_relu_",
                       lambda: (_x(), torch.randn(2, 12), torch.tensor([0, 1]), 2), r"shape"),
    "scatter_y_dtype": ("scatter_residual_relu_",
                        lambda: (_x(), torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 1]), 2),
                        r"dtype|Double"),
    "scatter_y_too_few_rows": ("scatter_residual_relu_",
                               lambda: (_x(), torch.randn(1, 3, 2, 2), torch.tensor([0, 1]), 2),
                               r"count|rows|y.shape"),
    "scatter_count_beyond_out": ("scatter_residual_relu_",
                                 lambda: (_x(), torch.randn(7, 3, 2, 2), torch.arange(7), 7), r"count"),
    "scatter_int_out": ("scatter_residual_relu_",
                        lambda: (torch.zeros(5, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64),
                                 torch.tensor([0, 1]), 2), r"floating|dtype"),
    "pool_pooled_shape": ("scatter_residual_relu_pool_",
                          lambda: _pool_args(_x(), (2, 3, 2, 2), [0, 1], torch.zeros(5, 2)),
                          r"pooled.*shape"),
    "pool_pooled_dtype": ("scatter_residual_relu_pool_",
                          lambda: _pool_args(_x(), (2, 3, 2, 2), [0, 1],
                                             torch.zeros(5, 3, dtype=torch.float64)),
                          r"pooled.*dtype"),
    "pool_pooled_strided": ("scatter_residual_relu_pool_",
                            lambda: _pool_args(_x(), (2, 3, 2, 2), [0, 1], torch.zeros(3, 5).t()),
                            r"contiguous"),
    "pool_out_2d": ("scatter_residual_relu_pool_",
                    lambda: _pool_args(torch.randn(5, 3), (2, 3), [0, 1], torch.zeros(5, 3)), r"4-D"),
    "pool_duplicate": ("scatter_residual_relu_pool_",
                       lambda: _pool_args(_x(), (3, 3, 2, 2), [0, 2, 2], torch.zeros(5, 3)),
                       r"duplicate|distinct"),
    "pool_idx_too_large": ("scatter_residual_relu_pool_",
                           lambda: _pool_args(_x(), (2, 3, 2, 2), [0, 5], torch.zeros(5, 3)), OUT_OF_RANGE),
    "relu_pool_pooled_shape": ("relu_pool_", lambda: (_x(), torch.zeros(5, 2)), r"pooled.*shape"),
    "relu_pool_pooled_dtype": ("relu_pool_", lambda: (_x(), torch.zeros(5, 3, dtype=torch.float64)),
                               r"pooled.*dtype"),
    "relu_pool_pooled_strided": ("relu_pool_", lambda: (_x(), torch.zeros(3, 5).t()), r"contiguous"),
    "relu_pool_x_3d": ("relu_pool_", lambda: (torch.randn(5, 3, 4), torch.zeros(5, 3)), r"4-D"),
    "relu_pool_int_x": ("relu_pool_", lambda: (torch.zeros(5, 3, 2, 2, dtype=torch.int64),
                                               torch.zeros(5, 3, dtype=torch.int64)), r"floating|dtype"),
    "downsample_not_multiple": ("downsample_b", lambda: (torch.randn(2, 4, 8, 8), 6), r"multiple"),
    "downsample_zero_channels": ("downsample_b", lambda: (torch.randn(2, 4, 8, 8), 0), r"multiple"),
    "downsample_negative": ("downsample_b", lambda: (torch.randn(2, 4, 8, 8), -4), r"multiple"),
    "downsample_3d": ("downsample_b", lambda: (torch.randn(4, 8, 8), 8), r"4-D"),
    "downsample_too_small": ("downsample_b", lambda: (torch.randn(2, 4, 1, 8), 8), r">= 2|H"),
    "downsample_int": ("downsample_b", lambda: (torch.zeros(2, 4, 8, 8, dtype=torch.int32), 8),
                       r"floating|dtype"),
}
# Known gap, reported rather than hidden: the Triton launcher does not check that scatter
# indices are distinct (kernels/regroup.py, "Index safety"); on CPU it would need a sort.
# Likewise, an idx on the meta device next to CPU data dispatches the Triton ops to their
# fake (meta) kernels, which return an empty meta tensor / do nothing instead of raising
# (kernels/ops.py fake kernels do not check devices; the native fake kernels do).
KNOWN_GAPS: dict = {}  # (backend, case) -> reason; none left


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_bad_arguments_raise_clear_errors(backend, case):
    ops = impl(backend)
    if (backend, case) in KNOWN_GAPS:
        pytest.xfail(KNOWN_GAPS[(backend, case)])
    op_name, build, pattern = CASES[case]
    op = getattr(ops, op_name)
    args = build()
    mutated = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    before = [a.clone() for a in mutated] if op_name.endswith("_") else []
    with pytest.raises(ERRORS, match=pattern):
        op(*args)
    for a, b in zip(mutated, before):  # a rejected scatter leaves out (and pooled) untouched
        assert torch.equal(a, b)


def test_partition_rejects_non_tensor():
    for name in AVAILABLE:
        with pytest.raises(ERRORS + (TypeError,)):
            getattr(IMPLS[name], "partition")([True, False])


# ------------------------------------------------------------------ differential fuzzing
def _outcome(fn):
    try:
        return True, fn()
    except ERRORS as exc:
        return False, exc


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    if a.is_floating_point():
        keep = ~torch.isnan(b)
        assert torch.equal(torch.signbit(a)[keep], torch.signbit(b)[keep])


@st.composite
def index_case(draw, max_n=7):
    """Rows x[n, ...] and an arbitrary idx/count: values may be negative, too large or
    repeated, count may exceed idx or be negative."""
    n = draw(st.integers(0, max_n))
    feat = draw(st.sampled_from([(3,), (2, 2, 3), (1, 1, 1)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    values = draw(st.lists(st.integers(-3, n + 2), max_size=n + 3))
    if draw(st.booleans()) and n > 0:  # often valid: a permutation prefix
        values = draw(st.permutations(list(range(n))))[: draw(st.integers(0, n))] + values[:2]
    count = draw(st.integers(-1, len(values) + 1))
    seed = draw(st.integers(0, 2 ** 16))
    return n, feat, dtype, torch.tensor(values, dtype=torch.int64), count, seed


def _fuzz_gather(backend, case):
    n, feat, dtype, idx, count, seed = case
    if backend == "native" and count > n:
        return  # the native gather also refuses count > N (stricter than the contract, which
        # allows a gather of more rows than x has, with repeats; the reference and Triton do)
    x = torch.randn((n, *feat), generator=torch.Generator().manual_seed(seed)).to(dtype)
    ok_ref, r = _outcome(lambda: ref.gather_rows(x, idx, count))
    ok, y = _outcome(lambda: IMPLS[backend].gather_rows(x, idx, count))
    assert ok == ok_ref, f"{backend}: {'raised ' + repr(y) if not ok else 'no error'}; reference: {r!r}"
    if ok:
        _same(y, r)


def _fuzz_scatter(backend, case, y_extra):
    n, feat, dtype, idx, count, seed = case
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn((n, *feat), generator=gen).to(dtype)
    y = torch.randn((max(count, 0) + y_extra, *feat), generator=gen).to(dtype)
    rows = idx[:max(count, 0)]
    if backend == "triton" and rows.numel() != torch.unique(rows).numel():
        return  # known gap: duplicates are not detected by the Triton launcher
    expected, got = out.clone(), out.clone()
    ok_ref, r = _outcome(lambda: ref.scatter_residual_relu_(expected, y, idx, count))
    ok, e = _outcome(lambda: IMPLS[backend].scatter_residual_relu_(got, y, idx, count))
    assert ok == ok_ref, f"{backend}: {'raised ' + repr(e) if not ok else 'no error'}; reference: {r!r}"
    if not ok:
        assert torch.equal(got, out), "a rejected scatter modified out"
    _same(got, expected)


@st.composite
def pool_case(draw, max_n=6):
    """index_case with a 4-D out (NCHW or channels_last) for scatter_residual_relu_pool_."""
    n, _, dtype, idx, count, seed = draw(index_case(max_n))
    chw = draw(st.sampled_from([(3, 2, 2), (1, 1, 1), (2, 1, 3), (4, 3, 1)]))
    return n, chw, draw(st.booleans()), dtype, idx, count, seed


def _fuzz_scatter_pool(backend, case, y_extra):
    n, chw, channels_last, dtype, idx, count, seed = case
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn((n, *chw), generator=gen).to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    y = torch.randn((max(count, 0) + y_extra, *chw), generator=gen).to(dtype)
    pooled = torch.full((n, chw[0]), -7.0, dtype=dtype)
    expected, got = (out.clone(), pooled.clone()), (out.clone(), pooled.clone())
    ok_ref, r = _outcome(lambda: ref.scatter_residual_relu_pool_(expected[0], y, idx, count, expected[1]))
    ok, e = _outcome(lambda: IMPLS[backend].scatter_residual_relu_pool_(got[0], y, idx, count, got[1]))
    assert ok == ok_ref, f"{backend}: {'raised ' + repr(e) if not ok else 'no error'}; reference: {r!r}"
    if not ok:
        assert torch.equal(got[0], out) and torch.equal(got[1], pooled), "rejected, yet modified"
    _same(got[0], expected[0])
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(got[1], expected[1], rtol=tol, atol=tol, equal_nan=True)


@st.composite
def relu_pool_case(draw, max_n=6):
    """x of any 4-D shape (N and H * W may be 0), dtype and layout (NCHW, channels_last,
    a channel slice), with NaN / Inf / -0.0 sprinkled in, and a pooled that may be wrong."""
    n = draw(st.integers(0, max_n))
    chw = draw(st.sampled_from([(3, 2, 2), (1, 1, 1), (2, 1, 3), (4, 3, 1), (2, 0, 3)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "slice"]))
    pooled_shape = draw(st.sampled_from([(n, chw[0])] * 4 + [(n, chw[0] + 1), (n + 1, chw[0])]))
    return n, chw, dtype, layout, pooled_shape, draw(st.integers(0, 2 ** 16))


def _fuzz_relu_pool(backend, case):
    n, chw, dtype, layout, pooled_shape, seed = case
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn((n, 2 * chw[0], *chw[1:]), generator=gen)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    pick = torch.randint(0, 12, full.shape, generator=gen)
    full = torch.where(pick < 5, special[pick.clamp(max=4)], full).to(dtype)
    x = {"contiguous": full[:, :chw[0]].contiguous(), "slice": full[:, ::2],
         "channels_last": full[:, :chw[0]].contiguous(memory_format=torch.channels_last)}[layout]
    pooled = torch.full(pooled_shape, -7.0, dtype=dtype)
    expected, got = (x.clone(), pooled.clone()), (x.clone(), pooled.clone())
    ok_ref, r = _outcome(lambda: ref.relu_pool_(*expected))
    ok, e = _outcome(lambda: IMPLS[backend].relu_pool_(*got))
    assert ok == ok_ref, f"{backend}: {'raised ' + repr(e) if not ok else 'no error'}; reference: {r!r}"
    if not ok:  # rejected: nothing modified (NaN-aware comparison)
        _same(got[0], x)
        _same(got[1], pooled)
    _same(got[0], expected[0])
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(got[1], expected[1], rtol=tol, atol=tol, equal_nan=True)


def _fuzz_downsample(backend, n, c, h, w, out_channels, seed):
    x = torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed))
    ok_ref, r = _outcome(lambda: ref.downsample_b(x, out_channels))
    ok, z = _outcome(lambda: IMPLS[backend].downsample_b(x, out_channels))
    assert ok == ok_ref, f"{backend}: {'raised ' + repr(z) if not ok else 'no error'}; reference: {r!r}"
    if ok:
        _same(z, r)


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))


_downsample_args = dict(n=st.integers(0, 3), c=st.integers(1, 4), h=st.integers(1, 6),
                        w=st.integers(1, 6), out_channels=st.integers(-2, 13),
                        seed=st.integers(0, 2 ** 16))


# native: fast, so many examples
@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(600)
@given(index_case())
def test_fuzz_gather_native(case):
    _fuzz_gather("native", case)


@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(600)
@given(index_case(), st.integers(0, 2))
def test_fuzz_scatter_native(case, y_extra):
    _fuzz_scatter("native", case, y_extra)


@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(300)
@given(pool_case(), st.integers(0, 2))
def test_fuzz_scatter_pool_native(case, y_extra):
    _fuzz_scatter_pool("native", case, y_extra)


@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(300)
@given(relu_pool_case())
def test_fuzz_relu_pool_native(case):
    _fuzz_relu_pool("native", case)


@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(400)
@given(**_downsample_args)
def test_fuzz_downsample_native(n, c, h, w, out_channels, seed):
    _fuzz_downsample("native", n, c, h, w, out_channels, seed)


@pytest.mark.skipif(IMPLS["native"] is None, reason="native extension not available")
@_settings(400)
@given(st.lists(st.integers(0, 3), max_size=100), st.sampled_from([torch.bool, torch.uint8]))
def test_fuzz_partition_native(values, dtype):
    mask = torch.tensor(values, dtype=torch.uint8).to(dtype)
    idx, count = IMPLS["native"].partition(mask)
    ridx, rcount = ref.partition(mask)
    assert torch.equal(idx, ridx) and int(count) == int(rcount)


# triton under the interpreter: slower, fewer examples
@pytest.mark.skipif(IMPLS["triton"] is None, reason="Triton (interpreter) not available")
@_settings(200)
@given(index_case(max_n=5))
def test_fuzz_gather_triton(case):
    _fuzz_gather("triton", case)


@pytest.mark.skipif(IMPLS["triton"] is None, reason="Triton (interpreter) not available")
@_settings(200)
@given(index_case(max_n=5), st.integers(0, 2))
def test_fuzz_scatter_triton(case, y_extra):
    _fuzz_scatter("triton", case, y_extra)


@pytest.mark.skipif(IMPLS["triton"] is None, reason="Triton (interpreter) not available")
@_settings(80)
@given(pool_case(max_n=5), st.integers(0, 2))
def test_fuzz_scatter_pool_triton(case, y_extra):
    _fuzz_scatter_pool("triton", case, y_extra)


@pytest.mark.skipif(IMPLS["triton"] is None, reason="Triton (interpreter) not available")
@_settings(60)
@given(relu_pool_case(max_n=4))
def test_fuzz_relu_pool_triton(case):
    _fuzz_relu_pool("triton", case)


@pytest.mark.skipif(IMPLS["triton"] is None, reason="Triton (interpreter) not available")
@_settings(150)
@given(**_downsample_args)
def test_fuzz_downsample_triton(n, c, h, w, out_channels, seed):
    _fuzz_downsample("triton", n, c, h, w, out_channels, seed)


# the reference against a plain-Python model of the contract
@_settings(300)
@given(index_case())
def test_fuzz_reference_against_python_model(case):
    n, feat, dtype, idx, count, seed = case
    x = torch.randn((n, *feat), generator=torch.Generator().manual_seed(seed)).to(dtype)
    vals = idx.tolist()
    valid = 0 <= count <= len(vals) and all(0 <= v < n for v in vals[:count])
    ok, y = _outcome(lambda: ref.gather_rows(x, idx, count))
    assert ok == valid, (vals, count, n, y)
    if ok:
        assert y.shape == (count, *feat)
        for i, v in enumerate(vals[:count]):
            assert torch.equal(y[i], x[v])
    out = x.clone()
    ys = torch.randn((max(count, 0), *feat), generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    valid_s = valid and count <= n and len(set(vals[:count])) == count
    ok, _ = _outcome(lambda: ref.scatter_residual_relu_(out, ys, idx, count))
    assert ok == valid_s, (vals, count, n)
    if ok:
        want = x.clone()
        for i, v in enumerate(vals[:count]):
            want[v] = torch.relu(ys[i] + x[v])
        assert torch.equal(out, want)
    else:
        assert torch.equal(out, x)
