// The CPU kernels behind the regrouping ops (gather_rows, scatter_residual_relu_,
// scatter_residual_relu_pool_, relu_pool_) for float32 rows, without the ops' argument
// checks: for callers that built the row indices themselves (OneDnnChain and BlockLoop,
// whose partitions are in range and distinct by construction) and whose activations are
// NHWC-dense. The ops check their arguments and then run these same kernels, so both
// paths compute bit-identical results (the scatter_relu_* copy variants and relu_f32
// have no op: they serve BlockLoop's sum-epilogue scatter and OneDnnChain's ReLU).
//
// A "row" is one sample: row_len contiguous elements, rows row_stride elements apart.
// idx == nullptr means rows 0, 1, ..., count - 1.
#pragma once

#include <cstdint>

namespace dynexec {
namespace cpu {

// y[r] = x[idx[r]] for r < count (y dense: rows row_len apart).
void gather_rows_f32(const float* x, int64_t x_row_stride, const int64_t* idx, int64_t count, int64_t row_len,
                     float* y);

// out[idx[r]] = relu(out[idx[r]] + y[r]) for r < count (y dense).
void scatter_residual_relu_f32(float* out, int64_t out_row_stride, const float* y, const int64_t* idx,
                               int64_t count, int64_t row_len);

// scatter_residual_relu_f32 on NHWC rows ([HW, C]), and pooled[idx[r], c] = the mean of
// the new out[idx[r]] over HW (pooled: contiguous [rows, C]).
void scatter_residual_relu_pool_nhwc_f32(float* out, int64_t out_row_stride, const float* y, const int64_t* idx,
                                         int64_t count, int64_t C, int64_t HW, float* pooled);

// out[idx[r]] = relu(y[r]) for r < count: y's rows already hold branch + residual (a
// convolution's sum epilogue), so the scatter reads two streams instead of three.
void scatter_relu_f32(float* out, int64_t out_row_stride, const float* y, const int64_t* idx, int64_t count,
                      int64_t row_len);

// scatter_relu_f32 on NHWC rows, and pooled[idx[r], c] = the mean of the new out[idx[r]].
void scatter_relu_pool_nhwc_f32(float* out, int64_t out_row_stride, const float* y, const int64_t* idx,
                                int64_t count, int64_t C, int64_t HW, float* pooled);

// x[r] = relu(x[r]) and pooled[r, c] = its mean over HW, for the n NHWC-dense rows of x.
void relu_pool_nhwc_f32(float* x, int64_t n, int64_t C, int64_t HW, float* pooled);

// x = relu(x) in place with torch's semantics (NaN and -0.0 kept).
void relu_f32(float* x, int64_t numel);

}  // namespace cpu
}  // namespace dynexec
