// CPU kernel of downsample_b (BlockDrop's parameter-free CIFAR shortcut).
//
// Each input channel plane is pooled once; the pooled value is written to its own
// output channel and, multiplied by 0, to the (out_channels / C - 1) zero channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../index_math.h"

namespace dynexec {
namespace {

namespace im = index_math;

at::Tensor downsample_b_cpu(const at::Tensor& x_, int64_t out_channels) {
  check_downsample_args(x_, out_channels);
  const at::MemoryFormat fmt = reference_memory_format(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = out_channels, Ho = H / 2, Wo = W / 2;
  const int64_t ratio = Co / C;
  at::Tensor z = at::empty({N, Co, Ho, Wo}, x.options().memory_format(fmt));
  if (z.numel() == 0) return z;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynexec_downsample_b_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      // One task = one output pixel row (n, ho): all wo, all channels (contiguous in c).
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Wo * Co));
      at::parallel_for(0, N * Ho, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / Ho, ho = t % Ho;
          for (int64_t wo = 0; wo < Wo; ++wo) {
            const im::PoolWindow w0 = im::downsample_b_window_nhwc(n, 0, ho, wo, C, H, W);
            scalar_t* dst = zp + im::nhwc_offset(n, 0, ho, wo, Co, Ho, Wo);
            const scalar_t* src = xp + w0.base;
            for (int64_t c = 0; c < C; ++c) {
              dst[c] = im::downsample_b_value<scalar_t, acc_t>(src[c], src[c + w0.dw], src[c + w0.dh],
                                                               src[c + w0.dh + w0.dw], false);
            }
            for (int64_t k = 1; k < ratio; ++k) {
              for (int64_t c = 0; c < C; ++c) dst[k * C + c] = im::times_zero<scalar_t, acc_t>(dst[c]);
            }
          }
        }
      });
    } else {
      // One task = one input channel plane (n, c) -> output planes c, c + C, c + 2C, ...
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Ho * Wo * ratio));
      at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / C, c = t % C;
          scalar_t* dst = zp + im::nchw_offset(n, c, 0, 0, Co, Ho, Wo);
          for (int64_t ho = 0; ho < Ho; ++ho) {
            for (int64_t wo = 0; wo < Wo; ++wo) {
              const im::PoolWindow w = im::downsample_b_window_nchw(n, c, ho, wo, C, H, W);
              const scalar_t* src = xp + w.base;
              dst[ho * Wo + wo] = im::downsample_b_value<scalar_t, acc_t>(
                  src[0], src[w.dw], src[w.dh], src[w.dh + w.dw], w.zero);
            }
          }
          for (int64_t k = 1; k < ratio; ++k) {
            scalar_t* zdst = zp + im::nchw_offset(n, c + k * C, 0, 0, Co, Ho, Wo);
            for (int64_t p = 0; p < Ho * Wo; ++p) zdst[p] = im::times_zero<scalar_t, acc_t>(dst[p]);
          }
        }
      });
    }
  });
  return z;
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("downsample_b", &dynexec::downsample_b_cpu);
}
