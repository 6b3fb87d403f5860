// CUDA kernel of downsample_b: one thread per output element (grid-stride), the
// output's memory-order flat index is mapped to its input 2x2 window by the shared
// helpers in index_math.h (the same ones the CPU kernel uses).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../index_math.h"

namespace dynexec {
namespace {

namespace im = index_math;

constexpr int kThreads = 256;

template <typename T, bool kChannelsLast>
__global__ void downsample_b_kernel(const T* __restrict__ x, T* __restrict__ z, int64_t total,
                                    int64_t Co, int64_t C, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const im::PoolWindow p = kChannelsLast ? im::downsample_b_window_from_out_nhwc(o, Co, C, H, W)
                                           : im::downsample_b_window_from_out_nchw(o, Co, C, H, W);
    z[o] = im::downsample_b_value<T, acc_t>(x[p.base], x[p.base + p.dw], x[p.base + p.dh],
                                            x[p.base + p.dh + p.dw], p.zero);
  }
}

at::Tensor downsample_b_cuda(const at::Tensor& x_, int64_t out_channels) {
  check_downsample_args(x_, out_channels);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::MemoryFormat fmt = reference_memory_format(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor z = at::empty({N, out_channels, H / 2, W / 2}, x.options().memory_format(fmt));
  const int64_t total = z.numel();
  if (total == 0) return z;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynexec_downsample_b_cuda", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      downsample_b_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), total, out_channels, C, H, W);
    } else {
      downsample_b_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), total, out_channels, C, H, W);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CUDA, m) {
  m.impl("downsample_b", &dynexec::downsample_b_cuda);
}
