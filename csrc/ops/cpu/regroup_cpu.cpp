// CPU kernels of partition, gather_rows, scatter_residual_relu_,
// scatter_residual_relu_pool_ and relu_pool_.
//
// gather_rows / scatter_residual_relu_ work on rows: for NCHW-contiguous and
// channels_last tensors every sample x[n] is one dense block, so a gathered row is a
// memcpy and the scatter is a single fused pass over (out row, y row). The work is
// split over count*row_len elements (not just rows) so that a handful of very large
// rows still uses every thread. scatter_residual_relu_pool_ adds the per-channel mean
// to that pass; its work is split over whole channel planes (NCHW) or whole rows
// (channels_last), so that every sum is computed by one thread. relu_pool_ is the same
// pass without y (x = relu(x) in place) over all rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../index_math.h"
#include "clones.h"
#include "regroup_cpu.h"

namespace dynexec {
namespace {

namespace im = index_math;

// Elements per parallel chunk: large enough to amortise thread wake-up.
constexpr int64_t kGrainElems = 32768;

// Calls f(row, offset, len) for the row segments of [begin, end) of a flat
// [count, row_len] range, splitting the whole range over the intra-op threads.
template <typename F>
void parallel_row_segments(int64_t count, int64_t row_len, int64_t grain, const F& f) {
  at::parallel_for(0, count * row_len, grain, [&](int64_t begin, int64_t end) {
    im::RowOffset ro = im::flat_to_row_offset(begin, row_len);
    int64_t pos = begin;
    while (pos < end) {
      const int64_t len = std::min(row_len - ro.offset, end - pos);
      f(ro.row, ro.offset, len);
      pos += len;
      ro.row += 1;
      ro.offset = 0;
    }
  });
}

void check_indices_in_range(const char* op, const int64_t* idx, int64_t count, int64_t n_rows) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(im::index_in_range(idx[i], n_rows), "dynexec::", op, ": idx[", i, "]=", idx[i],
                " is out of range for a tensor with ", n_rows, " rows (expected 0 <= idx < ",
                n_rows, ")");
  }
}

// y[r] = x[idx[r]] (idx null: r) for rows of row_len elements of esize bytes; x's rows
// are x_bstride elements apart, y's dense.
void gather_rows_bytes(const char* xp, int64_t x_bstride, const int64_t* ip, int64_t count, int64_t row_len,
                       int64_t esize, char* yp) {
  parallel_row_segments(count, row_len, kGrainElems, [&](int64_t r, int64_t off, int64_t len) {
    std::memcpy(yp + im::row_element_offset(r, row_len, off) * esize,
                xp + im::row_element_offset(ip ? ip[r] : r, x_bstride, off) * esize,
                static_cast<size_t>(len * esize));
  });
}

std::tuple<at::Tensor, at::Tensor> partition_cpu(const at::Tensor& mask_) {
  check_mask(mask_);
  const at::Tensor mask = mask_.contiguous();
  const int64_t n = mask.numel();
  at::Tensor idx = at::empty({n}, mask.options().dtype(at::kLong));
  const uint8_t* m = static_cast<const uint8_t*>(mask.data_ptr());
  int64_t* out = idx.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += m[i] != 0;
  int64_t before = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool active = m[i] != 0;
    out[im::partition_slot(active, i, before, total)] = i;
    before += active;
  }
  at::Tensor count = at::scalar_tensor(total, mask.options().dtype(at::kLong));
  return std::make_tuple(idx, count);
}

at::Tensor gather_rows_cpu(const at::Tensor& x_, const at::Tensor& idx_, int64_t count) {
  check_gather_args(x_, idx_, count);
  const int64_t n_rows = x_.size(0);
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_indices_in_range("gather_rows", ip, count, n_rows);

  const at::MemoryFormat fmt = reference_memory_format(x_);
  const at::Tensor x = rows_dense(x_, fmt) ? x_ : x_.contiguous(fmt);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = count;
  at::Tensor y = at::empty(sizes, x.options().memory_format(fmt));
  const int64_t row_len = row_numel(x);
  if (count == 0 || row_len == 0) return y;

  gather_rows_bytes(static_cast<const char*>(x.data_ptr()), x.stride(0), ip, count, row_len, x.element_size(),
                    static_cast<char*>(y.data_ptr()));
  return y;
}

// out[idx[r]] = relu(out[idx[r]] + y[r]) for r < count; idx == nullptr means identity.
// Both out and y must have dense rows with the same in-row layout.
template <typename scalar_t>
void scatter_rows(scalar_t* op, int64_t o_bstride, const scalar_t* yp, int64_t y_bstride, const int64_t* ip,
                  int64_t count, int64_t row_len) {
  parallel_row_segments(count, row_len, kGrainElems, [&](int64_t r, int64_t off, int64_t len) {
    const int64_t dst_row = ip ? ip[r] : r;
    scalar_t* __restrict__ o = op + im::row_element_offset(dst_row, o_bstride, off);
    const scalar_t* __restrict__ s = yp + im::row_element_offset(r, y_bstride, off);
    for (int64_t j = 0; j < len; ++j) o[j] = im::relu_add<scalar_t>(o[j], s[j]);
  });
}

void fused_scatter_rows(at::Tensor& out, const at::Tensor& y, const int64_t* ip, int64_t count,
                        int64_t row_len) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "dynexec_scatter_residual_relu_cpu", [&] {
        scatter_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), y.const_data_ptr<scalar_t>(), y.stride(0),
                               ip, count, row_len);
      });
}

void scatter_residual_relu_cpu(const at::Tensor& out_, const at::Tensor& y_, const at::Tensor& idx_,
                               int64_t count) {
  at::Tensor out = out_;
  check_scatter_args(out, y_, idx_, count);
  const int64_t n_rows = out.size(0);
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_indices_in_range("scatter_residual_relu_", ip, count, n_rows);
  cpu::check_rows_distinct("scatter_residual_relu_", ip, count, n_rows);
  const int64_t row_len = row_numel(out);
  if (count == 0 || row_len == 0) return;

  at::MemoryFormat fmt;
  const bool dense = find_dense_row_format(out, fmt);
  at::Tensor y = y_.narrow(0, 0, count);
  if (dense) {
    if (!rows_dense(y, fmt)) y = y.contiguous(fmt);
    fused_scatter_rows(out, y, ip, count, row_len);
    return;
  }
  // out's rows are not dense: work on a dense copy of the selected rows and write them
  // back into out itself (never into a hidden copy of out).
  at::Tensor rows = out.index_select(0, idx).contiguous();
  y = y.contiguous();
  fused_scatter_rows(rows, y, nullptr, count, row_len);
  out.index_copy_(0, idx, rows);
}

// ------------------------------------------------------------------ scatter + pool
// Where a pooled pass takes each new value from: relu(o + s) (the scatter of a branch
// output onto its residual) or relu(o) (an in-place ReLU; s unused).
enum class PoolSource { kResidualAdd, kSelf };

template <PoolSource kSource, typename T>
DYNEXEC_FORCE_INLINE T pool_value(T o, const T* s, int64_t j) {
  return im::pool_update<kSource == PoolSource::kResidualAdd>(o, s, j);
}

// o[j] = the new value (pool_value) for j < len; returns
// the acc_t sum of the new o[j].
template <PoolSource kSource, typename scalar_t, typename acc_t>
DYNEXEC_CPU_CLONES acc_t scatter_plane_sum(scalar_t* __restrict__ o, const scalar_t* __restrict__ s,
                                           int64_t len) {
  // Independent partial sums: the compiler may not reorder one running float sum, but
  // it vectorises these lanes.
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const scalar_t v = pool_value<kSource>(o[j + k], s, j + k);
      o[j + k] = v;
      lanes[k] += static_cast<acc_t>(v);
    }
  }
  acc_t sum = acc_t(0);
  for (; j < len; ++j) {
    const scalar_t v = pool_value<kSource>(o[j], s, j);
    o[j] = v;
    sum += static_cast<acc_t>(v);
  }
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

// One channels_last row ([HW, C]): o = the new value (pool_value) and
// pooled_row[c] = the mean of the new o[:, c]. Four sets of C sums (`acc`, 4 * C scratch
// values) take the positions in turn, so that the adds of consecutive positions do not
// wait for each other.
template <PoolSource kSource, typename scalar_t, typename acc_t>
DYNEXEC_CPU_CLONES void scatter_pool_row_cl(scalar_t* __restrict__ o,
                                            const scalar_t* __restrict__ s, int64_t C, int64_t HW,
                                            acc_t* __restrict__ acc,
                                            scalar_t* __restrict__ pooled_row) {
  constexpr int64_t kSets = 4;
  std::fill(acc, acc + kSets * C, acc_t(0));
  for (int64_t p = 0; p < HW; ++p) {
    acc_t* __restrict__ a = acc + (p % kSets) * C;
    const int64_t off = im::row_plane_offset(0, p, C, HW, true);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = pool_value<kSource>(o[off + c], s, off + c);
      o[off + c] = v;
      a[c] += static_cast<acc_t>(v);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t sum = (acc[c] + acc[C + c]) + (acc[2 * C + c] + acc[3 * C + c]);
    pooled_row[c] = im::plane_mean<scalar_t, acc_t>(sum, HW);
  }
}

// For r < count: out row o_row = (out_rows ? out_rows[r] : r) becomes
// the new value (pool_value of out[o_row] and y[r]) and
// pooled[pool_rows ? pool_rows[r] : r, c] the mean of its channel c.
// out and y rows are dense with the same in-row layout (NCHW or channels_last).
template <PoolSource kSource, typename scalar_t>
void update_and_pool_rows(scalar_t* op, int64_t o_bstride, const scalar_t* yp, int64_t y_bstride,
                          const int64_t* out_rows, const int64_t* pool_rows, int64_t count, bool channels_last,
                          int64_t C, int64_t HW, scalar_t* pp) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!channels_last) {
    // One task = one channel plane (r, c): HW contiguous elements, one sum.
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, HW));
    at::parallel_for(0, count * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / C, c = t % C;
        const int64_t o_row = out_rows ? out_rows[r] : r;
        const int64_t off = im::row_plane_offset(c, 0, C, HW, false);
        const acc_t sum = scatter_plane_sum<kSource, scalar_t, acc_t>(
            op + im::row_element_offset(o_row, o_bstride, off),
            kSource != PoolSource::kSelf ? yp + im::row_element_offset(r, y_bstride, off) : nullptr, HW);
        pp[im::pooled_offset(pool_rows ? pool_rows[r] : r, c, C)] = im::plane_mean<scalar_t, acc_t>(sum, HW);
      }
    });
    return;
  }
  // channels_last: a row is [HW, C], so one task = whole rows.
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C * HW));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<acc_t> acc;  // reused: no allocation per call
    acc.resize(static_cast<size_t>(4 * C));
    for (int64_t r = begin; r < end; ++r) {
      scatter_pool_row_cl<kSource, scalar_t, acc_t>(
          op + im::row_element_offset(out_rows ? out_rows[r] : r, o_bstride, 0),
          kSource != PoolSource::kSelf ? yp + im::row_element_offset(r, y_bstride, 0) : nullptr, C, HW, acc.data(),
          pp + im::pooled_offset(pool_rows ? pool_rows[r] : r, 0, C));
    }
  });
}

template <PoolSource kSource>
void fused_pool_rows(at::Tensor& out, const at::Tensor& y, const int64_t* out_rows,
                     const int64_t* pool_rows, int64_t count, bool channels_last,
                     at::Tensor& pooled) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "dynexec_pool_rows_cpu", [&] {
        constexpr bool kReadsY = kSource != PoolSource::kSelf;
        update_and_pool_rows<kSource, scalar_t>(out.data_ptr<scalar_t>(), out.stride(0),
                                                kReadsY ? y.const_data_ptr<scalar_t>() : nullptr,
                                                kReadsY ? y.stride(0) : 0, out_rows, pool_rows, count,
                                                channels_last, out.size(1), out.size(2) * out.size(3),
                                                pooled.data_ptr<scalar_t>());
      });
}

void scatter_residual_relu_pool_cpu(const at::Tensor& out_, const at::Tensor& y_,
                                    const at::Tensor& idx_, int64_t count,
                                    const at::Tensor& pooled_) {
  const char* op = "scatter_residual_relu_pool_";
  at::Tensor out = out_;
  at::Tensor pooled = pooled_;
  check_scatter_pool_args(out, y_, idx_, count, pooled);
  const int64_t n_rows = out.size(0);
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_indices_in_range(op, ip, count, n_rows);
  cpu::check_rows_distinct(op, ip, count, n_rows);
  // (H * W == 0 still writes pooled: the mean of nothing is NaN, as in torch)
  if (count == 0 || out.size(1) == 0) return;

  at::MemoryFormat fmt;
  const bool dense = find_dense_row_format(out, fmt);
  at::Tensor y = y_.narrow(0, 0, count);
  if (dense) {
    if (!rows_dense(y, fmt)) y = y.contiguous(fmt);
    fused_pool_rows<PoolSource::kResidualAdd>(out, y, ip, ip, count, fmt == at::MemoryFormat::ChannelsLast, pooled);
    return;
  }
  // out's rows are not dense: as in scatter_residual_relu_cpu, fuse on a dense copy of
  // the selected rows and write them back into out itself.
  at::Tensor rows = out.index_select(0, idx).contiguous();
  y = y.contiguous();
  fused_pool_rows<PoolSource::kResidualAdd>(rows, y, nullptr, ip, count, false, pooled);
  out.index_copy_(0, idx, rows);
}

// ------------------------------------------------------------------ relu + pool
void relu_pool_cpu(const at::Tensor& x_, const at::Tensor& pooled_) {
  at::Tensor x = x_;
  at::Tensor pooled = pooled_;
  check_relu_pool_args(x, pooled);
  // (H * W == 0 still writes pooled: the mean of nothing is NaN, as in torch)
  if (x.size(0) == 0 || x.size(1) == 0) return;
  at::MemoryFormat fmt;
  if (find_dense_row_format(x, fmt)) {
    fused_pool_rows<PoolSource::kSelf>(x, at::Tensor(), nullptr, nullptr, x.size(0),
                           fmt == at::MemoryFormat::ChannelsLast, pooled);
    return;
  }
  // x's rows are not dense: fuse on a dense copy, then write it back into x itself.
  at::Tensor dense = x.contiguous();
  fused_pool_rows<PoolSource::kSelf>(dense, at::Tensor(), nullptr, nullptr, x.size(0), false, pooled);
  x.copy_(dense);
}

// x = relu(x) for len elements (vectorised in the x86-64-v3 clone).
DYNEXEC_CPU_CLONES void relu_span(float* __restrict__ x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) x[j] = im::relu<float>(x[j]);
}

}  // namespace

namespace cpu {

void check_rows_distinct(const char* op, const int64_t* idx, int64_t count, int64_t n_rows) {
  std::vector<uint8_t> seen(static_cast<size_t>(n_rows), 0);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(!seen[idx[i]], "dynexec::", op, ": idx[:count] must hold distinct rows, but row ",
                idx[i], " appears more than once (again at position ", i, ")");
    seen[idx[i]] = 1;
  }
}

void gather_rows_f32(const float* x, int64_t x_row_stride, const int64_t* idx, int64_t count, int64_t row_len,
                     float* y) {
  gather_rows_bytes(reinterpret_cast<const char*>(x), x_row_stride, idx, count, row_len, sizeof(float),
                    reinterpret_cast<char*>(y));
}

void relu_pool_nhwc_f32(float* x, int64_t n, int64_t C, int64_t HW, float* pooled) {
  update_and_pool_rows<PoolSource::kSelf, float>(x, C * HW, nullptr, 0, nullptr, nullptr, n,
                                                 /*channels_last=*/true, C, HW, pooled);
}

void relu_f32(float* x, int64_t numel) {
  at::parallel_for(0, numel, kGrainElems, [&](int64_t begin, int64_t end) { relu_span(x + begin, end - begin); });
}

}  // namespace cpu
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("partition", &dynexec::partition_cpu);
  m.impl("gather_rows", &dynexec::gather_rows_cpu);
  m.impl("scatter_residual_relu_", &dynexec::scatter_residual_relu_cpu);
  m.impl("scatter_residual_relu_pool_", &dynexec::scatter_residual_relu_pool_cpu);
  m.impl("relu_pool_", &dynexec::relu_pool_cpu);
}
