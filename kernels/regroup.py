"""Triton kernels + Python launchers for the dynexec regrouping ops.

Semantics are defined by :mod:`dynexec.runtime.ops.reference` (the contract); this module
reproduces them with Triton kernels:

* :func:`partition`              stable compaction of a boolean routing mask
* :func:`gather_rows`            ``y[i] = x[idx[i]]`` for ``i < count``
* :func:`scatter_residual_relu_` ``out[idx[i]] = relu(y[i] + out[idx[i]])`` in place
* :func:`scatter_residual_relu_pool_` the same, plus ``pooled[idx[i]] = out[idx[i]].mean((H, W))``
* :func:`relu_pool_`             ``x = relu(x)`` in place and ``pooled = x.mean((H, W))``, one pass
* :func:`downsample_b`           2x2 avg pool + zero channels (BlockDrop shortcut B)

Running on CPU tensors (tests, no GPU)
-------------------------------------
Triton decides *when a kernel is decorated* whether it is compiled for a GPU or run by
the Triton interpreter: ``TRITON_INTERPRET=1`` must be in the environment **before this
module is imported** (i.e. before the ``@triton.jit`` decorators run). If the module was
imported without it, set the variable and ``importlib.reload`` this module; the torch ops
in :mod:`dynexec.kernels.ops` look the launchers up at call time, so they follow the
reload. Launching a compiled (non-interpreted) kernel on CPU tensors raises a
``RuntimeError`` explaining this.

Layout
------
All 4-D tensors here have the batch dimension outermost both in NCHW-contiguous and in
channels_last layout, so one "row" (sample) is one contiguous run of ``numel // N``
elements. gather/scatter therefore copy rows as flat vectors. Non-contiguous inputs to
``gather_rows`` are first made row-contiguous (``x.contiguous(memory_format=...)``,
a copy); ``scatter_residual_relu_`` refuses a non-row-contiguous ``out`` (it must write
in place) and converts ``y`` to ``out``'s layout if needed. ``downsample_b`` and
``scatter_residual_relu_pool_`` / ``relu_pool_`` read (and write) their 4-D tensors through strides, so
they accept any layout and never copy.

Interpreter reload
------------------
Triton's own ``@triton.jit`` library helpers (``tl.sum``, ``tl.cumsum``, ``tl.zeros``,
``tl.cdiv``, ...) are bound when ``triton`` is first imported. If that happened without
``TRITON_INTERPRET=1`` and this module is reloaded with it, those helpers can't be called
from an interpreted kernel. The kernels therefore use only builtins (``tl.reduce``,
``tl.associative_scan``, ``tl.full``, ``tl.where``) with a combine function the
interpreter evaluates itself, and work in either import order.

Index safety
------------
Kernels mask every load/store with ``0 <= row < N`` so an out-of-range index can never
touch memory outside the tensors (gather writes zeros for such rows, scatter skips them).
On CPU (interpreter) the launchers additionally validate ``idx[:count]`` and raise a
``ValueError``. On CUDA that check would need a device->host sync, so it is skipped
(set ``dynexec.kernels.regroup.CHECK_INDICES_ON_DEVICE = True`` to force it while
debugging); scatter indices are checked to be distinct under the same rule.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # torch >= 2.6; keeps kernels traceable by torch.compile when used inside triton_op
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch
    def _wrap_triton(kernel):
        return kernel

__all__ = [
    "partition",
    "gather_rows",
    "scatter_residual_relu_",
    "scatter_residual_relu_pool_",
    "relu_pool_",
    "downsample_b",
    "SUPPORTED_DTYPES",
    "kernels_interpreted",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: Validate index ranges on CUDA too (costs a device->host sync per call).
CHECK_INDICES_ON_DEVICE = False

# Partition: masks up to this size are handled by a single program (one launch).
_PARTITION_SINGLE_MAX = 4096
# Partition block size of the multi-block path.
_PARTITION_BLOCK = 1024
# Max row-chunk programs along grid axis 1 (CUDA limit for grid.y is 65535).
_MAX_GRID_Y = 65535
# Max programs along grid axis 0 (CUDA limit for grid.x is 2**31 - 1).
_MAX_GRID_X = 2**31 - 1


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _f32_to_bf16_rne(v):
    """fp32 -> bf16 with round-to-nearest-even done in integer arithmetic.

    Only used under the Triton interpreter (SOFT_BF16=True): its fp32->bf16 cast
    truncates (and its "rtne" mode rounds half up without carry), which differs from
    torch and from the GPU's native cvt.rn.bf16.f32 by 1 ulp. NaN stays a quiet NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    res = tl.where(v != v, (bits >> 16) | 0x40, rounded)
    return res.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast_to(v, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:
        return _f32_to_bf16_rne(v)
    else:
        return v.to(dtype)

@triton.jit
def _add(a, b):
    return a + b


# Combine function for sums/prefix sums. Triton's own ``_sum_combine`` (what tl.sum and
# tl.cumsum use) is preferred: the interpreter recognises it by identity and runs
# np.sum / np.cumsum instead of calling the combine function element by element (10x
# faster), and it never calls it, so it also works after a reload (see module docstring).
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", None) or _add


@triton.jit
def _partition_block_count_kernel(mask_ptr, block_counts_ptr, N, BLOCK: tl.constexpr):
    """block_counts[b] = number of True entries of mask[b*BLOCK : (b+1)*BLOCK]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(mask_ptr + offs, mask=offs < N, other=0)
    active = (m != 0).to(tl.int32)
    tl.store(block_counts_ptr + pid, tl.reduce(active, 0, _SUM_COMBINE))


@triton.jit
def _partition_write_kernel(
    mask_ptr,
    idx_ptr,
    count_ptr,
    block_counts_ptr,
    N,
    num_blocks,
    BLOCK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    MULTI_BLOCK: tl.constexpr,
):
    """Write the stable partition permutation.

    Row i with mask True goes to position (#True before i); row i with mask False goes
    to count + (#False before i). In the multi-block case each program first reduces
    the per-block counts of all preceding blocks (and all blocks for the total).
    """
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK
    offs = base + tl.arange(0, BLOCK)
    in_range = offs < N
    m = tl.load(mask_ptr + offs, mask=in_range, other=0)
    active = ((m != 0) & in_range).to(tl.int32)
    incl = tl.associative_scan(active, 0, _SUM_COMBINE)  # inclusive count of actives within the block

    if MULTI_BLOCK:
        prefix = tl.full((), 0, tl.int64)
        total = tl.full((), 0, tl.int64)
        for start in range(0, num_blocks, SCAN_BLOCK):
            b = start + tl.arange(0, SCAN_BLOCK)
            bc = tl.load(block_counts_ptr + b, mask=b < num_blocks, other=0).to(tl.int64)
            total += tl.reduce(bc, 0, _SUM_COMBINE)
            prefix += tl.reduce(tl.where(b < pid, bc, 0), 0, _SUM_COMBINE)
    else:
        prefix = tl.full((), 0, tl.int64)
        total = tl.reduce(active, 0, _SUM_COMBINE).to(tl.int64)

    act_before_incl = prefix + incl.to(tl.int64)  # actives in [0, i]
    # position of an active row: actives strictly before it
    pos_active = act_before_incl - 1
    # position of an inactive row: total + inactives strictly before it
    pos_inactive = total + (offs - act_before_incl)
    pos = tl.where(active != 0, pos_active, pos_inactive)
    tl.store(idx_ptr + pos, offs, mask=in_range)
    if pid == 0:
        tl.store(count_ptr, total)


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    idx_ptr,
    y_ptr,
    N,
    ROW,
    count,
    BLOCK: tl.constexpr,
):
    """y[i, :] = x[idx[i], :] for rows of ROW contiguous elements. grid = (rows, chunks)."""
    i = tl.program_id(0)
    if i < count:  # surplus programs (if any) exit
        src = tl.load(idx_ptr + i)  # int64
        valid = (src >= 0) & (src < N)
        load_limit = tl.where(valid, ROW, 0)  # invalid index: load nothing, write zeros
        src_base = src * ROW  # int64: rows may exceed 2**31 elements in total
        dst_base = i.to(tl.int64) * ROW
        step = tl.num_programs(1) * BLOCK
        for start in range(tl.program_id(1) * BLOCK, ROW, step):
            cols = start + tl.arange(0, BLOCK)
            cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK), BLOCK)
            cmask = cols < ROW
            v = tl.load(x_ptr + src_base + cols, mask=cols < load_limit, other=0)
            tl.store(y_ptr + dst_base + cols, v, mask=cmask)


@triton.jit
def _scatter_residual_relu_kernel(
    out_ptr,
    y_ptr,
    idx_ptr,
    N,
    ROW,
    count,
    BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """out[idx[i], :] = relu(y[i, :] + out[idx[i], :]). grid = (rows, chunks)."""
    i = tl.program_id(0)
    if i < count:
        dst = tl.load(idx_ptr + i)  # int64
        valid = (dst >= 0) & (dst < N)
        limit = tl.where(valid, ROW, 0)  # invalid index: touch nothing
        dst_base = dst * ROW
        src_base = i.to(tl.int64) * ROW
        step = tl.num_programs(1) * BLOCK
        for start in range(tl.program_id(1) * BLOCK, ROW, step):
            cols = start + tl.arange(0, BLOCK)
            cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK), BLOCK)
            cmask = cols < limit
            o = tl.load(out_ptr + dst_base + cols, mask=cmask, other=0)
            y = tl.load(y_ptr + src_base + cols, mask=cmask, other=0)
            if UPCAST:  # fp16/bf16: add in fp32 then round once (same as torch's CPU/CUDA add)
                s = o.to(tl.float32) + y.to(tl.float32)
            else:
                s = o + y
            # relu that keeps NaN (like torch.relu): NaN < 0 is False -> NaN kept
            r = tl.where(s < 0, 0.0, s)
            tl.store(out_ptr + dst_base + cols, _cast_to(r, out_ptr.dtype.element_ty, SOFT_BF16), mask=cmask)


@triton.jit
def _scatter_residual_relu_pool_kernel(
    out_ptr,
    y_ptr,
    idx_ptr,
    pooled_ptr,
    N,
    C,
    W,
    HW,
    count,
    soc,
    soh,
    sow,
    son,
    syc,
    syh,
    syw,
    syn,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    FLAT_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    HAS_Y: tl.constexpr = True,
    HAS_IDX: tl.constexpr = True,
):
    """out[idx[i]] = relu(y[i] + out[idx[i]]) and pooled[idx[i], c] = the mean over (h, w)
    of the new out[idx[i], c]. relu_pool_ runs it with HAS_Y = HAS_IDX = False: row i
    itself (idx_ptr unused) becomes relu(out[i]) (y_ptr and its strides unused).
    grid = (count, channel blocks): a program owns BLOCK_C
    channels of one row and sums them over all of H*W itself, so no sum is split between
    programs. out and y are addressed through their strides; FLAT_HW: (h, w) collapse to
    one stride (soh = W * sow, likewise for y), so the plane is p * sow (contiguity along
    the plane or the channels is then visible to the compiler)."""
    i = tl.program_id(0)
    if i < count:
        if HAS_IDX:
            dst = tl.load(idx_ptr + i)  # int64
        else:
            dst = i.to(tl.int64)
        valid = (dst >= 0) & (dst < N)
        c_limit = tl.where(valid, C, 0)  # invalid index: touch nothing
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < c_limit
        c64 = c.to(tl.int64)
        o_row = out_ptr + dst * son
        y_row = y_ptr + i.to(tl.int64) * syn
        acc = tl.full([BLOCK_C, BLOCK_HW], 0, ACC_DTYPE)
        for start in range(0, HW, BLOCK_HW):
            p = start + tl.arange(0, BLOCK_HW)
            m = c_ok[:, None] & (p < HW)[None, :]
            if FLAT_HW:
                o_off = c64[:, None] * soc + (p.to(tl.int64) * sow)[None, :]
                y_off = c64[:, None] * syc + (p.to(tl.int64) * syw)[None, :]
            else:
                h = (p // W).to(tl.int64)
                w = (p % W).to(tl.int64)
                o_off = c64[:, None] * soc + (h * soh + w * sow)[None, :]
                y_off = c64[:, None] * syc + (h * syh + w * syw)[None, :]
            o = tl.load(o_row + o_off, mask=m, other=0)
            if not HAS_Y:
                s = o.to(tl.float32) if UPCAST else o  # (exact; ReLU in fp32 as the scatter)
            elif UPCAST:  # fp16/bf16: add in fp32 then round once (as the scatter)
                s = o.to(tl.float32) + tl.load(y_row + y_off, mask=m, other=0).to(tl.float32)
            else:
                s = o + tl.load(y_row + y_off, mask=m, other=0)
            v = _cast_to(tl.where(s < 0, 0.0, s), out_ptr.dtype.element_ty, SOFT_BF16)
            tl.store(o_row + o_off, v, mask=m)
            acc += v.to(ACC_DTYPE)  # the stored (rounded) value, as out.mean() sees it
        mean = tl.reduce(acc, 1, _SUM_COMBINE) / HW
        tl.store(pooled_ptr + dst * C + c64, _cast_to(mean, pooled_ptr.dtype.element_ty, SOFT_BF16),
                 mask=c_ok)


@triton.jit
def _downsample_b_kernel(
    x_ptr,
    z_ptr,
    total,  # N * C * HO * WO pooled elements
    C,
    HO,
    WO,
    sxn,
    sxc,
    sxh,
    sxw,
    szn,
    szc,
    szh,
    szw,
    RATIO,  # out_channels // C
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """One pass: pooled = (x00 + x01 + x10 + x11) * 0.25, z[:, :C] = pooled and
    z[:, jC:(j+1)C] = pooled * 0 for j >= 1 (keeps NaN/Inf and the sign of zero exactly
    as the reference). Work items are pooled elements enumerated in z's memory order so
    stores are coalesced (NCHW: w fastest; NHWC: c fastest)."""
    pid = tl.program_id(0)
    if INDEX_64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    emask = offs < total
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        wo = t % WO
        t = t // WO
        ho = t % HO
        n = t // HO
    else:
        wo = offs % WO
        t = offs // WO
        ho = t % HO
        t = t // HO
        c = t % C
        n = t // C
    xbase = n * sxn + c * sxc + (2 * ho) * sxh + (2 * wo) * sxw
    x00 = tl.load(x_ptr + xbase, mask=emask, other=0)
    x01 = tl.load(x_ptr + xbase + sxw, mask=emask, other=0)
    x10 = tl.load(x_ptr + xbase + sxh, mask=emask, other=0)
    x11 = tl.load(x_ptr + xbase + sxh + sxw, mask=emask, other=0)
    if UPCAST:
        x00 = x00.to(tl.float32)
        x01 = x01.to(tl.float32)
        x10 = x10.to(tl.float32)
        x11 = x11.to(tl.float32)
    pooled = (((x00 + x01) + x10) + x11) * 0.25
    zbase = n * szn + c * szc + ho * szh + wo * szw
    tl.store(z_ptr + zbase, _cast_to(pooled, z_ptr.dtype.element_ty, SOFT_BF16), mask=emask)
    zeros = _cast_to(pooled * 0.0, z_ptr.dtype.element_ty, SOFT_BF16)
    for j in range(1, RATIO):
        tl.store(z_ptr + zbase + (j * C) * szc, zeros, mask=emask)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def kernels_interpreted() -> bool:
    """True if this module's kernels were created under TRITON_INTERPRET=1."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(_gather_rows_kernel, InterpretedFunction)


def _soft_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and kernels_interpreted()


def _is_real(t: torch.Tensor) -> bool:
    """False for fake / functional / meta tensors (no data to inspect)."""
    if t.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return True
    return not is_fake(t) and not torch._is_functional_tensor(t)


def _check_launchable(name: str, *tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise RuntimeError(
                f"{name}: all tensors must be on the same device; expected {dev}, got {t.device}"
            )
    if dev.type == "cuda" or dev.type == "meta":
        return dev
    if dev.type == "cpu":
        if not kernels_interpreted():
            raise RuntimeError(
                f"{name}: CPU tensors need the Triton interpreter, but "
                "dynexec.kernels.regroup was imported without TRITON_INTERPRET=1. Set "
                "TRITON_INTERPRET=1 before importing it (or set it and "
                "importlib.reload(dynexec.kernels.regroup))."
            )
        return dev
    raise RuntimeError(f"{name}: unsupported device {dev}; expected a CUDA device or CPU (interpreter)")


def _check_dtype(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: {arg} must have dtype float32, float64, float16 or bfloat16, got {t.dtype}"
        )


def _check_count(name: str, count, idx: torch.Tensor, upper: int | None = None, upper_what: str = "") -> int:
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)):
        try:
            import operator

            count = operator.index(count)
        except TypeError:
            raise ValueError(f"{name}: count must be a Python int, got {type(count).__name__}") from None
    if count < 0:
        raise ValueError(f"{name}: count must be >= 0, got {count}")
    if count > idx.numel():
        raise ValueError(f"{name}: count must be <= idx.numel() = {idx.numel()}, got {count}")
    if upper is not None and count > upper:
        raise ValueError(f"{name}: count must be <= {upper_what} = {upper}, got {count}")
    return count


def _check_idx(name: str, idx: torch.Tensor) -> None:
    if idx.dtype != torch.int64:
        raise ValueError(f"{name}: idx must have dtype torch.int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name}: idx must be 1-D, got shape {tuple(idx.shape)}")


def _check_idx_values(name: str, rows: torch.Tensor, n: int, distinct: bool = False) -> None:
    """Range (and, for scatters, distinctness) check of idx[:count]: CPU always; CUDA only
    if CHECK_INDICES_ON_DEVICE, since it needs a host sync."""
    if rows.numel() == 0 or not _is_real(rows):
        return
    if rows.device.type != "cpu" and not CHECK_INDICES_ON_DEVICE:
        return
    lo = int(rows.min())
    hi = int(rows.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: idx[:count] must be in [0, {n}), found {bad}")
    if distinct and torch.unique(rows).numel() != rows.numel():
        raise ValueError(f"{name}: idx[:count] must hold distinct rows; found duplicate indices")


def _row_format(x: torch.Tensor) -> torch.memory_format:
    """Same rule as the reference's _memory_format: channels_last only if the 4-D
    tensor is channels_last-contiguous and not (also) NCHW-contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _is_row_contiguous(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _row_launch_config(row: int) -> tuple[int, int, int]:
    """(BLOCK, chunks along grid axis 1, num_warps) for row copies of `row` elements."""
    block = min(4096, max(128, _next_pow2(row)))
    chunks = min(triton.cdiv(row, block), _MAX_GRID_Y)
    num_warps = 8 if block >= 2048 else 4
    return block, chunks, num_warps


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable compaction: idx = [active rows ascending] + [inactive rows ascending],
    count = number of active rows as a 0-dim int64 tensor on mask's device. No host sync.

    Masks with N <= 4096 use one program (one launch); larger masks use two launches
    (per-block counts, then each block reduces the counts before it and writes)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"partition: mask must be a torch.Tensor, got {type(mask).__name__}")
    dev = _check_launchable("partition", mask)
    m = mask.reshape(-1)
    if m.dtype != torch.bool:
        m = m != 0
    m = m.contiguous().view(torch.uint8)
    n = m.numel()
    if n >= 2**31:
        raise ValueError(f"partition: mask has {n} elements; at most 2**31 - 1 are supported")
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    count = torch.zeros((), dtype=torch.int64, device=dev)
    if n == 0:
        return idx, count
    if n <= _PARTITION_SINGLE_MAX:
        block = max(16, _next_pow2(n))
        _wrap_triton(_partition_write_kernel)[(1,)](
            m, idx, count, count, n, 1,  # block_counts unused (count passed as a dummy pointer)
            BLOCK=block, SCAN_BLOCK=16, MULTI_BLOCK=False, num_warps=8 if block >= 2048 else 4,
        )
        return idx, count
    block = _PARTITION_BLOCK
    num_blocks = triton.cdiv(n, block)
    block_counts = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    _wrap_triton(_partition_block_count_kernel)[(num_blocks,)](m, block_counts, n, BLOCK=block, num_warps=4)
    scan_block = min(1024, max(16, _next_pow2(num_blocks)))
    _wrap_triton(_partition_write_kernel)[(num_blocks,)](
        m, idx, count, block_counts, n, num_blocks,
        BLOCK=block, SCAN_BLOCK=scan_block, MULTI_BLOCK=True, num_warps=4,
    )
    return idx, count


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: int) -> torch.Tensor:
    """y[i] = x[idx[i]] for i < count. y is fresh, keeps x's dtype/device/memory format.

    A non-row-contiguous x is first copied to a row-contiguous layout (its reference
    memory format), then rows are copied as flat vectors."""
    name = "gather_rows"
    if not isinstance(x, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name}: x and idx must be torch.Tensors")
    _check_launchable(name, x, idx)
    _check_dtype(name, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least 1 dimension (rows), got a 0-dim tensor")
    _check_idx(name, idx)
    count = _check_count(name, count, idx)
    n = x.shape[0]
    rows = idx[:count]
    _check_idx_values(name, rows, n)
    fmt = _row_format(x)
    y = torch.empty((count,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    row = y[0].numel() if count > 0 else 0
    if count == 0 or row == 0:
        return y
    if count > _MAX_GRID_X:
        raise ValueError(f"{name}: count must be <= {_MAX_GRID_X}, got {count}")
    xc = x.contiguous(memory_format=fmt)
    rows = rows.contiguous()
    block, chunks, num_warps = _row_launch_config(row)
    _wrap_triton(_gather_rows_kernel)[(count, chunks)](
        xc, rows, y, n, row, count, BLOCK=block, num_warps=num_warps
    )
    return y


def scatter_residual_relu_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int) -> None:
    """out[idx[i]] = relu(y[i] + out[idx[i]]) for i < count, in place (fused, one pass).

    out must be row-contiguous (NCHW-contiguous or channels_last); y is converted to
    out's layout if it differs. idx[:count] must be distinct and in [0, N)."""
    name = "scatter_residual_relu_"
    if not all(isinstance(t, torch.Tensor) for t in (out, y, idx)):
        raise ValueError(f"{name}: out, y and idx must be torch.Tensors")
    _check_launchable(name, out, y, idx)
    _check_dtype(name, "out", out)
    if y.dtype != out.dtype:
        raise ValueError(f"{name}: y must have the same dtype as out ({out.dtype}), got {y.dtype}")
    if out.dim() < 1:
        raise ValueError(f"{name}: out must have at least 1 dimension (rows), got a 0-dim tensor")
    if y.dim() != out.dim() or tuple(y.shape[1:]) != tuple(out.shape[1:]):
        raise ValueError(
            f"{name}: y must have shape [>=count, {', '.join(map(str, out.shape[1:]))}] "
            f"(matching out), got {tuple(y.shape)}"
        )
    _check_idx(name, idx)
    n = out.shape[0]
    count = _check_count(name, count, idx, upper=y.shape[0], upper_what="y.shape[0]")
    if count > n:
        raise ValueError(f"{name}: count must be <= out.shape[0] = {n} (indices are distinct), got {count}")
    if not _is_row_contiguous(out):
        raise RuntimeError(
            f"{name}: out must be row-contiguous (contiguous or channels_last) to be updated in "
            f"place; got shape {tuple(out.shape)} with strides {out.stride()}"
        )
    rows = idx[:count]
    _check_idx_values(name, rows, n, distinct=True)
    row = out[0].numel() if n > 0 else 0
    if count == 0 or row == 0:
        return None
    fmt = torch.contiguous_format if out.is_contiguous() else torch.channels_last
    yc = y[:count].contiguous(memory_format=fmt)
    rows = rows.contiguous()
    block, chunks, num_warps = _row_launch_config(row)
    _wrap_triton(_scatter_residual_relu_kernel)[(count, chunks)](
        out, yc, rows, n, row, count,
        BLOCK=block, UPCAST=out.dtype in (torch.float16, torch.bfloat16),
        SOFT_BF16=_soft_bf16(out.dtype), num_warps=num_warps,
    )
    return None


def scatter_residual_relu_pool_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int,
                                pooled: torch.Tensor) -> None:
    """scatter_residual_relu_(out, y, idx, count) and pooled[idx[i], c] = the mean over
    (h, w) of the new out[idx[i], c], in one pass (means accumulated in fp32, fp64 for
    fp64). out is 4-D with any strides (updated in place through them); pooled is a
    contiguous [N, C] tensor of out's dtype; its other rows are left untouched."""
    name = "scatter_residual_relu_pool_"
    if not all(isinstance(t, torch.Tensor) for t in (out, y, idx, pooled)):
        raise ValueError(f"{name}: out, y, idx and pooled must be torch.Tensors")
    _check_launchable(name, out, y, idx, pooled)
    _check_dtype(name, "out", out)
    if y.dtype != out.dtype:
        raise ValueError(f"{name}: y must have the same dtype as out ({out.dtype}), got {y.dtype}")
    if out.dim() != 4:
        raise ValueError(f"{name}: out must be 4-D [N, C, H, W], got shape {tuple(out.shape)}")
    if y.dim() != 4 or tuple(y.shape[1:]) != tuple(out.shape[1:]):
        raise ValueError(
            f"{name}: y must have shape [>=count, {', '.join(map(str, out.shape[1:]))}] "
            f"(matching out), got {tuple(y.shape)}"
        )
    _check_pooled(name, "out", out, pooled)
    _check_idx(name, idx)
    n, c, h, w = out.shape
    count = _check_count(name, count, idx, upper=y.shape[0], upper_what="y.shape[0]")
    if count > n:
        raise ValueError(f"{name}: count must be <= out.shape[0] = {n} (indices are distinct), got {count}")
    rows = idx[:count]
    _check_idx_values(name, rows, n, distinct=True)
    _launch_pool(name, out, y, rows.contiguous(), count, pooled)
    return None


def relu_pool_(x: torch.Tensor, pooled: torch.Tensor) -> None:
    """x = relu(x) in place (through its strides, NaN kept) and pooled[n, c] = the mean over
    (h, w) of the new x[n, c] for every n, in one pass (accumulated in fp32, fp64 for
    fp64). pooled is a contiguous [N, C] tensor of x's dtype."""
    name = "relu_pool_"
    if not all(isinstance(t, torch.Tensor) for t in (x, pooled)):
        raise ValueError(f"{name}: x and pooled must be torch.Tensors")
    _check_launchable(name, x, pooled)
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    _check_dtype(name, "x", x)
    _check_pooled(name, "x", x, pooled)
    _launch_pool(name, x, None, None, x.shape[0], pooled)
    return None


def _check_pooled(name: str, arg: str, t: torch.Tensor, pooled: torch.Tensor) -> None:
    if pooled.dtype != t.dtype:
        raise ValueError(f"{name}: pooled must have the same dtype as {arg} ({t.dtype}), got {pooled.dtype}")
    if tuple(pooled.shape) != tuple(t.shape[:2]):
        raise ValueError(f"{name}: pooled must have shape [N, C] = {list(t.shape[:2])}, got "
                         f"{list(pooled.shape)}")
    if not pooled.is_contiguous():
        raise ValueError(f"{name}: pooled must be contiguous, got strides {pooled.stride()}")


def _launch_pool(name: str, out: torch.Tensor, y: torch.Tensor | None, rows: torch.Tensor | None,
                 count: int, pooled: torch.Tensor) -> None:
    """Launches the pool kernel on rows[:count] of out (all of out's first `count` rows if
    rows is None) with the residual y (no residual if y is None)."""
    n, c, h, w = out.shape
    if count == 0 or c == 0:
        return
    if count > _MAX_GRID_X:
        raise ValueError(f"{name}: count must be <= {_MAX_GRID_X}, got {count}")
    hw = h * w

    def plane_stride(t):  # the one stride of the (h, w) plane, or None if it has none
        if h == 1 or w == 1:
            return t.stride(3) if h == 1 else t.stride(2)
        return t.stride(3) if t.stride(2) == w * t.stride(3) else None

    ys = out if y is None else y  # (y's pointer and strides are unused without a residual)
    flat = plane_stride(out) is not None and plane_stride(ys) is not None
    so = (out.stride(1), out.stride(2), plane_stride(out) if flat else out.stride(3), out.stride(0))
    sy = (ys.stride(1), ys.stride(2), plane_stride(ys) if flat else ys.stride(3), ys.stride(0))
    block_hw = min(256, max(16, _next_pow2(hw)))
    block_c = min(max(16, _next_pow2(c)), max(16, 4096 // block_hw))
    grid = (count, min(triton.cdiv(c, block_c), _MAX_GRID_Y))
    if grid[1] * block_c < c:
        raise ValueError(f"{name}: C = {c} is too large for one launch")
    _wrap_triton(_scatter_residual_relu_pool_kernel)[grid](
        out, ys, pooled if rows is None else rows, pooled, n, c, w, hw, count, *so, *sy,
        BLOCK_C=block_c, BLOCK_HW=block_hw, FLAT_HW=flat,
        ACC_DTYPE=tl.float64 if out.dtype == torch.float64 else tl.float32,
        UPCAST=out.dtype in (torch.float16, torch.bfloat16), SOFT_BF16=_soft_bf16(out.dtype),
        HAS_Y=y is not None, HAS_IDX=rows is not None,
        num_warps=4,
    )


def downsample_b(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """z = cat([avg_pool2d(x, 2)] + [avg_pool2d(x, 2) * 0] * (out_channels // C - 1), 1)
    in one pass; z keeps x's memory format (NCHW or channels_last). x is read through its
    strides, so non-contiguous inputs are not copied."""
    name = "downsample_b"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    dev = _check_launchable(name, x)
    _check_dtype(name, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if isinstance(out_channels, bool) or not isinstance(out_channels, (int, torch.SymInt)):
        raise ValueError(f"{name}: out_channels must be a Python int, got {type(out_channels).__name__}")
    if c <= 0:
        raise ValueError(f"{name}: x must have at least one channel, got shape {tuple(x.shape)}")
    if out_channels <= 0 or out_channels % c != 0:
        raise ValueError(
            f"{name}: out_channels must be a positive multiple of C = {c}, got {out_channels}"
        )
    if h < 2 or w < 2:  # same condition under which the reference's avg_pool2d raises
        raise ValueError(
            f"{name}: H and W must be >= 2 for a 2x2 pool (the output would be empty), "
            f"got shape {tuple(x.shape)}"
        )
    ho, wo = h // 2, w // 2
    fmt = _row_format(x)
    channels_last = fmt == torch.channels_last
    z = torch.empty((n, out_channels, ho, wo), dtype=x.dtype, device=dev, memory_format=fmt)
    total = n * c * ho * wo
    if total == 0:
        return z
    # int32 index math unless some offset could overflow it
    max_off = max(total, z.numel(), sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) + 1)
    index_64 = max_off >= 2**31 - 1
    block = 1024
    _wrap_triton(_downsample_b_kernel)[(triton.cdiv(total, block),)](
        x, z, total, c, ho, wo,
        *x.stride(), *z.stride(),
        out_channels // c,
        BLOCK=block, CHANNELS_LAST=channels_last,
        UPCAST=x.dtype in (torch.float16, torch.bfloat16), SOFT_BF16=_soft_bf16(x.dtype),
        INDEX_64=index_64, num_warps=4,
    )
    return z
