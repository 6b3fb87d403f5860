"""Pure-PyTorch reference implementations of the regrouping and gate ops.

These define the semantics every backend (native C++/CUDA, Triton) must reproduce.
Tests and benchmarks import them, so the reference lives in exactly one place.

Contract shared by all backends:
  partition(mask[N] bool) -> (idx[N] int64, count[] int64)
      idx is a permutation of 0..N-1: the rows with mask True in ascending order,
      followed by the rows with mask False in ascending order (stable). count is a
      0-dim int64 tensor on mask's device holding the number of True rows.
  gather_rows(x[N, ...], idx[M>=count] int64, count: int) -> y[count, ...]
      y[i] = x[idx[i]]; y keeps x's dtype, device and memory format (channels_last
      stays channels_last for 4-D input); y is always a fresh tensor.
  scatter_residual_relu_(out[N, ...], y[count, ...], idx[M>=count] int64, count: int) -> None
      out[idx[i]] = relu(y[i] + out[idx[i]]) for i < count, in place. Indices among
      idx[:count] must be distinct and in [0, N).
  scatter_residual_relu_pool_(out[N, C, H, W], y[count, C, H, W], idx, count, pooled[N, C]) -> None
      scatter_residual_relu_(out, y, idx, count), and pooled[idx[i], c] = the mean over
      (h, w) of the new out[idx[i], c] for i < count, in place. out is 4-D (any strides);
      pooled is a contiguous [N, C] tensor of out's dtype and device; its other rows are
      left untouched. Means are accumulated in float32 for float16/bfloat16/float32 and
      in float64 for float64, so they match out.mean((2, 3)) up to float rounding.
  relu_pool_(x[N, C, H, W], pooled[N, C]) -> None
      x = relu(x) in place (NaN stays NaN, -0.0 stays -0.0, as torch.relu_), and
      pooled[n, c] = the mean over (h, w) of the new x[n, c] for every n, in one pass.
      x is 4-D with a floating dtype (any strides); pooled is a contiguous [N, C] tensor
      of x's dtype and device. Means are accumulated as in scatter_residual_relu_pool_,
      so they match x.mean((2, 3)) up to float rounding.
  recurrent_gate_step(pooled[N, C], embed_w[C, E], embed_b[E], w_ih[4H, E], w_hh[4H, H],
                      b_ih[4H], b_hh[4H], proj_w[H, 1], proj_b[1], hx[N, H], cx[N, H])
      -> (prob[N], hx_new[N, H], cx_new[N, H])
      One step of SkipNet's recurrent gate: e = pooled @ embed_w + embed_b;
      (hx_new, cx_new) = torch.lstm_cell(e, (hx, cx), w_ih, w_hh, b_ih, b_hh) (gate order
      i, f, g, o); prob = sigmoid(hx_new @ proj_w + proj_b).reshape(N). All tensors share
      pooled's floating dtype and device; outputs are fresh contiguous tensors. Backends
      agree with this composite up to float rounding (they accumulate in float32 for
      float16/bfloat16/float32, in float64 for float64).
  downsample_b(x[N, C, H, W], out_channels: int) -> z[N, out_channels, H//2, W//2]
      BlockDrop's parameter-free CIFAR shortcut: 2x2 average pool (stride 2, floor),
      then the pooled channels followed by (out_channels // C - 1) copies of
      pooled * 0 (exact +0 for finite input; NaN/Inf propagate as in the official
      code); out_channels must be a positive multiple of C. z keeps x's memory format.

Arguments outside the contract (wrong dtype/rank/device of idx, count out of range,
idx[:count] out of [0, N) or, for the scatter, not distinct, mismatched shapes) raise
OpArgumentError, a ValueError that is also a RuntimeError, naming the problem.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F


# ---- argument checks (no effect on the semantics of valid calls) ----------------------
class OpArgumentError(ValueError, RuntimeError):
    """A bad argument to a reference op. A ValueError, and also a RuntimeError like the
    native ops' TORCH_CHECK errors and torch's own (e.g. avg_pool2d's), so code written
    against any backend catches it."""


def _tensor(name: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise OpArgumentError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def _check_like(name: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    """``t`` (called ``arg``) has the dtype and device of ``ref`` (called ``ref_arg``)."""
    if t.dtype != ref.dtype:
        raise OpArgumentError(f"{name}: {arg} must have {ref_arg}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise OpArgumentError(f"{name}: {arg} must be on {ref_arg}'s device {ref.device}, got "
                              f"{t.device}")


def _check_rows(name: str, x: torch.Tensor, idx: torch.Tensor, count, upper: int,
                distinct: bool) -> int:
    """Checks idx (int64, 1-D, x's device), count (int in [0, min(idx.numel(), upper)])
    and the values of idx[:count] (in [0, N); distinct if asked). Returns count."""
    _tensor(name, "idx", idx)
    if x.dim() < 1:
        raise OpArgumentError(f"{name}: expected a tensor with at least 1 dimension (rows), "
                         f"got a 0-dim tensor")
    if idx.dtype != torch.int64:
        raise OpArgumentError(f"{name}: idx must have dtype torch.int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise OpArgumentError(f"{name}: idx must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device != x.device:
        raise OpArgumentError(f"{name}: idx must be on the same device as the data ({x.device}), "
                         f"got idx on {idx.device}")
    if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)):
        try:
            count = operator.index(count)
        except TypeError:
            raise OpArgumentError(f"{name}: count must be an int, got {type(count).__name__}") from None
    if count < 0 or count > idx.numel() or count > upper:
        raise OpArgumentError(f"{name}: count must be in [0, {min(idx.numel(), upper)}] "
                         f"(idx.numel()={idx.numel()}, at most {upper} rows), got count={count}")
    rows = idx[:count]
    if count == 0 or rows.device.type == "meta":
        return count
    n = x.shape[0]
    bad = (rows < 0) | (rows >= n)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise OpArgumentError(f"{name}: idx[{i}]={int(rows[i])} is out of range; idx[:count] must "
                         f"be in [0, {n}) for {n} rows")
    if distinct and torch.unique(rows).numel() != count:
        values, counts = torch.unique(rows, return_counts=True)
        dup = int(values[counts > 1][0])
        raise OpArgumentError(f"{name}: idx[:count] must be distinct, but row {dup} appears "
                         f"{int(counts[counts > 1][0])} times (duplicate index)")
    return count


def partition(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _tensor("partition", "mask", mask)
    mask = mask.reshape(-1).bool()
    active = torch.nonzero(mask, as_tuple=True)[0]
    inactive = torch.nonzero(~mask, as_tuple=True)[0]
    idx = torch.cat([active, inactive])
    count = torch.tensor(active.numel(), dtype=torch.int64, device=mask.device)
    return idx, count


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: int) -> torch.Tensor:
    _tensor("gather_rows", "x", x)
    count = _check_rows("gather_rows", x, idx, count, upper=idx.numel(), distinct=False)
    y = x.index_select(0, idx[:count])
    return y.contiguous(memory_format=_memory_format(x))


def _check_scatter(name: str, out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count) -> int:
    _tensor(name, "out", out)
    _tensor(name, "y", y)
    if not out.is_floating_point():
        raise OpArgumentError(f"{name}: out must have a floating point dtype, got {out.dtype}")
    _check_like(name, "y", y, "out", out)
    if out.dim() < 1 or y.dim() != out.dim() or tuple(y.shape[1:]) != tuple(out.shape[1:]):
        raise OpArgumentError(f"{name}: y must have shape [count, *out.shape[1:]] = "
                         f"[count, {', '.join(map(str, out.shape[1:]))}], got {tuple(y.shape)}")
    return _check_rows(name, out, idx, count, upper=min(out.shape[0], y.shape[0]), distinct=True)


def scatter_residual_relu_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int) -> None:
    count = _check_scatter("scatter_residual_relu_", out, y, idx, count)
    rows = idx[:count]
    out.index_copy_(0, rows, torch.relu(y[:count] + out.index_select(0, rows)))


def _check_pool_target(name: str, arg: str, t: torch.Tensor, pooled: torch.Tensor) -> None:
    """The pooled ops' data tensor `t` (called `arg`) is 4-D; pooled is a contiguous [N, C]
    tensor of t's dtype and device."""
    if t.dim() != 4:
        raise OpArgumentError(f"{name}: {arg} must be 4-D [N, C, H, W], got shape {tuple(t.shape)}")
    expected = (t.shape[0], t.shape[1])
    _check_like(name, "pooled", pooled, arg, t)
    if tuple(pooled.shape) != expected:
        raise OpArgumentError(f"{name}: pooled must have shape [N, C] = {list(expected)}, got "
                              f"{list(pooled.shape)}")
    if not pooled.is_contiguous():
        raise OpArgumentError(f"{name}: pooled must be contiguous, got strides {pooled.stride()}")


def scatter_residual_relu_pool_(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, count: int,
                                pooled: torch.Tensor) -> None:
    name = "scatter_residual_relu_pool_"
    _tensor(name, "pooled", pooled)
    count = _check_scatter(name, out, y, idx, count)
    _check_pool_target(name, "out", out, pooled)
    rows = idx[:count]
    new = torch.relu(y[:count] + out.index_select(0, rows))
    out.index_copy_(0, rows, new)
    pooled.index_copy_(0, rows, new.mean(dim=(2, 3)))


def relu_pool_(x: torch.Tensor, pooled: torch.Tensor) -> None:
    name = "relu_pool_"
    _tensor(name, "x", x)
    _tensor(name, "pooled", pooled)
    _check_pool_target(name, "x", x, pooled)
    if not x.is_floating_point():
        raise OpArgumentError(f"{name}: x must have a floating point dtype, got {x.dtype}")
    torch.relu_(x)
    pooled.copy_(x.mean(dim=(2, 3)))


def recurrent_gate_step(pooled: torch.Tensor, embed_w: torch.Tensor, embed_b: torch.Tensor,
                        w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                        b_hh: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
                        hx: torch.Tensor, cx: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "recurrent_gate_step"
    args = dict(pooled=pooled, embed_w=embed_w, embed_b=embed_b, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                b_hh=b_hh, proj_w=proj_w, proj_b=proj_b, hx=hx, cx=cx)
    for arg, t in args.items():
        _tensor(name, arg, t)
    if pooled.dim() != 2:
        raise OpArgumentError(f"{name}: pooled must be 2-D [N, C], got shape {list(pooled.shape)}")
    if not pooled.is_floating_point():
        raise OpArgumentError(f"{name}: pooled must have a floating point dtype, got {pooled.dtype}")
    n, c = pooled.shape
    if embed_w.dim() != 2 or embed_w.shape[0] != c:
        raise OpArgumentError(f"{name}: embed_w must have shape [C, E] with C={c} "
                              f"(pooled.shape[1]), got {list(embed_w.shape)}")
    if hx.dim() != 2 or hx.shape[0] != n:
        raise OpArgumentError(f"{name}: hx must have shape [N, H] with N={n} (pooled.shape[0]), "
                              f"got {list(hx.shape)}")
    e, h = embed_w.shape[1], hx.shape[1]
    shapes = dict(embed_w=("[C, E]", [c, e]), embed_b=("[E]", [e]), w_ih=("[4H, E]", [4 * h, e]),
                  w_hh=("[4H, H]", [4 * h, h]), b_ih=("[4H]", [4 * h]), b_hh=("[4H]", [4 * h]),
                  proj_w=("[H, 1]", [h, 1]), proj_b=("[1]", [1]), hx=("[N, H]", [n, h]),
                  cx=("[N, H]", [n, h]))
    for arg, (dims, shape) in shapes.items():
        t = args[arg]
        _check_like(name, arg, t, "pooled", pooled)
        if list(t.shape) != shape:
            raise OpArgumentError(f"{name}: {arg} must have shape {dims} = {shape}, got "
                                  f"{list(t.shape)}")
    embedding = torch.addmm(embed_b, pooled, embed_w)
    hx_new, cx_new = torch.lstm_cell(embedding, (hx, cx), w_ih, w_hh, b_ih, b_hh)
    prob = torch.sigmoid(torch.addmm(proj_b, hx_new, proj_w)).reshape(n)
    return prob, hx_new, cx_new


def downsample_b(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    name = "downsample_b"
    _tensor(name, "x", x)
    if x.dim() != 4:
        raise OpArgumentError(f"{name}: expected a 4-D x [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise OpArgumentError(f"{name}: x must have a floating point dtype, got {x.dtype}")
    c = x.shape[1]
    if isinstance(out_channels, bool) or not isinstance(out_channels, (int, torch.SymInt)) \
            or c <= 0 or out_channels <= 0 or out_channels % c != 0:
        raise OpArgumentError(f"{name}: out_channels must be a positive multiple of C={c}, "
                         f"got out_channels={out_channels!r}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise OpArgumentError(f"{name}: H >= 2 and W >= 2 are needed for the 2x2 pool, got shape "
                         f"{tuple(x.shape)}")
    pooled = F.avg_pool2d(x, 2)
    ratio = out_channels // x.shape[1]
    z = torch.cat([pooled] + [pooled.mul(0)] * (ratio - 1), dim=1)
    return z.contiguous(memory_format=_memory_format(x))


def pooled_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  sigmoid: bool) -> torch.Tensor:
    """A classifier head: the mean of h [N, C, H, W] over H, W, then weight [K, C] and
    bias [K] (then a sigmoid when ``sigmoid``) -> [N, K]."""
    name = "pooled_linear"
    for arg, t in (("h", h), ("weight", weight), ("bias", bias)):
        _tensor(name, arg, t)
    if h.dim() != 4:
        raise OpArgumentError(f"{name}: h must be 4-D [N, C, H, W], got shape {list(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise OpArgumentError(f"{name}: weight must have shape [K, {h.shape[1]}], got "
                              f"{list(weight.shape)}")
    if list(bias.shape) != [weight.shape[0]]:
        raise OpArgumentError(f"{name}: bias must have shape [{weight.shape[0]}], got "
                              f"{list(bias.shape)}")
    out = F.linear(h.mean(dim=(2, 3)), weight, bias)
    return torch.sigmoid(out) if sigmoid else out
