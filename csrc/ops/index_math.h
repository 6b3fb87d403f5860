// Index arithmetic shared by the CPU (csrc/ops/cpu) and CUDA (csrc/ops/cuda) kernels.
//
// Everything here is a header-only `inline` function marked DYNEXEC_HOST_DEVICE so
// that the CPU kernels exercise exactly the arithmetic the GPU kernels run: the CPU
// test suite is then also a test of the GPU index math.
//
// Conventions
//   * A "row" is one sample: all elements of x[n] for a batch-outermost tensor.
//     For NCHW-contiguous and for channels_last (NHWC) 4-D tensors a row is a dense
//     block of C*H*W elements (in NCHW resp. NHWC order), starting at n * batch_stride.
//   * All offsets are in units of the element (or vector) type the caller uses;
//     callers pass strides in those same units.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DYNEXEC_HOST_DEVICE __host__ __device__
#define DYNEXEC_FORCE_INLINE __forceinline__
#else
#define DYNEXEC_HOST_DEVICE
#define DYNEXEC_FORCE_INLINE inline __attribute__((always_inline))
#endif

namespace dynexec {
namespace index_math {

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

struct RowOffset {
  int64_t row;     // row of the compacted tensor (position i in idx[:count])
  int64_t offset;  // element (or vector) offset inside that row
};

// Flat element index of a compacted [count, row_len] tensor -> (row, offset).
DYNEXEC_HOST_DEVICE inline RowOffset flat_to_row_offset(int64_t flat, int64_t row_len) {
  const int64_t row = flat / row_len;
  return RowOffset{row, flat - row * row_len};
}

// Offset of element `offset` of row `row` in a tensor whose rows are dense and
// start every `batch_stride` elements (batch_stride == row_len for a dense tensor).
DYNEXEC_HOST_DEVICE inline int64_t row_element_offset(int64_t row, int64_t batch_stride,
                                                       int64_t offset) {
  return row * batch_stride + offset;
}

// Is `i` a valid row index of a tensor with `n` rows?
DYNEXEC_HOST_DEVICE inline bool index_in_range(int64_t i, int64_t n) {
  return i >= 0 && i < n;
}

// ---------------------------------------------------------------------------
// partition: stable compaction (active rows first, then inactive, both ascending)
// ---------------------------------------------------------------------------

// Destination slot of row i given whether it is active, the number of active rows
// strictly before it (exclusive prefix sum of the mask) and the total active count.
DYNEXEC_HOST_DEVICE inline int64_t partition_slot(bool active, int64_t i,
                                                  int64_t active_before, int64_t total_active) {
  return active ? active_before : total_active + (i - active_before);
}

// ---------------------------------------------------------------------------
// Elementwise: scatter's fused residual add + ReLU
// ---------------------------------------------------------------------------

// relu(out + y) with torch's semantics: the sum is rounded to T first (as
// `y + out` produces a T tensor), then ReLU keeps NaN and -0.0 (torch.relu is
// clamp_min(x, 0) == (x < 0 ? 0 : x)).
template <typename T>
DYNEXEC_HOST_DEVICE inline T relu(T v) {
  return v < static_cast<T>(0) ? static_cast<T>(0) : v;
}
template <typename T>
DYNEXEC_HOST_DEVICE inline T relu_add(T out_v, T y_v) {
  return relu(static_cast<T>(y_v + out_v));
}

// ---------------------------------------------------------------------------
// 4-D layouts
// ---------------------------------------------------------------------------

struct Coord4 {
  int64_t n, c, h, w;
};

// Offsets of logical element (n, c, h, w) of a dense [N, C, H, W] tensor.
DYNEXEC_HOST_DEVICE inline int64_t nchw_offset(int64_t n, int64_t c, int64_t h, int64_t w,
                                               int64_t C, int64_t H, int64_t W) {
  return ((n * C + c) * H + h) * W + w;
}
DYNEXEC_HOST_DEVICE inline int64_t nhwc_offset(int64_t n, int64_t c, int64_t h, int64_t w,
                                               int64_t C, int64_t H, int64_t W) {
  return ((n * H + h) * W + w) * C + c;
}

// Memory-order flat index of a dense tensor -> logical coordinates.
DYNEXEC_HOST_DEVICE inline Coord4 nchw_coords(int64_t flat, int64_t C, int64_t H, int64_t W) {
  Coord4 r;
  r.w = flat % W;
  flat /= W;
  r.h = flat % H;
  flat /= H;
  r.c = flat % C;
  r.n = flat / C;
  return r;
}
DYNEXEC_HOST_DEVICE inline Coord4 nhwc_coords(int64_t flat, int64_t C, int64_t H, int64_t W) {
  Coord4 r;
  r.c = flat % C;
  flat /= C;
  r.w = flat % W;
  flat /= W;
  r.h = flat % H;
  r.n = flat / H;
  return r;
}

// ---------------------------------------------------------------------------
// downsample_b: z[N, Co, H/2, W/2] from x[N, C, H, W], Co = k * C
//   z[:, co] = avg_pool2x2(x)[:, co % C] * (co < C ? 1 : 0)
// ---------------------------------------------------------------------------

// Where the 2x2 window of one output element lives in x.
struct PoolWindow {
  int64_t base;     // offset of the top-left input element
  int64_t dw;       // step to the element on the right
  int64_t dh;       // step to the element below
  bool zero;        // output channel is one of the "pooled * 0" copies
};

// Window of output element (n, co, ho, wo) for an NCHW-contiguous x.
DYNEXEC_HOST_DEVICE inline PoolWindow downsample_b_window_nchw(int64_t n, int64_t co, int64_t ho,
                                                              int64_t wo, int64_t C, int64_t H,
                                                              int64_t W) {
  PoolWindow p;
  p.base = nchw_offset(n, co % C, 2 * ho, 2 * wo, C, H, W);
  p.dw = 1;
  p.dh = W;
  p.zero = co >= C;
  return p;
}

// Window of output element (n, co, ho, wo) for a channels_last (NHWC) x.
DYNEXEC_HOST_DEVICE inline PoolWindow downsample_b_window_nhwc(int64_t n, int64_t co, int64_t ho,
                                                              int64_t wo, int64_t C, int64_t H,
                                                              int64_t W) {
  PoolWindow p;
  p.base = nhwc_offset(n, co % C, 2 * ho, 2 * wo, C, H, W);
  p.dw = C;
  p.dh = W * C;
  p.zero = co >= C;
  return p;
}

// Output memory offset (flat index of a dense z in its own memory format) -> window.
DYNEXEC_HOST_DEVICE inline PoolWindow downsample_b_window_from_out_nchw(int64_t out_flat,
                                                                       int64_t Co, int64_t C,
                                                                       int64_t H, int64_t W) {
  const Coord4 o = nchw_coords(out_flat, Co, H / 2, W / 2);
  return downsample_b_window_nchw(o.n, o.c, o.h, o.w, C, H, W);
}
DYNEXEC_HOST_DEVICE inline PoolWindow downsample_b_window_from_out_nhwc(int64_t out_flat,
                                                                       int64_t Co, int64_t C,
                                                                       int64_t H, int64_t W) {
  const Coord4 o = nhwc_coords(out_flat, Co, H / 2, W / 2);
  return downsample_b_window_nhwc(o.n, o.c, o.h, o.w, C, H, W);
}

// 2x2 average exactly as ATen's CPU avg_pool2d computes it: accumulate in acc_t
// starting from 0, in row-major window order (top-left, top-right, bottom-left,
// bottom-right), then scale by 1/4 (exact, so identical to ATen's division by 4).
template <typename acc_t>
DYNEXEC_HOST_DEVICE inline acc_t avg_pool_2x2(acc_t tl, acc_t tr, acc_t bl, acc_t br) {
  acc_t s = acc_t(0);
  s += tl;
  s += tr;
  s += bl;
  s += br;
  return s * acc_t(0.25);
}

// The "pooled * 0" value of a zero channel, computed like torch's `pooled.mul(0)`
// (keeps the sign for finite values, NaN for NaN/Inf).
template <typename T, typename acc_t>
DYNEXEC_HOST_DEVICE inline T times_zero(T pooled) {
  return static_cast<T>(static_cast<acc_t>(pooled) * acc_t(0));
}

// Full downsample_b value of one output element from the four window values.
template <typename T, typename acc_t>
DYNEXEC_HOST_DEVICE inline T downsample_b_value(T tl, T tr, T bl, T br, bool zero) {
  const T pooled = static_cast<T>(avg_pool_2x2<acc_t>(
      static_cast<acc_t>(tl), static_cast<acc_t>(tr), static_cast<acc_t>(bl),
      static_cast<acc_t>(br)));
  return zero ? times_zero<T, acc_t>(pooled) : pooled;
}

// ---------------------------------------------------------------------------
// scatter_residual_relu_pool_ / relu_pool_: the scatter (or an in-place ReLU) plus the
// per-channel mean of each updated row (pooled[row, c] = mean over (h, w) of the new
// out[row, c])
// ---------------------------------------------------------------------------

// Offset of element p (= h * W + w) of channel c inside one dense row of a 4-D
// tensor: an NCHW row is [C, HW], a channels_last row is [HW, C].
DYNEXEC_HOST_DEVICE inline int64_t row_plane_offset(int64_t c, int64_t p, int64_t C, int64_t HW,
                                                    bool channels_last) {
  return channels_last ? p * C + c : c * HW + p;
}

// The new value of one element of a pooled op: relu(o + y[j]) for
// scatter_residual_relu_pool_ (kResidual), relu(o) for relu_pool_ (y is not read).
template <bool kResidual, typename T>
DYNEXEC_HOST_DEVICE DYNEXEC_FORCE_INLINE T pool_update(T o, const T* y, int64_t j) {
  if constexpr (kResidual) {
    return relu_add<T>(o, y[j]);
  } else {
    return relu<T>(o);
  }
}

// Offset of pooled[row, c] in a contiguous [N, C] tensor.
DYNEXEC_HOST_DEVICE inline int64_t pooled_offset(int64_t row, int64_t c, int64_t C) {
  return row * C + c;
}

// The mean of a plane from its acc_t sum, like torch's CPU mean (sum, then one
// division by the element count; HW == 0 gives NaN as torch does).
template <typename T, typename acc_t>
DYNEXEC_HOST_DEVICE inline T plane_mean(acc_t sum, int64_t hw) {
  return static_cast<T>(sum / static_cast<acc_t>(hw));
}

// ---------------------------------------------------------------------------
// recurrent_gate_step: SkipNet's LSTM gate cell in the accumulate type
// ---------------------------------------------------------------------------

// torch.lstm_cell's order of the four gates in a [4H] pre-activation vector.
enum LstmGate : int { kGateI = 0, kGateF = 1, kGateG = 2, kGateO = 3 };

// Index of gate `gate` of hidden unit h in a [4H] gate vector.
DYNEXEC_HOST_DEVICE inline int64_t gate_index(LstmGate gate, int64_t h, int64_t H) {
  return static_cast<int64_t>(gate) * H + h;
}

// The LSTM cell update from the activated gates i = sigmoid(.), f = sigmoid(.),
// g = tanh(.), o = sigmoid(.):  c' = f * c + i * g  and  h' = o * tanh(c').
// (Always inlined: the CPU kernel calls them on vector types inside per-target clones,
// where an out-of-line copy would have the wrong vector ABI for one of them.)
template <typename acc_t>
DYNEXEC_HOST_DEVICE DYNEXEC_FORCE_INLINE acc_t lstm_cell_state(acc_t i, acc_t f, acc_t g, acc_t c) {
  return f * c + i * g;
}
template <typename acc_t>
DYNEXEC_HOST_DEVICE DYNEXEC_FORCE_INLINE acc_t lstm_hidden_state(acc_t o, acc_t tanh_c) {
  return o * tanh_c;
}

}  // namespace index_math
}  // namespace dynexec
