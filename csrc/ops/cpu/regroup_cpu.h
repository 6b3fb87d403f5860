// CPU kernels of the regrouping ops for float32 rows, without the ops' argument checks,
// for BlockLoop and OneDnnChain (whose indices are in range and distinct by
// construction, and whose activations are NHWC-dense): gather_rows' and relu_pool_'s
// kernels (the ops check their arguments, then run these same kernels, so both paths
// compute bit-identical results) and torch's ReLU in place.
//
// A "row" is one sample: row_len contiguous elements, rows row_stride elements apart.
// idx == nullptr means rows 0, 1, ..., count - 1.
#pragma once

#include <cstdint>

namespace dynexec {
namespace cpu {

// Raises (naming op) unless idx[:count], all in [0, n_rows), are distinct rows.
void check_rows_distinct(const char* op, const int64_t* idx, int64_t count, int64_t n_rows);

// y[r] = x[idx[r]] for r < count (y dense: rows row_len apart).
void gather_rows_f32(const float* x, int64_t x_row_stride, const int64_t* idx, int64_t count, int64_t row_len,
                     float* y);

// x[r] = relu(x[r]) and pooled[r, c] = its mean over HW, for the n NHWC-dense rows of x.
void relu_pool_nhwc_f32(float* x, int64_t n, int64_t C, int64_t HW, float* pooled);

// x = relu(x) in place with torch's semantics (NaN and -0.0 kept).
void relu_f32(float* x, int64_t numel);

}  // namespace cpu
}  // namespace dynexec
