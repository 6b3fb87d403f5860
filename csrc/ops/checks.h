// Argument checks and layout helpers shared by the CPU and CUDA op implementations.
// Host-only (compiled by the C++ compiler and by nvcc's host pass).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace dynexec {

// Memory format of the reference output (dynexec/ops/reference.py::_memory_format):
// channels_last only for a 4-D tensor that is channels_last-contiguous and not
// also plain contiguous.
inline at::MemoryFormat reference_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// True if every row t[n] is one dense block laid out as a `fmt`-contiguous tensor
// would lay it out (the batch stride itself may be anything). Size-1 dims are ignored.
inline bool rows_dense(const at::Tensor& t, at::MemoryFormat fmt) {
  const int64_t d = t.dim();
  if (d <= 1) return true;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    if (d != 4) return false;
    const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
    if (C != 1 && t.stride(1) != 1) return false;
    if (W != 1 && t.stride(3) != C) return false;
    if (H != 1 && t.stride(2) != W * C) return false;
    return true;
  }
  int64_t expected = 1;
  for (int64_t i = d - 1; i >= 1; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// Finds a layout (contiguous, else channels_last for 4-D) in which every row of ``t`` is
// dense; returns false if there is none. The in-place scatter needs one to write directly.
inline bool find_dense_row_format(const at::Tensor& t, at::MemoryFormat& fmt) {
  fmt = at::MemoryFormat::Contiguous;
  if (rows_dense(t, fmt)) return true;
  if (t.dim() != 4) return false;
  fmt = at::MemoryFormat::ChannelsLast;
  return rows_dense(t, fmt);
}

inline int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 1; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

inline void check_mask(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "dynexec::partition: expected mask of dtype torch.bool (or torch.uint8), but got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1, "dynexec::partition: expected a 1-D mask, but got a ",
              mask.dim(), "-D tensor of shape ", mask.sizes());
}

// Checks of idx/count against a tensor with `n_rows` rows on `device`.
inline void check_idx_count(const char* op, const at::Tensor& idx, int64_t count, int64_t n_rows,
                            const at::Device& device) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "dynexec::", op,
              ": expected idx of dtype torch.int64, but got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == device, "dynexec::", op, ": expected idx on device ", device,
              " (the data tensor's device), but got idx on ", idx.device());
  TORCH_CHECK(idx.dim() == 1, "dynexec::", op, ": expected a 1-D idx, but got a ", idx.dim(),
              "-D tensor of shape ", idx.sizes());
  TORCH_CHECK(count >= 0 && count <= n_rows, "dynexec::", op, ": expected count in [0, ",
              n_rows, "] (the number of rows), but got count=", count);
  TORCH_CHECK(idx.numel() >= count, "dynexec::", op, ": expected idx.numel() >= count, but got ",
              "idx.numel()=", idx.numel(), " < count=", count);
}

inline void check_gather_args(const at::Tensor& x, const at::Tensor& idx, int64_t count) {
  TORCH_CHECK(x.dim() >= 1, "dynexec::gather_rows: expected x with at least 1 dimension, but got a ",
              "0-D tensor");
  check_idx_count("gather_rows", idx, count, x.size(0), x.device());
}

// Checks of the scatter's arguments; `op` names the op in the messages (the pooling
// scatter shares them).
inline void check_scatter_args(const at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                               int64_t count, const char* op = "scatter_residual_relu_") {
  TORCH_CHECK(out.dim() >= 1, "dynexec::", op,
              ": expected out with at least 1 dimension, but got a 0-D tensor");
  TORCH_CHECK(y.device() == out.device(), "dynexec::", op, ": expected y on ", out.device(),
              " (out's device), but got y on ", y.device());
  TORCH_CHECK(y.scalar_type() == out.scalar_type(), "dynexec::", op, ": expected y of dtype ",
              out.scalar_type(), " (out's dtype), but got ", y.scalar_type());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "dynexec::", op,
              ": expected a floating point out/y, but got ", out.scalar_type());
  bool same_row_shape = y.dim() == out.dim();
  for (int64_t i = 1; same_row_shape && i < out.dim(); ++i) {
    same_row_shape = y.size(i) == out.size(i);
  }
  TORCH_CHECK(same_row_shape, "dynexec::", op,
              ": expected y of shape [count, *out.shape[1:]] = [", count, ", ",
              out.sizes().slice(1), "], but got y of shape ", y.sizes(), " for out of shape ",
              out.sizes());
  check_idx_count(op, idx, count, out.size(0), out.device());
  TORCH_CHECK(y.size(0) >= count, "dynexec::", op, ": expected y with at least count=", count,
              " rows, but got y of shape ", y.sizes());
}

// The pooled ops' checks of their 4-D data tensor `t` (named `name`: "out" or "x") and of
// pooled, a contiguous [N, C] tensor of t's dtype and device.
inline void check_pool_target(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& pooled) {
  TORCH_CHECK(t.dim() == 4, "dynexec::", op, ": expected a 4-D ", name,
              " [N, C, H, W], but got a ", t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK(pooled.device() == t.device(), "dynexec::", op, ": expected pooled on ",
              t.device(), " (", name, "'s device), but got pooled on ", pooled.device());
  TORCH_CHECK(pooled.scalar_type() == t.scalar_type(), "dynexec::", op,
              ": expected pooled of dtype ", t.scalar_type(), " (", name, "'s dtype), but got ",
              pooled.scalar_type());
  TORCH_CHECK(pooled.dim() == 2 && pooled.size(0) == t.size(0) && pooled.size(1) == t.size(1),
              "dynexec::", op, ": expected pooled of shape [N, C] = [", t.size(0), ", ",
              t.size(1), "], but got pooled of shape ", pooled.sizes());
  TORCH_CHECK(pooled.is_contiguous(), "dynexec::", op,
              ": expected a contiguous pooled, but got pooled with strides ", pooled.strides());
}

// The scatter's checks plus check_pool_target(out, pooled).
inline void check_scatter_pool_args(const at::Tensor& out, const at::Tensor& y,
                                    const at::Tensor& idx, int64_t count,
                                    const at::Tensor& pooled) {
  const char* op = "scatter_residual_relu_pool_";
  check_scatter_args(out, y, idx, count, op);
  check_pool_target(op, "out", out, pooled);
}

// relu_pool_: a floating point 4-D x and its pooled.
inline void check_relu_pool_args(const at::Tensor& x, const at::Tensor& pooled) {
  const char* op = "relu_pool_";
  check_pool_target(op, "x", x, pooled);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dynexec::", op,
              ": expected a floating point x, but got ", x.scalar_type());
}

// One argument of recurrent_gate_step: pooled's dtype and device, and `shape` (spelled
// `dims` in the message, e.g. "[4H, E]").
inline void check_gate_tensor(const char* name, const at::Tensor& t, const at::Tensor& pooled,
                              const char* dims, at::IntArrayRef shape) {
  const char* op = "dynexec::recurrent_gate_step: ";
  TORCH_CHECK(t.scalar_type() == pooled.scalar_type(), op, "expected ", name, " of dtype ",
              pooled.scalar_type(), " (pooled's dtype), but got ", t.scalar_type());
  TORCH_CHECK(t.device() == pooled.device(), op, "expected ", name, " on ", pooled.device(),
              " (pooled's device), but got ", name, " on ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), op, "expected ", name, " of shape ", dims, " = ", shape,
              ", but got ", name, " of shape ", t.sizes());
}

// Checks of recurrent_gate_step's arguments. N and C come from pooled, E from embed_w,
// H from hx; returns {N, C, E, H}.
inline std::vector<int64_t> check_gate_args(const at::Tensor& pooled, const at::Tensor& embed_w,
                                            const at::Tensor& embed_b, const at::Tensor& w_ih,
                                            const at::Tensor& w_hh, const at::Tensor& b_ih,
                                            const at::Tensor& b_hh, const at::Tensor& proj_w,
                                            const at::Tensor& proj_b, const at::Tensor& hx,
                                            const at::Tensor& cx) {
  const char* op = "dynexec::recurrent_gate_step: ";
  TORCH_CHECK(pooled.dim() == 2, op, "expected a 2-D pooled [N, C], but got a ", pooled.dim(),
              "-D tensor of shape ", pooled.sizes());
  TORCH_CHECK(at::isFloatingType(pooled.scalar_type()), op,
              "expected a floating point pooled, but got ", pooled.scalar_type());
  const int64_t N = pooled.size(0), C = pooled.size(1);
  TORCH_CHECK(embed_w.dim() == 2 && embed_w.size(0) == C, op,
              "expected embed_w of shape [C, E] with C=", C, " (pooled.shape[1]), but got embed_w "
              "of shape ", embed_w.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(0) == N, op, "expected hx of shape [N, H] with N=", N,
              " (pooled.shape[0]), but got hx of shape ", hx.sizes());
  const int64_t E = embed_w.size(1), H = hx.size(1);
  check_gate_tensor("embed_w", embed_w, pooled, "[C, E]", {C, E});
  check_gate_tensor("embed_b", embed_b, pooled, "[E]", {E});
  check_gate_tensor("w_ih", w_ih, pooled, "[4H, E]", {4 * H, E});
  check_gate_tensor("w_hh", w_hh, pooled, "[4H, H]", {4 * H, H});
  check_gate_tensor("b_ih", b_ih, pooled, "[4H]", {4 * H});
  check_gate_tensor("b_hh", b_hh, pooled, "[4H]", {4 * H});
  check_gate_tensor("proj_w", proj_w, pooled, "[H, 1]", {H, 1});
  check_gate_tensor("proj_b", proj_b, pooled, "[1]", {1});
  check_gate_tensor("hx", hx, pooled, "[N, H]", {N, H});
  check_gate_tensor("cx", cx, pooled, "[N, H]", {N, H});
  return {N, C, E, H};
}

// recurrent_gate_step's arguments, checked and made contiguous (no copy for the usual
// contiguous tensors), and its freshly allocated outputs: shared by the CPU and CUDA ops.
struct GateStepCall {
  std::vector<int64_t> dims;  // {N, C, E, H}, from check_gate_args (first: checks come first)
  int64_t N, C, E, H;
  c10::MaybeOwned<at::Tensor> pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b,
      hx, cx;
  at::Tensor prob, hx_new, cx_new;

  GateStepCall(const at::Tensor& pooled_, const at::Tensor& embed_w_, const at::Tensor& embed_b_,
               const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& b_ih_,
               const at::Tensor& b_hh_, const at::Tensor& proj_w_, const at::Tensor& proj_b_,
               const at::Tensor& hx_, const at::Tensor& cx_)
      : dims(check_gate_args(pooled_, embed_w_, embed_b_, w_ih_, w_hh_, b_ih_, b_hh_, proj_w_,
                             proj_b_, hx_, cx_)),
        N(dims[0]), C(dims[1]), E(dims[2]), H(dims[3]),
        pooled(pooled_.expect_contiguous()), embed_w(embed_w_.expect_contiguous()),
        embed_b(embed_b_.expect_contiguous()), w_ih(w_ih_.expect_contiguous()),
        w_hh(w_hh_.expect_contiguous()), b_ih(b_ih_.expect_contiguous()),
        b_hh(b_hh_.expect_contiguous()), proj_w(proj_w_.expect_contiguous()),
        proj_b(proj_b_.expect_contiguous()), hx(hx_.expect_contiguous()),
        cx(cx_.expect_contiguous()),
        prob(at::empty({N}, pooled_.options())),
        hx_new(at::empty({N, H}, pooled_.options())),
        cx_new(at::empty({N, H}, pooled_.options())) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return std::make_tuple(prob, hx_new, cx_new);
  }
};

inline void check_downsample_args(const at::Tensor& x, int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4, "dynexec::downsample_b: expected a 4-D x [N, C, H, W], but got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "dynexec::downsample_b: expected a floating point x, but got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0, "dynexec::downsample_b: expected x with at least one channel, but got shape ",
              x.sizes());
  TORCH_CHECK(out_channels > 0 && out_channels % C == 0,
              "dynexec::downsample_b: expected out_channels to be a positive multiple of C=", C,
              ", but got out_channels=", out_channels);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2,
              "dynexec::downsample_b: expected H >= 2 and W >= 2 for the 2x2 average pool, but got "
              "x of shape ",
              x.sizes());
}

}  // namespace dynexec
