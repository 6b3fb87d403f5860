// CUDA kernels of partition, gather_rows, scatter_residual_relu_,
// scatter_residual_relu_pool_ and relu_pool_.
//
// * All kernels run on the current stream with grid-stride loops.
// * gather / scatter move rows in 16-byte vectors when the row length, the batch
//   strides and the base pointers allow it (else in element-sized units).
// * partition computes the count on the device (cumsum + one scatter kernel): no host
//   synchronisation inside the op.
// * Indices are validated on the device: an out-of-range idx raises a device-side
//   assertion (CUDA_KERNEL_ASSERT, like ATen's index kernels) and is never dereferenced.
//   Duplicate indices in scatter_residual_relu_ are rejected on CPU only; on CUDA they
//   are undefined behaviour (a data race), as documented in the contract.
// * scatter_residual_relu_pool_ runs one block per row: the block updates the row and
//   reduces each channel's new values (a warp per channel plane for NCHW rows; for
//   channels_last rows, threads on adjacent channels plus a shared-memory reduction).
//   relu_pool_ is the same kernel without y (x = relu(x) in place) over all rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../index_math.h"

namespace dynexec {
namespace {

namespace im = index_math;

constexpr int kThreads = 256;

int64_t num_blocks(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * 8));
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ------------------------------------------------------------------------ partition
// incl[i] = number of active rows in [0, i]; incl[n-1] is the count.
__global__ void partition_kernel(const uint8_t* __restrict__ mask, const int64_t* __restrict__ incl,
                                 int64_t n, int64_t* __restrict__ idx, int64_t* __restrict__ count) {
  const int64_t total = incl[n - 1];
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const bool active = mask[i] != 0;
    idx[im::partition_slot(active, i, incl[i] - (active ? 1 : 0), total)] = i;
  }
  if (grid_start() == 0) *count = total;
}

std::tuple<at::Tensor, at::Tensor> partition_cuda(const at::Tensor& mask_) {
  check_mask(mask_);
  c10::cuda::CUDAGuard guard(mask_.device());
  // A uint8 mask may hold any nonzero value for "active": normalise to 0/1 for the scan.
  const at::Tensor mask = (mask_.scalar_type() == at::kBool ? mask_ : mask_.ne(0)).contiguous();
  const int64_t n = mask.numel();
  at::Tensor idx = at::empty({n}, mask.options().dtype(at::kLong));
  if (n == 0) return std::make_tuple(idx, at::zeros({}, mask.options().dtype(at::kLong)));
  at::Tensor count = at::empty({}, mask.options().dtype(at::kLong));  // written by the kernel
  const at::Tensor incl = at::cumsum(mask, 0, at::kLong);  // device-side scan, no sync
  auto stream = at::cuda::getCurrentCUDAStream();
  partition_kernel<<<num_blocks(n), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(mask.data_ptr()), incl.const_data_ptr<int64_t>(), n,
      idx.data_ptr<int64_t>(), count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(idx, count);
}

// ------------------------------------------------------------------------ vectors
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Largest power-of-two byte width <= 16 dividing every value (byte offsets/pointers).
int vector_bytes(std::initializer_list<int64_t> values) {
  int w = 16;
  for (int64_t v : values) {
    while (w > 1 && (v % w) != 0) w /= 2;
  }
  return w;
}

// ------------------------------------------------------------------------ gather
// Unit-typed row copy: U is a trivially copyable unit of `sizeof(U)` bytes.
template <typename U>
__global__ void gather_kernel(const U* __restrict__ x, U* __restrict__ y, const int64_t* __restrict__ idx,
                              int64_t count, int64_t row_units, int64_t x_bstride_units, int64_t n_rows) {
  const int64_t total = count * row_units;
  for (int64_t f = grid_start(); f < total; f += grid_stride()) {
    const im::RowOffset ro = im::flat_to_row_offset(f, row_units);
    const int64_t src = idx[ro.row];
    CUDA_KERNEL_ASSERT(im::index_in_range(src, n_rows) && "dynexec::gather_rows: idx out of range");
    if (!im::index_in_range(src, n_rows)) continue;
    y[f] = x[im::row_element_offset(src, x_bstride_units, ro.offset)];
  }
}

template <typename U>
void launch_gather(const at::Tensor& x, at::Tensor& y, const at::Tensor& idx, int64_t count,
                   int64_t row_bytes, int64_t x_bstride_bytes) {
  const int64_t row_units = row_bytes / sizeof(U);
  const int64_t total = count * row_units;
  gather_kernel<U><<<num_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const U*>(x.const_data_ptr()), static_cast<U*>(y.data_ptr()),
      idx.const_data_ptr<int64_t>(), count, row_units, x_bstride_bytes / static_cast<int64_t>(sizeof(U)),
      x.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_rows_cuda(const at::Tensor& x_, const at::Tensor& idx_, int64_t count) {
  check_gather_args(x_, idx_, count);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::MemoryFormat fmt = reference_memory_format(x_);
  const at::Tensor x = rows_dense(x_, fmt) ? x_ : x_.contiguous(fmt);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = count;
  at::Tensor y = at::empty(sizes, x.options().memory_format(fmt));
  const int64_t row_len = row_numel(x);
  if (count == 0 || row_len == 0) return y;
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  const int64_t esize = x.element_size();
  const int64_t row_bytes = row_len * esize;
  const int64_t x_bstride_bytes = x.stride(0) * esize;
  const int w = vector_bytes({row_bytes, x_bstride_bytes,
                              static_cast<int64_t>(reinterpret_cast<uintptr_t>(x.const_data_ptr())),
                              static_cast<int64_t>(reinterpret_cast<uintptr_t>(y.data_ptr()))});
  switch (w) {
    case 16: launch_gather<uint4>(x, y, idx, count, row_bytes, x_bstride_bytes); break;
    case 8: launch_gather<uint2>(x, y, idx, count, row_bytes, x_bstride_bytes); break;
    case 4: launch_gather<uint32_t>(x, y, idx, count, row_bytes, x_bstride_bytes); break;
    case 2: launch_gather<uint16_t>(x, y, idx, count, row_bytes, x_bstride_bytes); break;
    default: launch_gather<uint8_t>(x, y, idx, count, row_bytes, x_bstride_bytes); break;
  }
  return y;
}

// ------------------------------------------------------------------------ scatter
// out[idx[r]] = relu(y[r] + out[idx[r]]), V elements of T per thread and step.
template <typename T, int V>
__global__ void scatter_residual_relu_kernel(T* __restrict__ out, const T* __restrict__ y,
                                             const int64_t* __restrict__ idx, int64_t count,
                                             int64_t row_vecs, int64_t out_bstride_vecs,
                                             int64_t y_bstride_vecs, int64_t n_rows) {
  using VT = Vec<T, V>;
  VT* ov = reinterpret_cast<VT*>(out);
  const VT* yv = reinterpret_cast<const VT*>(y);
  const int64_t total = count * row_vecs;
  for (int64_t f = grid_start(); f < total; f += grid_stride()) {
    const im::RowOffset ro = im::flat_to_row_offset(f, row_vecs);
    const int64_t dst = idx[ro.row];
    CUDA_KERNEL_ASSERT(im::index_in_range(dst, n_rows) &&
                       "dynexec::scatter_residual_relu_: idx out of range");
    if (!im::index_in_range(dst, n_rows)) continue;
    const int64_t o_off = im::row_element_offset(dst, out_bstride_vecs, ro.offset);
    const VT a = yv[im::row_element_offset(ro.row, y_bstride_vecs, ro.offset)];
    VT b = ov[o_off];
#pragma unroll
    for (int k = 0; k < V; ++k) b.v[k] = im::relu_add<T>(b.v[k], a.v[k]);
    ov[o_off] = b;
  }
}

template <typename T, int V>
void launch_scatter(at::Tensor& out, const at::Tensor& y, const at::Tensor& idx, int64_t count,
                    int64_t row_len) {
  const int64_t row_vecs = row_len / V;
  const int64_t total = count * row_vecs;
  scatter_residual_relu_kernel<T, V><<<num_blocks(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<T>(), y.const_data_ptr<T>(), idx.const_data_ptr<int64_t>(), count, row_vecs,
      out.stride(0) / V, y.stride(0) / V, out.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_scatter_rows_cuda(at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                             int64_t count, int64_t row_len) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "dynexec_scatter_residual_relu_cuda", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const int64_t es = sizeof(scalar_t);
        const int w = vector_bytes(
            {row_len * es, out.stride(0) * es, y.stride(0) * es,
             static_cast<int64_t>(reinterpret_cast<uintptr_t>(out.data_ptr())),
             static_cast<int64_t>(reinterpret_cast<uintptr_t>(y.const_data_ptr()))});
        if (w == 16) {
          launch_scatter<scalar_t, kVec>(out, y, idx, count, row_len);
        } else {
          launch_scatter<scalar_t, 1>(out, y, idx, count, row_len);
        }
      });
}

void scatter_residual_relu_cuda(const at::Tensor& out_, const at::Tensor& y_, const at::Tensor& idx_,
                                int64_t count) {
  at::Tensor out = out_;
  check_scatter_args(out, y_, idx_, count);
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t row_len = row_numel(out);
  if (count == 0 || row_len == 0) return;
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  at::MemoryFormat fmt;
  const bool dense = find_dense_row_format(out, fmt);
  at::Tensor y = y_.narrow(0, 0, count);
  if (dense) {
    if (!rows_dense(y, fmt)) y = y.contiguous(fmt);
    fused_scatter_rows_cuda(out, y, idx, count, row_len);
    return;
  }
  // out's rows are not dense: fuse on a dense copy of the selected rows, then write
  // them back into out itself.
  at::Tensor rows = out.index_select(0, idx).contiguous();
  y = y.contiguous();
  const at::Tensor iota = at::arange(count, idx.options());
  fused_scatter_rows_cuda(rows, y, iota, count, row_len);
  out.index_copy_(0, idx, rows);
}

// ------------------------------------------------------------------------ scatter + pool
// Block r (grid-stride over rows): out row o_row = (out_rows ? out_rows[r] : r) becomes
// relu(y[r] + out[o_row]) (kResidual) or relu(out[o_row]) (y unused), and
// pooled[pool_rows ? pool_rows[r] : r, c] the mean of its channel c. Rows of out and y
// are dense with the same in-row layout (kChannelsLast: [HW, C], else [C, HW]).
template <typename T, bool kChannelsLast, bool kResidual>
__device__ __forceinline__ void pool_rows_body(T* __restrict__ out, const T* __restrict__ y,
                                               const int64_t* __restrict__ out_rows,
                                               const int64_t* __restrict__ pool_rows,
                                               int64_t count, int64_t C, int64_t HW,
                                               int64_t out_bstride, int64_t y_bstride,
                                               int64_t out_n, int64_t pooled_n,
                                               T* __restrict__ pooled) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ unsigned char smem[];
  acc_t* part = reinterpret_cast<acc_t*>(smem);  // [blockDim.x] (channels_last only)
  const int t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < count; r += gridDim.x) {
    const int64_t prow = pool_rows ? pool_rows[r] : r;
    const int64_t orow = out_rows ? out_rows[r] : r;
    CUDA_KERNEL_ASSERT(im::index_in_range(prow, pooled_n) && im::index_in_range(orow, out_n) &&
                       "dynexec::scatter_residual_relu_pool_/relu_pool_: idx out of range");
    if (!im::index_in_range(prow, pooled_n) || !im::index_in_range(orow, out_n)) continue;
    T* o = out + im::row_element_offset(orow, out_bstride, 0);
    const T* s = kResidual ? y + im::row_element_offset(r, y_bstride, 0) : nullptr;
    if (kChannelsLast) {
      // A pass covers `cpt` adjacent channels (coalesced) and `slices` positions at once;
      // each thread sums its slice, then the slices are added in shared memory.
      const int cpt = static_cast<int>(C < blockDim.x ? C : blockDim.x);
      const int slices = blockDim.x / cpt;
      const int slice = t / cpt;
      for (int64_t c0 = 0; c0 < C; c0 += cpt) {
        const int64_t c = c0 + t % cpt;
        acc_t acc = acc_t(0);
        if (slice < slices && c < C) {
          for (int64_t p = slice; p < HW; p += slices) {
            const int64_t off = im::row_plane_offset(c, p, C, HW, true);
            const T v = im::pool_update<kResidual>(o[off], s, off);
            o[off] = v;
            acc += static_cast<acc_t>(v);
          }
        }
        part[t] = acc;
        __syncthreads();
        if (t < cpt && c < C) {
          acc_t sum = acc_t(0);
          for (int k = 0; k < slices; ++k) sum += part[k * cpt + t];
          pooled[im::pooled_offset(prow, c, C)] = im::plane_mean<T, acc_t>(sum, HW);
        }
        __syncthreads();
      }
    } else {
      // One warp per channel plane: lanes stride over the plane, then a shuffle sum.
      const int warp = t / C10_WARP_SIZE, lane = t % C10_WARP_SIZE;
      const int warps = blockDim.x / C10_WARP_SIZE;
      for (int64_t c = warp; c < C; c += warps) {
        acc_t acc = acc_t(0);
        for (int64_t p = lane; p < HW; p += C10_WARP_SIZE) {
          const int64_t off = im::row_plane_offset(c, p, C, HW, false);
          const T v = im::pool_update<kResidual>(o[off], s, off);
          o[off] = v;
          acc += static_cast<acc_t>(v);
        }
        for (int d = C10_WARP_SIZE / 2; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
        if (lane == 0) pooled[im::pooled_offset(prow, c, C)] = im::plane_mean<T, acc_t>(acc, HW);
      }
    }
  }
}

// The two ops' kernels (distinct names, so each can be found in the binary).
template <typename T, bool kChannelsLast>
__global__ void scatter_residual_relu_pool_kernel(T* __restrict__ out, const T* __restrict__ y,
                                                  const int64_t* __restrict__ out_rows,
                                                  const int64_t* __restrict__ pool_rows,
                                                  int64_t count, int64_t C, int64_t HW,
                                                  int64_t out_bstride, int64_t y_bstride,
                                                  int64_t out_n, int64_t pooled_n,
                                                  T* __restrict__ pooled) {
  pool_rows_body<T, kChannelsLast, true>(out, y, out_rows, pool_rows, count, C, HW, out_bstride,
                                         y_bstride, out_n, pooled_n, pooled);
}
template <typename T, bool kChannelsLast>
__global__ void relu_pool_inplace_kernel(T* __restrict__ x, const T* __restrict__ unused_y,
                                         const int64_t* __restrict__ unused_rows,
                                         const int64_t* __restrict__ unused_pool_rows,
                                         int64_t n, int64_t C, int64_t HW, int64_t x_bstride,
                                         int64_t unused_y_bstride, int64_t x_n, int64_t pooled_n,
                                         T* __restrict__ pooled) {
  pool_rows_body<T, kChannelsLast, false>(x, nullptr, nullptr, nullptr, n, C, HW, x_bstride, 0,
                                          x_n, pooled_n, pooled);
}

template <typename T, bool kChannelsLast, bool kResidual>
constexpr auto pool_rows_kernel() {
  if constexpr (kResidual) {
    return &scatter_residual_relu_pool_kernel<T, kChannelsLast>;
  } else {
    return &relu_pool_inplace_kernel<T, kChannelsLast>;
  }
}

template <bool kResidual>
void fused_pool_rows_cuda(at::Tensor& out, const at::Tensor& y, const int64_t* out_rows,
                          const int64_t* pool_rows, int64_t count, bool channels_last,
                          at::Tensor& pooled) {
  const int64_t C = out.size(1), HW = out.size(2) * out.size(3);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(count, sms * 16));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "dynexec_pool_rows_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* yp = kResidual ? y.const_data_ptr<scalar_t>() : nullptr;
        const int64_t y_bstride = kResidual ? y.stride(0) : 0;
        if (channels_last) {
          pool_rows_kernel<scalar_t, true, kResidual>()
              <<<blocks, kThreads, kThreads * sizeof(acc_t), stream>>>(
                  out.data_ptr<scalar_t>(), yp, out_rows, pool_rows, count, C, HW,
                  out.stride(0), y_bstride, out.size(0), pooled.size(0),
                  pooled.data_ptr<scalar_t>());
        } else {
          pool_rows_kernel<scalar_t, false, kResidual>()
              <<<blocks, kThreads, 0, stream>>>(out.data_ptr<scalar_t>(), yp, out_rows, pool_rows,
                                                count, C, HW, out.stride(0), y_bstride,
                                                out.size(0), pooled.size(0),
                                                pooled.data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void scatter_residual_relu_pool_cuda(const at::Tensor& out_, const at::Tensor& y_,
                                     const at::Tensor& idx_, int64_t count,
                                     const at::Tensor& pooled_) {
  at::Tensor out = out_;
  at::Tensor pooled = pooled_;
  check_scatter_pool_args(out, y_, idx_, count, pooled);
  c10::cuda::CUDAGuard guard(out.device());
  // (H * W == 0 still writes pooled: the mean of nothing is NaN, as in torch)
  if (count == 0 || out.size(1) == 0) return;
  const at::Tensor idx = idx_.narrow(0, 0, count).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  at::MemoryFormat fmt;
  const bool dense = find_dense_row_format(out, fmt);
  at::Tensor y = y_.narrow(0, 0, count);
  if (dense) {
    if (!rows_dense(y, fmt)) y = y.contiguous(fmt);
    fused_pool_rows_cuda<true>(out, y, ip, ip, count, fmt == at::MemoryFormat::ChannelsLast,
                               pooled);
    return;
  }
  // out's rows are not dense: fuse on a dense copy of the selected rows, then write them
  // back into out itself (pooled rows still go to idx).
  at::Tensor rows = out.index_select(0, idx).contiguous();
  y = y.contiguous();
  fused_pool_rows_cuda<true>(rows, y, nullptr, ip, count, false, pooled);
  out.index_copy_(0, idx, rows);
}

// ------------------------------------------------------------------------ relu + pool
void relu_pool_cuda(const at::Tensor& x_, const at::Tensor& pooled_) {
  at::Tensor x = x_;
  at::Tensor pooled = pooled_;
  check_relu_pool_args(x, pooled);
  c10::cuda::CUDAGuard guard(x.device());
  // (H * W == 0 still writes pooled: the mean of nothing is NaN, as in torch)
  if (x.size(0) == 0 || x.size(1) == 0) return;
  at::MemoryFormat fmt;
  if (find_dense_row_format(x, fmt)) {
    fused_pool_rows_cuda<false>(x, at::Tensor(), nullptr, nullptr, x.size(0),
                                fmt == at::MemoryFormat::ChannelsLast, pooled);
    return;
  }
  // x's rows are not dense: fuse on a dense copy, then write it back into x itself.
  at::Tensor dense = x.contiguous();
  fused_pool_rows_cuda<false>(dense, at::Tensor(), nullptr, nullptr, x.size(0), false, pooled);
  x.copy_(dense);
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CUDA, m) {
  m.impl("partition", &dynexec::partition_cuda);
  m.impl("gather_rows", &dynexec::gather_rows_cuda);
  m.impl("scatter_residual_relu_", &dynexec::scatter_residual_relu_cuda);
  m.impl("scatter_residual_relu_pool_", &dynexec::scatter_residual_relu_pool_cuda);
  m.impl("relu_pool_", &dynexec::relu_pool_cuda);
}
