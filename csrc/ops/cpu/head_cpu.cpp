// CPU kernel of dynexec::pooled_linear (see head_cpu.h).
#include "head_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dynexec {
namespace cpu {

void pooled_linear_nhwc_f32(const float* h, int64_t n, int64_t HW, int64_t C, const float* weight,
                            const float* bias, int64_t K, bool sigmoid, float* out) {
  std::vector<float> mean(static_cast<size_t>(C));
  for (int64_t r = 0; r < n; ++r) {
    const float* row = h + r * HW * C;
    std::fill(mean.begin(), mean.end(), 0.0f);
    for (int64_t p = 0; p < HW; ++p) {
      for (int64_t c = 0; c < C; ++c) mean[c] += row[p * C + c];
    }
    // (HW == 0: 0 / 0 = NaN, the mean of nothing, as in torch)
    for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(HW);
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.0f;
      for (int64_t c = 0; c < C; ++c) acc += mean[c] * weight[k * C + c];
      const float logit = acc + bias[k];
      out[r * K + k] = sigmoid ? 1.0f / (1.0f + std::exp(-logit)) : logit;
    }
  }
}

}  // namespace cpu

namespace {

at::Tensor pooled_linear_cpu(const at::Tensor& h_, const at::Tensor& weight_, const at::Tensor& bias_,
                             bool sigmoid) {
  TORCH_CHECK(h_.scalar_type() == at::kFloat && h_.dim() == 4,
              "dynexec::pooled_linear: expected a float32 feature map h [N, C, H, W], got ", h_.scalar_type(),
              " with shape ", h_.sizes());
  const int64_t C = h_.size(1);
  TORCH_CHECK(weight_.scalar_type() == at::kFloat && weight_.dim() == 2 && weight_.size(1) == C &&
                  weight_.device() == h_.device(),
              "dynexec::pooled_linear: expected a float32 weight [K, ", C, "] on ", h_.device(), ", got ",
              weight_.scalar_type(), " with shape ", weight_.sizes(), " on ", weight_.device());
  const int64_t K = weight_.size(0);
  TORCH_CHECK(bias_.scalar_type() == at::kFloat && bias_.sizes().equals({K}) && bias_.device() == h_.device(),
              "dynexec::pooled_linear: expected a float32 bias [", K, "] on ", h_.device(), ", got ",
              bias_.scalar_type(), " with shape ", bias_.sizes(), " on ", bias_.device());
  const at::Tensor h = h_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_.contiguous(), bias = bias_.contiguous();
  const int64_t n = h.size(0), HW = h.size(2) * h.size(3);
  at::Tensor out = at::empty({n, K}, h.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0 || K == 0) return out;
  const float* hp = h.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Rows are independent: split them over the threads (the same per-row arithmetic).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, HW * C + K * C));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    cpu::pooled_linear_nhwc_f32(hp + begin * HW * C, end - begin, HW, C, weight.const_data_ptr<float>(),
                                bias.const_data_ptr<float>(), K, sigmoid, op + begin * K);
  });
  return out;
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("pooled_linear", &dynexec::pooled_linear_cpu);
}
