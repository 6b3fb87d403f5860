"""Index-driven implicit-GEMM convolution for dynamic-depth ResNets (Triton).

Why this exists
---------------
In SkipNet / BlockDrop only the samples routed to a residual block run it. The
first dynexec backend compacts the active samples with host-side counts, which
costs one device->host synchronisation per gated block. The kernels here follow
the fused-MoE recipe instead:

* the routing is described by ``partition(mask) -> (idx[N] int64, count[] int64)``
  that stays on the device (``idx`` lists the active rows ascending, then the
  inactive ones; ``count`` is a 0-dim tensor);
* every launch is sized for the *full* batch (``N_total x Hout x Wout`` GEMM rows);
  programs whose first row lies past ``count * Hout * Wout`` exit immediately, so
  the launch sequence (and the grid) does not depend on the routing and a whole
  forward can be captured in one CUDA graph;
* the gather is fused into the operand load (input rows are read through
  ``idx``) and the scatter into the epilogue (bias, residual add, ReLU, store
  through ``idx``).

An executed BasicBlock is therefore two launches::

    ws  = indexed_conv2d(x,  w1, b1, kernel_size=3, stride=1, idx=idx, count=count,
                         gather=True, relu=True, out=ws)                     # compact
    indexed_conv2d(ws, w2, b2, kernel_size=3, stride=1, idx=idx, count=count,
                   gather=False, relu=True, residual=x, out=x, scatter=True)  # in place

and a skipped identity block costs nothing (its rows of ``x`` are never written).

GEMM view
---------
``M = count x Hout x Wout`` (one row per output pixel of an active sample),
``N = Cout``, ``K = KH x KW x Cin``. Activations are read in NHWC order
(``channels_last``); the kernel takes explicit strides so any layout is *correct*,
but only NHWC gives contiguous (coalesced / vectorised) channel reads. Weights are
packed once by :func:`pack_weight` into a ``[K, Cout]`` row-major matrix with K
ordered ``(kh, kw, cin)`` so that a K-tile is a run of input channels of one
filter tap. The K loop is written as ``for tap in KH*KW: for c0 in range(0, Cin,
BLOCK_K)`` which avoids any div/mod in the inner loop and makes the zero padding a
per-tap row mask.

Row / index conventions (``n_local`` = position among the active samples)
-----------------------------------------------------------------------
* input:    ``gather=True``  -> sample ``idx[n_local]`` of ``x``;
            ``gather=False`` -> sample ``n_local`` of ``x`` (x is already compact).
* output:   ``scatter=True`` -> sample ``idx[n_local]`` of ``out``;
            ``scatter=False``-> sample ``n_local`` of ``out`` (compact store).
* residual: ``residual_gather=True`` (default when ``scatter=True``) -> sample
            ``idx[n_local]`` of ``residual``; otherwise sample ``n_local``.
  ``residual`` may be the very tensor ``out`` (identity shortcut): every output
  element is read and then written by the same program, so this is race free.

Numerics
--------
fp32 (``allow_tf32=False`` -> IEEE fp32 dot, ``True`` -> TF32 tensor cores),
fp16 and bf16 (operands in that dtype, fp32 accumulation, bias in fp32, the
residual is up-converted to fp32 before the add, one rounding at the store), and
fp64 (fp64 accumulation; exercised under the Triton interpreter only).

Interpreter notes: with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
Triton 3.x's interpreter computes ``tl.dot`` of bf16 operands on their raw uint16
bit patterns (wrong results), so under the interpreter bf16 tiles are converted to
fp32 before the dot. That is numerically identical to a bf16 tensor-core MMA with
fp32 accumulation (bf16 x bf16 products are exact in fp32). Its fp32 -> bf16
conversion also truncates (and its round-to-nearest variant mishandles mantissa
carries), so under the interpreter the epilogue rounds to bf16 with integer ops
(RTNE), as the GPU does natively. The interpreter ignores TF32 (it computes in
full fp32).

Reload note: Triton binds its own ``@triton.jit`` helpers (``tl.cdiv``, ``tl.zeros``,
...) when ``triton`` is first imported. If that happened without
``TRITON_INTERPRET=1`` and this module is later reloaded with it (as the tests do),
calling those helpers from an interpreted kernel fails, so the kernel uses only
builtins (``tl.full``, integer arithmetic) and works in either import order.

The module imports without Triton; then only the reference path, :func:`fold_bn`,
:func:`pack_weight` and :func:`get_config` are usable.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton is an optional dependency of dynexec.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

# Evaluated when this module is imported, i.e. when the @triton.jit functions below
# are created; that is also when Triton decides between compiling and interpreting.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "CONFIGS",
    "fold_bn",
    "pack_weight",
    "get_config",
    "conv_output_size",
    "indexed_conv2d",
    "indexed_conv2d_reference",
]


# ----------------------------------------------------------------------------------
# Weight preparation
# ----------------------------------------------------------------------------------
def fold_bn(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
            bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding convolution.

    ``bn`` is a ``torch.nn.BatchNorm2d`` (or any object with ``weight``, ``bias``,
    ``running_mean``, ``running_var`` and ``eps``; ``weight``/``bias`` may be None for
    ``affine=False``). Returns ``(w', b')`` in float32 with
    ``w' = w * gamma / sqrt(var + eps)`` (per output channel) and
    ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``. The computation is done in
    float64 and rounded once to float32.
    """
    w = conv_weight.detach().to(torch.float64)
    cout = w.shape[0]
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    b = (conv_bias.detach().to(torch.float64) if conv_bias is not None
         else torch.zeros(cout, dtype=torch.float64, device=w.device))
    scale = gamma / torch.sqrt(var + bn.eps)
    w_f = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b_f = beta + (b - mean) * scale
    return w_f.to(torch.float32), b_f.to(torch.float32)


def pack_weight(weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pack an OIHW conv weight ``[Cout, Cin, KH, KW]`` into the GEMM operand.

    Returns a contiguous ``[KH*KW*Cin, Cout]`` matrix whose row ``(kh*KW + kw)*Cin +
    cin`` holds ``weight[:, cin, kh, kw]`` -- K ordered (kh, kw, cin) to match NHWC
    activation reads, N (= Cout) contiguous so a ``BLOCK_K x BLOCK_N`` tile is
    ``BLOCK_K`` coalesced row segments. Do this once per model, not per forward.
    ``dtype`` defaults to ``weight.dtype``; use the activation dtype.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D OIHW weight, got shape {tuple(weight.shape)}")
    cout, cin, kh, kw = weight.shape
    w = weight.detach().permute(2, 3, 1, 0).reshape(kh * kw * cin, cout)
    return w.to(dtype or weight.dtype).contiguous()


def unpack_weight(w_packed: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight` (``[K, Cout]`` -> OIHW), used by the reference."""
    k, cout = w_packed.shape
    cin = k // (kernel_size * kernel_size)
    if cin * kernel_size * kernel_size != k:
        raise ValueError(f"packed weight has K={k}, not a multiple of kernel_size**2={kernel_size ** 2}")
    return w_packed.reshape(kernel_size, kernel_size, cin, cout).permute(3, 2, 0, 1)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


# ----------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------
# UNTUNED. These were chosen on paper (no GPU was available when writing them) and
# are meant to be replaced by numbers from `python benchmarks/kernels.py --device
# cuda`, in the spirit of vLLM's per-shape fused-MoE JSON configs. Reasoning:
#
# * BLOCK_N covers Cout when Cout <= 64 (CIFAR 16/32/64) so each gathered A tile is
#   loaded once and the whole output row segment is written by one program (the
#   epilogue's residual read + scatter are then full 32..128-byte rows). For wider
#   ImageNet layers BLOCK_N = 128 (the usual sweet spot for mma.sync / wgmma tiles).
# * BLOCK_K = Cin when Cin in {16, 32} so one filter tap is exactly one K step (no
#   masked lanes); 32 for bf16/fp16 wider layers (64 B per row segment), 64 for the
#   3x3 / 1x1 layers with Cin >= 256 where more K per stage amortises the pipeline.
# * BLOCK_M: CIFAR layers have tiny N, so M tiles are large (128) to give each
#   program enough work; the 8x8-pixel stage at batch 64 has only 4096 rows, i.e. 32
#   programs of 128 rows for 108/132 SMs -- that stage is latency bound whatever the
#   tile (see docs/gpu-performance.md); we use 64 there to get 64 programs.
# * num_warps = 4 for tiles <= 128x64, 8 for 128x128; num_stages = 3 (Ampere
#   cp.async double/triple buffering; 4 is typical on Hopper, but the gathered A
#   loads use pointer tensors, not TMA, so deeper pipelines buy less).
# Key: (Cin, Cout, kernel_size, stride). Values: BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages.
def _cfg(bm, bn, bk, warps=4, stages=3):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


CONFIGS: dict[tuple[int, int, int, int], dict] = {
    # CIFAR ResNet-110 (BasicBlock, widths 16/32/64 at 32/16/8 px).
    (3, 16, 3, 1): _cfg(128, 16, 16),      # stem; Cin=3 padded to 16 lanes per tap
    (16, 16, 3, 1): _cfg(128, 16, 16),
    (16, 32, 3, 2): _cfg(128, 32, 16),
    (16, 32, 1, 2): _cfg(128, 32, 16),     # projection shortcut (option B)
    (32, 32, 3, 1): _cfg(128, 32, 32),
    (32, 64, 3, 2): _cfg(64, 64, 32),
    (32, 64, 1, 2): _cfg(64, 64, 32),
    (64, 64, 3, 1): _cfg(64, 64, 32),
    # ImageNet ResNet-101 Bottleneck (1x1 reduce, 3x3, 1x1 expand, projection).
    (64, 64, 1, 1): _cfg(128, 64, 32),
    # (64, 64, 3, 1): the CIFAR entry above serves the ImageNet layer too.
    (64, 256, 1, 1): _cfg(128, 128, 32, 8),
    (256, 64, 1, 1): _cfg(128, 64, 64),
    (256, 128, 1, 1): _cfg(128, 128, 64, 8),
    (128, 128, 3, 2): _cfg(64, 128, 32),
    (128, 128, 3, 1): _cfg(128, 128, 32, 8),
    (128, 512, 1, 1): _cfg(128, 128, 32, 8),
    (256, 512, 1, 2): _cfg(64, 128, 64),
    (512, 128, 1, 1): _cfg(128, 128, 64, 8),
    (512, 256, 1, 1): _cfg(128, 128, 64, 8),
    (256, 256, 3, 2): _cfg(64, 128, 64),
    (256, 256, 3, 1): _cfg(64, 128, 64),    # 14x14: M = 12544 at batch 64 -> 196x2 programs
    (256, 1024, 1, 1): _cfg(128, 128, 64, 8),
    (512, 1024, 1, 2): _cfg(64, 128, 64),
    (1024, 256, 1, 1): _cfg(64, 128, 64),
    (1024, 512, 1, 1): _cfg(64, 128, 64),
    (512, 512, 3, 2): _cfg(32, 128, 64),    # 7x7: M = 3136 at batch 64, K = 4608
    (512, 512, 3, 1): _cfg(32, 128, 64),
    (512, 2048, 1, 1): _cfg(64, 128, 64),
    (1024, 2048, 1, 2): _cfg(32, 128, 64),
    (2048, 512, 1, 1): _cfg(32, 128, 64),
}


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def get_config(cin: int, cout: int, kernel_size: int, stride: int,
               dtype: torch.dtype = torch.float16) -> dict:
    """Tile configuration for a conv layer (table lookup, else heuristic). Untuned.

    Returns a fresh dict with BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages.
    The heuristic: BLOCK_N = next_pow2(Cout) clamped to [16, 128]; BLOCK_K =
    next_pow2(Cin) clamped to [16, 32] (64 if Cin >= 256); BLOCK_M = 128 for narrow
    outputs (BLOCK_N <= 32), else 64; 8 warps for 128x128 tiles. fp32/fp64 tiles use
    half the BLOCK_K of the 16-bit ones (same bytes per stage in shared memory).
    """
    cfg = CONFIGS.get((cin, cout, kernel_size, stride))
    if cfg is None:
        bn = min(128, max(16, _next_pow2(cout)))
        bk = 64 if cin >= 256 else min(32, max(16, _next_pow2(cin)))
        bm = 128 if bn <= 32 else 64
        warps = 8 if bm * bn >= 128 * 128 else 4
        cfg = _cfg(bm, bn, bk, warps)
    cfg = dict(cfg)
    if dtype in (torch.float32, torch.float64) and cfg["BLOCK_K"] > 16:
        cfg["BLOCK_K"] //= 2
    return cfg


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _indexed_conv2d_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, idx_ptr, count_ptr,
        n_grid, H, W, Cin, Hout, Wout, Cout,
        stride_xn, stride_xh, stride_xw, stride_xc,
        stride_rn, stride_rh, stride_rw, stride_rc,
        stride_on, stride_oh, stride_ow, stride_oc,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        GATHER: tl.constexpr, SCATTER: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_GATHER: tl.constexpr, RELU: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BF16_RTNE: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # 1-D grid, N-tiles fastest: consecutive programs share one gathered A tile
        # (better L2 reuse of the irregular input rows).
        pid = tl.program_id(0)
        num_pid_n = (Cout + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: see note on reload
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n

        # The routing lives on the device: read the active count here, clamp it to
        # the number of samples the grid was sized for, and let surplus programs exit.
        count = tl.load(count_ptr).to(tl.int32)
        count = tl.minimum(tl.maximum(count, 0), n_grid)
        hw_out = Hout * Wout
        m_active = count * hw_out
        if pid_m * BLOCK_M >= m_active:
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_active
        n_local = offs_m // hw_out
        pix = offs_m - n_local * hw_out
        oh = pix // Wout
        ow = pix - oh * Wout

        if GATHER or SCATTER or RES_GATHER:
            row_idx = tl.load(idx_ptr + n_local, mask=mask_m, other=0).to(tl.int64)
        else:
            row_idx = n_local.to(tl.int64)
        if GATHER:
            n_src = row_idx
        else:
            n_src = n_local.to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Cout
        offs_k = tl.arange(0, BLOCK_K)

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)  # not tl.zeros: see note on reload
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        x_row = n_src * stride_xn
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = ih0 + kh
                iw = iw0 + kw
                valid_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_base = x_ptr + (x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)
                w_tap = w_ptr + (kh * KW + kw) * Cin * Cout
                for c0 in range(0, Cin, BLOCK_K):
                    cin = c0 + offs_k
                    mask_k = cin < Cin
                    a = tl.load(a_base[:, None] + cin[None, :] * stride_xc,
                                mask=valid_m[:, None] & mask_k[None, :], other=0.0)
                    b = tl.load(w_tap + cin[:, None] * Cout + offs_n[None, :],
                                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                    if DOT_UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        # Epilogue: bias, residual (through the index), ReLU, (scattered) store.
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc += bias.to(ACC_DTYPE)[None, :]
        mask_out = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            if RES_GATHER:
                n_res = row_idx
            else:
                n_res = n_local.to(tl.int64)
            r_off = n_res * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
            res = tl.load(res_ptr + r_off[:, None] + offs_n[None, :] * stride_rc, mask=mask_out, other=0.0)
            acc += res.to(ACC_DTYPE)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        if SCATTER:
            n_dst = row_idx
        else:
            n_dst = n_local.to(tl.int64)
        o_off = n_dst * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
        if BF16_RTNE:
            # Interpreter only: its fp32->bf16 cast truncates, so round to nearest even
            # by hand (what the GPU's cvt.rn.bf16.f32 does).
            bits = acc.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            val = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            val = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + o_off[:, None] + offs_n[None, :] * stride_oc, val, mask=mask_out)


# ----------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(x, w_packed, bias, kernel_size, stride, padding, idx, count, gather,
                residual, residual_gather, out, scatter):
    """Shared validation for the Triton launcher and the reference. Metadata only:
    never reads device memory (no device->host sync)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W] (NHWC memory), got {tuple(x.shape)}")
    if padding is None:
        padding = (kernel_size - 1) // 2
    n_x, cin, h, w = x.shape
    if w_packed.dim() != 2 or w_packed.shape[0] != kernel_size * kernel_size * cin:
        raise ValueError(
            f"w_packed must be [kernel_size**2 * Cin, Cout] = [{kernel_size * kernel_size * cin}, Cout], "
            f"got {tuple(w_packed.shape)} (use pack_weight)")
    cout = w_packed.shape[1]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != cout):
        raise ValueError(f"bias must be [Cout={cout}], got {tuple(bias.shape)}")
    if count.dim() != 0 or count.dtype not in (torch.int64, torch.int32):
        raise ValueError("count must be a 0-dim int64/int32 tensor on the device (see partition)")
    if residual_gather is None:
        residual_gather = scatter
    needs_idx = gather or scatter or (residual is not None and residual_gather)
    if needs_idx and idx is None:
        raise ValueError("idx is required when gather, scatter or residual_gather is set")
    if idx is not None and (idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32)):
        raise ValueError("idx must be a 1-D int64/int32 tensor")
    # Number of local samples the grid covers (the upper bound for count).
    if idx is not None:
        n_grid = idx.shape[0]
    else:
        n_grid = n_x
    if not gather and n_x < n_grid:
        raise ValueError(f"compact input has {n_x} samples but the grid covers {n_grid} (len(idx))")
    hout = conv_output_size(h, kernel_size, stride, padding)
    wout = conv_output_size(w, kernel_size, stride, padding)
    if scatter and out is None:
        raise ValueError("scatter=True needs an output tensor (the full-batch activation)")
    if out is not None:
        if out.dim() != 4 or tuple(out.shape[1:]) != (cout, hout, wout):
            raise ValueError(f"out must be [*, {cout}, {hout}, {wout}], got {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise ValueError(f"out dtype {out.dtype} != x dtype {x.dtype}")
        if not scatter and out.shape[0] < n_grid:
            raise ValueError(f"compact out needs >= {n_grid} samples, has {out.shape[0]}")
    if residual is not None:
        if residual.dim() != 4 or tuple(residual.shape[1:]) != (cout, hout, wout):
            raise ValueError(f"residual must be [*, {cout}, {hout}, {wout}], got {tuple(residual.shape)}")
        if not residual_gather and residual.shape[0] < n_grid:
            raise ValueError(f"compact residual needs >= {n_grid} samples, has {residual.shape[0]}")
    return padding, cout, hout, wout, n_grid, residual_gather


def _alloc_out(x, n_rows, cout, hout, wout):
    return torch.empty((n_rows, cout, hout, wout), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def indexed_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: int,
    stride: int,
    idx: Optional[torch.Tensor],
    count: torch.Tensor,
    gather: bool,
    relu: bool,
    residual: Optional[torch.Tensor] = None,
    residual_gather: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
    scatter: bool = False,
    padding: Optional[int] = None,
    allow_tf32: bool = False,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Routed convolution + folded-BN bias (+ residual) (+ ReLU) in one launch.

    Args:
      x: input activations ``[N_x, Cin, H, W]``, ideally ``channels_last``. With
        ``gather=True`` it is the full batch and local sample ``i`` reads
        ``x[idx[i]]``; with ``gather=False`` it is compact (``x[i]``), ``N_x >= len(idx)``.
      w_packed: ``[KH*KW*Cin, Cout]`` from :func:`pack_weight`, dtype of ``x``.
      bias: ``[Cout]`` (float32 recommended, e.g. from :func:`fold_bn`) or None.
      kernel_size, stride, padding: square conv geometry; padding defaults to
        ``(kernel_size - 1) // 2`` (1 for 3x3, 0 for 1x1).
      idx: ``[N_total]`` int64 permutation from ``partition`` (active rows first).
        May be None only if nothing is gathered/scattered; then the grid covers ``N_x``.
      count: 0-dim int64 device tensor, the number of active samples. Read by the
        kernel; the launcher never synchronises on it. Values are clamped to
        ``[0, len(idx)]``.
      gather: read input rows through ``idx``.
      relu: apply ReLU after bias and residual.
      residual: optional tensor added before the ReLU, shape of the output. For an
        identity shortcut pass the output tensor itself (``residual=out``).
      residual_gather: read the residual through ``idx`` (default: ``scatter``);
        False for a compact residual (e.g. a compact projection-shortcut output).
      out: output tensor. With ``scatter=True`` it is the full-batch activation,
        written in place at rows ``idx[:count]`` only (all other rows untouched).
        With ``scatter=False`` row ``i < count`` receives local sample ``i``; rows
        ``>= count`` are left untouched. If None (compact mode only) a
        ``channels_last`` tensor with ``len(idx)`` (or ``N_x``) samples is
        allocated; its rows ``>= count`` are then uninitialised.
      allow_tf32: float32 only: TF32 tensor-core dot instead of IEEE fp32.
      config: override of :func:`get_config`'s tile dict.

    Returns ``out``. The grid is ``cdiv(n_grid*Hout*Wout, BLOCK_M) * cdiv(Cout,
    BLOCK_N)`` programs, independent of ``count``: the same launch serves any
    routing and can be captured in a CUDA graph.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use indexed_conv2d_reference")
    padding, cout, hout, wout, n_grid, residual_gather = _check_args(
        x, w_packed, bias, kernel_size, stride, padding, idx, count, gather,
        residual, residual_gather, out, scatter)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}")
    if w_packed.dtype != x.dtype:
        raise TypeError(f"w_packed dtype {w_packed.dtype} != x dtype {x.dtype} "
                        "(pack_weight(w, dtype=x.dtype))")
    if not w_packed.is_contiguous():
        raise ValueError("w_packed must be contiguous (use pack_weight)")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
    if not INTERPRET and x.device.type != "cuda":
        raise RuntimeError("indexed_conv2d needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if out is None:
        out = _alloc_out(x, n_grid, cout, hout, wout)
    _, cin, h, w = x.shape
    cfg = dict(config) if config is not None else get_config(cin, cout, kernel_size, stride, x.dtype)

    if x.dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "ieee"
    else:
        precision = "ieee"  # ignored for 16-bit operands, exact for fp64
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    dot_upcast = INTERPRET and x.dtype == torch.bfloat16

    num_pid_m = triton.cdiv(n_grid * hout * wout, cfg["BLOCK_M"])
    num_pid_n = triton.cdiv(cout, cfg["BLOCK_N"])
    grid = (max(1, num_pid_m * num_pid_n),)
    if n_grid == 0:
        return out
    # Dummy pointers for disabled operands (never dereferenced: constexpr-guarded).
    idx_arg = idx if idx is not None else count
    bias_arg = bias if bias is not None else w_packed
    res = residual if residual is not None else out
    _indexed_conv2d_kernel[grid](
        x, w_packed, bias_arg, res, out, idx_arg, count,
        n_grid, h, w, cin, hout, wout, cout,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        res.stride(0), res.stride(2), res.stride(3), res.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        KH=kernel_size, KW=kernel_size, STRIDE=stride, PAD=padding,
        GATHER=bool(gather), SCATTER=bool(scatter),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RES_GATHER=bool(residual is not None and residual_gather), RELU=bool(relu),
        INPUT_PRECISION=precision, DOT_UPCAST=dot_upcast, BF16_RTNE=dot_upcast, ACC_DTYPE=acc_dtype,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out


# ----------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------
def indexed_conv2d_reference(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: int,
    stride: int,
    idx: Optional[torch.Tensor],
    count: torch.Tensor,
    gather: bool,
    relu: bool,
    residual: Optional[torch.Tensor] = None,
    residual_gather: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
    scatter: bool = False,
    padding: Optional[int] = None,
    allow_tf32: bool = False,
    config: Optional[dict] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Pure-PyTorch version of :func:`indexed_conv2d` (same API and semantics).

    Built from ``torch.nn.functional.conv2d``; synchronises on ``count`` (it is a
    reference). The conv, bias, residual add and ReLU are evaluated in
    ``compute_dtype`` (default: ``x.dtype``; tests pass float64 for an exact
    baseline) and rounded once to the output dtype. ``allow_tf32`` and ``config``
    are accepted for API parity and ignored. A freshly allocated compact output is
    zero-filled beyond ``count`` (the Triton launcher leaves it uninitialised).
    """
    padding, cout, hout, wout, n_grid, residual_gather = _check_args(
        x, w_packed, bias, kernel_size, stride, padding, idx, count, gather,
        residual, residual_gather, out, scatter)
    cdt = compute_dtype or x.dtype
    n = max(0, min(int(count.item()), n_grid))
    if out is None:
        out = torch.zeros((n_grid, cout, hout, wout), dtype=x.dtype, device=x.device).contiguous(
            memory_format=torch.channels_last)
    if n == 0:
        return out
    rows = idx[:n].long() if idx is not None else None
    local = torch.arange(n, device=x.device)
    xin = x.index_select(0, rows if gather else local).to(cdt)
    w = unpack_weight(w_packed, kernel_size).to(cdt)
    y = F.conv2d(xin, w, None if bias is None else bias.to(cdt), stride=stride, padding=padding)
    if residual is not None:
        y = y + residual.index_select(0, rows if residual_gather else local).to(cdt)
    if relu:
        y = torch.relu(y)
    out.index_copy_(0, rows if scatter else local, y.to(out.dtype))
    return out
