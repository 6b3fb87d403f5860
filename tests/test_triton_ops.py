"""Tests for the Triton regrouping kernels (dynexec.kernels.regroup / dynexec.kernels.ops).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 for the test process before any kernel is imported); with one they
are compiled and run on CUDA tensors (those tests carry the ``cuda`` marker then).
test_reload_after_compiled_import checks, in a fresh interpreter, that the registered ops
follow a reload of the kernels after the variable is set late.

Every op is compared bit-for-bit with the pure-PyTorch reference (dynexec.runtime.ops.reference).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynexec.runtime.ops import reference as ref

triton = pytest.importorskip("triton")

from dynexec.kernels import ops as tops  # noqa: E402
from dynexec.kernels import regroup as rg  # noqa: E402

DEVICE = "cpu" if rg.kernels_interpreted() else "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CL = torch.channels_last
# NaN/Inf tests make numpy (inside the interpreter) warn about invalid values
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
if DEVICE == "cuda":
    pytestmark.append(pytest.mark.cuda)
HYP = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed=0, fmt=None):
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x.to(DEVICE)


def _mask(n, p=0.5, seed=0):
    return (torch.rand(n, generator=_gen(seed)) < p).to(DEVICE)


def _assert_same(a, b, check_strides=True):
    """Bitwise-equal values (NaN == NaN, and the sign of zero), same dtype/shape/layout."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    if a.is_floating_point():  # sign of zero (and of everything else except NaN)
        keep = ~torch.isnan(b)
        assert torch.equal(torch.signbit(a)[keep], torch.signbit(b)[keep])
    if check_strides and a.numel() > 0:
        assert a.is_contiguous() == b.is_contiguous()
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=CL) == b.is_contiguous(memory_format=CL)


def _counts(n):
    return sorted({0, 1, n, n // 2} & set(range(n + 1)))


# ---------------------------------------------------------------------------------------
# availability / registration
# ---------------------------------------------------------------------------------------
def test_is_available():
    ok, reason = tops.is_available()
    assert ok, reason
    assert isinstance(reason, str) and reason


def test_ops_registered():
    for name in ("triton_partition", "triton_gather_rows", "triton_scatter_residual_relu_",
                 "triton_downsample_b"):
        assert hasattr(torch.ops.dynexec, name)
    schema = str(torch.ops.dynexec.triton_scatter_residual_relu_.default._schema)
    assert "!) out" in schema, schema  # out is declared mutated


# ---------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 33, 1000, 4096, 4097, 5000])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_partition_matches_reference(n, p):
    mask = _mask(n, p, seed=n)
    idx, count = tops.partition(mask)
    ridx, rcount = ref.partition(mask)
    assert idx.dtype == torch.int64 and idx.shape == (n,) and idx.device == mask.device
    assert count.dtype == torch.int64 and count.dim() == 0 and count.device == mask.device
    assert torch.equal(idx, ridx)
    assert torch.equal(count, rcount)


def test_partition_multiblock_large():
    # several blocks of the multi-block path, with a ragged last block
    mask = _mask(3 * 1024 + 4096 + 17, 0.7, seed=3)
    idx, count = tops.partition(mask)
    ridx, rcount = ref.partition(mask)
    assert torch.equal(idx, ridx) and torch.equal(count, rcount)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
def test_partition_non_bool_and_nd_mask(dtype):
    mask = (torch.rand(3, 7, generator=_gen(1)) < 0.5).to(dtype).to(DEVICE)
    idx, count = tops.partition(mask)
    ridx, rcount = ref.partition(mask)
    assert torch.equal(idx, ridx) and torch.equal(count, rcount)


def test_partition_non_contiguous_mask():
    mask = _mask(40, seed=2)[::3]
    idx, count = tops.partition(mask)
    ridx, rcount = ref.partition(mask)
    assert torch.equal(idx, ridx) and torch.equal(count, rcount)


@HYP
@given(st.lists(st.booleans(), max_size=300))
def test_partition_property(bits):
    mask = torch.tensor(bits, dtype=torch.bool, device=DEVICE)
    idx, count = tops.partition(mask)
    c = int(count)
    assert c == sum(bits)
    assert sorted(idx.tolist()) == list(range(len(bits)))
    act, inact = idx[:c].tolist(), idx[c:].tolist()
    assert act == sorted(act) and inact == sorted(inact)
    assert all(bits[i] for i in act) and not any(bits[i] for i in inact)


# ---------------------------------------------------------------------------------------
# gather_rows
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc"])
def test_gather_rows_matches_reference(dtype, layout):
    n = 7
    shape = (n, 37) if layout == "2d" else (n, 5, 3, 7)
    x = _randn(shape, dtype, seed=11, fmt=CL if layout == "nhwc" else None)
    idx, _ = ref.partition(_mask(n, seed=5))
    for count in _counts(n):
        y = tops.gather_rows(x, idx, count)
        _assert_same(y, ref.gather_rows(x, idx, count))
        assert y.data_ptr() != x.data_ptr() or count == 0


@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("chw", [(1, 1, 1), (3, 5, 7), (1, 9, 1), (6, 1, 1)])
def test_gather_rows_odd_sizes(n, chw):
    for fmt in (None, CL):
        x = _randn((n,) + chw, torch.float32, seed=n, fmt=fmt)
        idx = torch.randperm(n, generator=_gen(n)).to(DEVICE)
        for count in _counts(n):
            _assert_same(tops.gather_rows(x, idx, count), ref.gather_rows(x, idx, count))


def test_gather_rows_large_rows(monkeypatch):
    # rows of 3 * 4096 + 5 elements: several chunks per row with a ragged tail; then force
    # the in-kernel chunk loop by capping the number of chunk programs.
    x = _randn((4, 3 * 4096 + 5), torch.float32, seed=4)
    idx = torch.tensor([3, 0, 2, 1], device=DEVICE)
    _assert_same(tops.gather_rows(x, idx, 3), ref.gather_rows(x, idx, 3))
    monkeypatch.setattr(rg, "_MAX_GRID_Y", 2)
    _assert_same(tops.gather_rows(x, idx, 3), ref.gather_rows(x, idx, 3))


def test_gather_rows_non_contiguous_inputs():
    base = _randn((6, 8, 5, 9), torch.float32, seed=7)
    idx = torch.tensor([5, 1, 3, 0, 2, 4], device=DEVICE)
    cases = [
        base[:, ::2],                       # strided channels
        base.transpose(2, 3),               # permuted spatial dims
        base.permute(0, 2, 3, 1),           # NHWC view seen as a 4-D tensor
        base[:, :, 1:4, 2:7],               # spatial crop
        _randn((9, 6), torch.float64, seed=1).t(),  # 2-D transposed
    ]
    for x in cases:
        y = tops.gather_rows(x, idx, 4)
        _assert_same(y, ref.gather_rows(x, idx, 4))
    # idx itself non-contiguous, with extra entries past count
    idx2 = torch.arange(12, device=DEVICE).flip(0)[::2] % 6
    _assert_same(tops.gather_rows(base, idx2, 3), ref.gather_rows(base, idx2, 3))


def test_gather_rows_idx_extra_entries_and_repeats():
    x = _randn((5, 3, 4, 4), torch.float16, seed=2, fmt=CL)
    idx = torch.tensor([4, 4, 0, 2, 1, 3, 0, 0, 1], device=DEVICE)  # M > N, repeats allowed
    for count in (0, 2, 5, 9):
        _assert_same(tops.gather_rows(x, idx, count), ref.gather_rows(x, idx, count))


# ---------------------------------------------------------------------------------------
# scatter_residual_relu_
# ---------------------------------------------------------------------------------------
def _scatter_both(out, y, idx, count):
    a = out.clone(memory_format=torch.preserve_format)
    b = out.clone(memory_format=torch.preserve_format)
    ptr = a.data_ptr()
    assert tops.scatter_residual_relu_(a, y, idx, count) is None
    ref.scatter_residual_relu_(b, y, idx, count)
    assert a.data_ptr() == ptr  # in place
    _assert_same(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["2d", "nchw", "nhwc"])
def test_scatter_residual_relu_matches_reference(dtype, layout):
    n = 7
    shape = (n, 37) if layout == "2d" else (n, 5, 3, 7)
    fmt = CL if layout == "nhwc" else None
    out = _randn(shape, dtype, seed=21, fmt=fmt)
    idx, _ = ref.partition(_mask(n, seed=6))
    for count in _counts(n):
        y = _randn((count,) + shape[1:], dtype, seed=count, fmt=fmt)
        _scatter_both(out, y, idx, count)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_scatter_odd_sizes_and_mixed_layouts(n):
    for chw in [(1, 1, 1), (3, 5, 7), (2, 3, 1)]:
        idx = torch.randperm(n, generator=_gen(n)).to(DEVICE)
        for out_fmt in (None, CL):
            for y_fmt in (None, CL):
                out = _randn((n,) + chw, torch.float32, seed=1, fmt=out_fmt)
                count = max(0, n - 1)
                y = _randn((count,) + chw, torch.float32, seed=2, fmt=y_fmt)
                _scatter_both(out, y, idx, count)


def test_scatter_y_with_extra_rows_and_idx_extra_entries():
    out = _randn((6, 10), torch.float64, seed=3)
    y = _randn((6, 10), torch.float64, seed=4)  # more rows than count
    idx = torch.tensor([5, 2, 0, 1, 3, 4, 9, 9], device=DEVICE)  # junk past count ignored
    _scatter_both(out, y, idx, 3)


def test_scatter_non_contiguous_y():
    out = _randn((5, 4, 3, 3), torch.float32, seed=5)
    y = _randn((5, 3, 3, 8), torch.float32, seed=6).permute(0, 3, 1, 2)[:, ::2]
    _scatter_both(out, y, torch.tensor([4, 0, 3], device=DEVICE), 3)


def test_scatter_large_rows(monkeypatch):
    out = _randn((3, 2 * 4096 + 3), torch.float32, seed=7)
    y = _randn((2, 2 * 4096 + 3), torch.float32, seed=8)
    idx = torch.tensor([2, 0, 1], device=DEVICE)
    _scatter_both(out, y, idx, 2)
    monkeypatch.setattr(rg, "_MAX_GRID_Y", 1)
    _scatter_both(out, y, idx, 2)


def test_scatter_nan_inf_signed_zero():
    out = torch.tensor([[1.0, -2.0, float("nan"), 0.0, -0.0, float("inf")]] * 2, device=DEVICE)
    y = torch.tensor([[float("nan"), 1.0, 1.0, -0.0, -0.0, -float("inf")]] * 2, device=DEVICE)
    _scatter_both(out, y, torch.tensor([1, 0], device=DEVICE), 2)


def test_scatter_rejects_non_row_contiguous_out():
    out = _randn((4, 6), torch.float32).t()  # [6, 4] with row stride 1
    y = _randn((2, 4), torch.float32)
    with pytest.raises(RuntimeError, match="row-contiguous"):
        tops.scatter_residual_relu_(out, y, torch.tensor([0, 1], device=DEVICE), 2)
    out4 = _randn((4, 3, 5, 5), torch.float32)[:, :, ::2]
    with pytest.raises(RuntimeError, match="row-contiguous"):
        tops.scatter_residual_relu_(out4, out4[:1].clone(), torch.tensor([0], device=DEVICE), 1)


# ---------------------------------------------------------------------------------------
# downsample_b
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_downsample_b_matches_reference(dtype, fmt, ratio):
    x = _randn((3, 5, 8, 6), dtype, seed=ratio, fmt=fmt)
    z = tops.downsample_b(x, 5 * ratio)
    _assert_same(z, ref.downsample_b(x, 5 * ratio))


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 3, 7, 9), (7, 2, 5, 3), (1, 3, 3, 2), (0, 3, 4, 4)])
def test_downsample_b_odd_and_degenerate(shape):
    for fmt in (None, CL):
        x = _randn(shape, torch.float32, seed=9, fmt=fmt)
        _assert_same(tops.downsample_b(x, 2 * shape[1]), ref.downsample_b(x, 2 * shape[1]))


@pytest.mark.parametrize("shape", [(2, 3, 1, 6), (2, 3, 6, 1)])
def test_downsample_b_too_small_raises_like_reference(shape):
    x = _randn(shape, torch.float32)
    with pytest.raises(RuntimeError):
        ref.downsample_b(x, 6)
    with pytest.raises(ValueError, match="H and W must be >= 2"):
        tops.downsample_b(x, 6)


def test_downsample_b_non_contiguous_input():
    base = _randn((4, 6, 10, 12), torch.float32, seed=10)
    for x in (base[:, ::2], base.transpose(2, 3), base[:, :, 1:8, 3:], base.permute(0, 1, 3, 2)[..., ::2]):
        _assert_same(tops.downsample_b(x, 2 * x.shape[1]), ref.downsample_b(x, 2 * x.shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_downsample_b_nan_inf_and_zero_sign(dtype):
    x = _randn((2, 2, 4, 4), torch.float32, seed=11)
    x[0, 0, 0, 0] = float("nan")
    x[0, 1, 2, 2] = float("inf")
    x[1, 0, 0, 2] = -float("inf")
    x[1, 1] = -x[1, 1].abs() - 1  # negative means -> pooled * 0 == -0.0
    x = x.to(dtype)
    for fmt in (None, CL):
        xx = x.contiguous(memory_format=fmt) if fmt else x
        _assert_same(tops.downsample_b(xx, 6), ref.downsample_b(xx, 6))


def test_downsample_b_bf16_rounding_ties():
    # window sums that land exactly halfway between bf16 values exercise round-to-even
    vals = torch.tensor([1.0, 2.0 ** -8, 0.0, 0.0, 1.0, 3 * 2.0 ** -8, 0.0, 0.0], dtype=torch.float32)
    x = vals.view(1, 2, 2, 2).to(torch.bfloat16).to(DEVICE)
    _assert_same(tops.downsample_b(x, 2), ref.downsample_b(x, 2))


# ---------------------------------------------------------------------------------------
# error cases
# ---------------------------------------------------------------------------------------
def test_gather_errors():
    x = _randn((4, 3), torch.float32)
    idx = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        tops.gather_rows(x, idx.int(), 2)
    with pytest.raises(ValueError, match="1-D"):
        tops.gather_rows(x, idx.view(2, 2), 2)
    with pytest.raises(ValueError, match="count"):
        tops.gather_rows(x, idx, 5)
    with pytest.raises(ValueError, match="count"):
        tops.gather_rows(x, idx, -1)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        tops.gather_rows(x, torch.tensor([0, 4], device=DEVICE), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        tops.gather_rows(x, torch.tensor([-1, 0], device=DEVICE), 1)
    with pytest.raises(ValueError, match="dtype"):
        tops.gather_rows(torch.ones(4, 3, dtype=torch.int32, device=DEVICE), idx, 2)
    with pytest.raises(RuntimeError, match="same device"):
        rg.gather_rows(x, torch.arange(4, device="meta"), 2)


def test_scatter_errors():
    out = _randn((4, 3), torch.float32)
    idx = torch.arange(4, device=DEVICE)
    y = _randn((4, 3), torch.float32)
    with pytest.raises(ValueError, match="int64"):
        tops.scatter_residual_relu_(out, y, idx.to(torch.int32), 2)
    with pytest.raises(ValueError, match="dtype"):
        tops.scatter_residual_relu_(out, y.double(), idx, 2)
    with pytest.raises(ValueError, match="shape"):
        tops.scatter_residual_relu_(out, _randn((4, 5), torch.float32), idx, 2)
    with pytest.raises(ValueError, match="y.shape"):
        tops.scatter_residual_relu_(out, y[:1], idx, 2)
    with pytest.raises(ValueError, match="count"):
        tops.scatter_residual_relu_(out, y, idx[:2], 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        tops.scatter_residual_relu_(out, y, torch.tensor([1, 7], device=DEVICE), 2)
    with pytest.raises(ValueError, match="out.shape"):
        tops.scatter_residual_relu_(_randn((2, 3), torch.float32), y, idx, 3)


def test_downsample_and_partition_errors():
    x = _randn((2, 4, 4, 4), torch.float32)
    for bad in (0, -4, 6, 3):
        with pytest.raises(ValueError, match="multiple of C = 4"):
            tops.downsample_b(x, bad)
    with pytest.raises(ValueError, match="4-D"):
        tops.downsample_b(x[0], 8)
    with pytest.raises(ValueError, match="dtype"):
        tops.downsample_b(x.to(torch.int64), 8)
    with pytest.raises(ValueError, match="torch.Tensor"):
        rg.partition([True, False])


def test_kernel_masks_out_of_range_indices():
    """Launch the kernels directly (bypassing launcher validation) with invalid indices:
    gather writes zeros for them, scatter leaves memory untouched, nothing else changes."""
    x = _randn((3, 40), torch.float32, seed=1)
    idx = torch.tensor([2, -1, 3, 1000, 0], device=DEVICE)
    y = torch.full((5, 40), 7.0, device=DEVICE)
    rg._gather_rows_kernel[(5, 1)](x, idx, y, 3, 40, 5, BLOCK=64)
    assert torch.equal(y[0], x[2]) and torch.equal(y[4], x[0])
    assert torch.equal(y[[1, 2, 3]], torch.zeros(3, 40, device=DEVICE))
    out = x.clone()
    upd = torch.ones(5, 40, device=DEVICE)
    rg._scatter_residual_relu_kernel[(5, 1)](out, upd, idx, 3, 40, 5, BLOCK=64, UPCAST=False, SOFT_BF16=False)
    expect = x.clone()
    expect[[2, 0]] = torch.relu(x[[2, 0]] + 1)
    assert torch.equal(out, expect)


# ---------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------
def test_opcheck():
    mask = _mask(37, seed=1)
    idx, count = ref.partition(mask)
    c = int(count)
    x = _randn((37, 3, 5, 4), torch.float32, seed=2, fmt=CL)
    samples = [
        (torch.ops.dynexec.triton_partition, (mask,)),
        (torch.ops.dynexec.triton_partition, (_mask(0),)),
        (torch.ops.dynexec.triton_gather_rows, (x, idx, c)),
        (torch.ops.dynexec.triton_gather_rows, (x.contiguous(), idx, 0)),
        (torch.ops.dynexec.triton_scatter_residual_relu_,
         (x.clone(memory_format=torch.preserve_format), _randn((c, 3, 5, 4), torch.float32), idx, c)),
        (torch.ops.dynexec.triton_scatter_residual_relu_,
         (_randn((9, 11), torch.float16), _randn((4, 11), torch.float16), torch.arange(9, device=DEVICE), 4)),
        (torch.ops.dynexec.triton_downsample_b, (x, 6)),
        (torch.ops.dynexec.triton_downsample_b, (x.contiguous(), 3)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------
# hypothesis: gather -> scatter round trips and downsample on random shapes
# ---------------------------------------------------------------------------------------
_shapes4 = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7), st.integers(1, 7))
_pool_shapes4 = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))


@HYP
@given(shape=_shapes4, cl=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_gather_scatter_property(shape, cl, dtype, seed):
    n = shape[0]
    fmt = CL if cl else None
    x = _randn(shape, dtype, seed=seed, fmt=fmt)
    mask = _mask(n, seed=seed)
    idx, count = tops.partition(mask)
    c = int(count)
    y = tops.gather_rows(x, idx, c)
    _assert_same(y, ref.gather_rows(x, idx, c))
    _scatter_both(x, y, idx, c)


@HYP
@given(shape=_pool_shapes4, cl=st.booleans(), dtype=st.sampled_from(DTYPES), ratio=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_downsample_b_property(shape, cl, dtype, ratio, seed):
    x = _randn(shape, dtype, seed=seed, fmt=CL if cl else None)
    _assert_same(tops.downsample_b(x, ratio * shape[1]), ref.downsample_b(x, ratio * shape[1]))


# ---------------------------------------------------------------------------------------
# import-order robustness
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only scenario")
def test_reload_after_compiled_import():
    """triton + the kernels imported WITHOUT TRITON_INTERPRET (compiled mode), then the
    variable is set and only regroup is reloaded: the registered ops must work."""
    code = textwrap.dedent(
        """
        import os, importlib, torch
        os.environ.pop("TRITON_INTERPRET", None)
        from dynexec.kernels import ops, regroup
        from dynexec.runtime.ops import reference as ref
        assert not regroup.kernels_interpreted()
        assert not ops.is_available()[0]
        try:
            ops.partition(torch.ones(3, dtype=torch.bool))
            raise SystemExit("expected RuntimeError")
        except RuntimeError as e:
            assert "TRITON_INTERPRET" in str(e)
        os.environ["TRITON_INTERPRET"] = "1"
        importlib.reload(regroup)
        assert ops.is_available()[0]
        m = torch.rand(5000) < 0.5
        idx, c = ops.partition(m)
        r = ref.partition(m)
        assert torch.equal(idx, r[0]) and torch.equal(c, r[1])
        x = torch.randn(6, 4, 6, 6).to(torch.bfloat16)
        assert torch.equal(ops.downsample_b(x, 8), ref.downsample_b(x, 8))
        o1, o2 = x.clone(), x.clone()
        idx6 = torch.tensor([4, 1, 5, 0, 2, 3])
        y = ops.gather_rows(x, idx6, 3)
        assert torch.equal(y, ref.gather_rows(x, idx6, 3))
        ops.scatter_residual_relu_(o1, y, idx6, 3)
        ref.scatter_residual_relu_(o2, y, idx6, 3)
        assert torch.equal(o1, o2)
        torch.library.opcheck(torch.ops.dynexec.triton_downsample_b, (x.float(), 8))
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])


# ---------------------------------------------------------------------------------------
# GPU realism without a GPU: compile the kernels to PTX for sm_80
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_to_ptx_for_sm80():
    """Runs the real (non-interpreted) Triton compiler down to PTX for an A100 target in a
    subprocess (no GPU needed), and checks that row copies vectorise to 128-bit accesses
    when rows are 16-aligned. Skipped if this triton build has no NVIDIA backend."""
    code = textwrap.dedent(
        """
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        import triton
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError as e:
            print("SKIP", e); raise SystemExit(0)
        from dynexec.kernels import regroup as rg
        target = GPUTarget("cuda", 80, 32)
        div = [["tt.divisibility", 16]]

        def ptx(fn, sig, consts, aligned=()):
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={(i,): div for i in aligned})
            return triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]

        try:
            ptx(rg._partition_block_count_kernel, {"mask_ptr": "*u8", "block_counts_ptr": "*i32", "N": "i32",
                "BLOCK": "constexpr"}, {"BLOCK": 1024})
        except Exception as e:  # no NVIDIA backend / ptxas in this build
            if "backend" in str(e).lower() or "ptxas" in str(e).lower():
                print("SKIP", e); raise SystemExit(0)
            raise
        psig = {"mask_ptr": "*u8", "idx_ptr": "*i64", "count_ptr": "*i64", "block_counts_ptr": "*i32",
                "N": "i32", "num_blocks": "i32", "BLOCK": "constexpr", "SCAN_BLOCK": "constexpr",
                "MULTI_BLOCK": "constexpr"}
        for mb in (False, True):
            ptx(rg._partition_write_kernel, psig, {"BLOCK": 1024, "SCAN_BLOCK": 64, "MULTI_BLOCK": mb})
        g = ptx(rg._gather_rows_kernel, {"x_ptr": "*fp32", "idx_ptr": "*i64", "y_ptr": "*fp32", "N": "i32",
                "ROW": "i32", "count": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, aligned=(0, 1, 2, 4))
        assert "ld.global.v4" in g and "st.global.v4" in g, "gather not vectorised"
        s = ptx(rg._scatter_residual_relu_kernel, {"out_ptr": "*bf16", "y_ptr": "*bf16", "idx_ptr": "*i64",
                "N": "i32", "ROW": "i32", "count": "i32", "BLOCK": "constexpr", "UPCAST": "constexpr",
                "SOFT_BF16": "constexpr"}, {"BLOCK": 1024, "UPCAST": True, "SOFT_BF16": False},
                aligned=(0, 1, 2, 4))
        assert "ld.global.v4" in s and "cvt.rn.bf16" in s
        names = ["total", "C", "HO", "WO", "sxn", "sxc", "sxh", "sxw", "szn", "szc", "szh", "szw", "RATIO"]
        for dt, cl, i64 in (("fp16", True, False), ("fp32", False, True), ("bf16", False, False)):
            sig = {"x_ptr": "*" + dt, "z_ptr": "*" + dt}
            sig.update({a: "i64" if i64 else "i32" for a in names})
            flags = ["BLOCK", "CHANNELS_LAST", "UPCAST", "SOFT_BF16", "INDEX_64"]
            sig.update({a: "constexpr" for a in flags})
            ptx(rg._downsample_b_kernel, sig, {"BLOCK": 1024, "CHANNELS_LAST": cl, "UPCAST": dt != "fp32",
                "SOFT_BF16": False, "INDEX_64": i64})
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 0 and res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
