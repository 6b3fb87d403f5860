// The classifier head of the CIFAR / ImageNet ResNets, SkipNets and BlockDrop policies:
// global average pooling, a linear layer and, for a policy, a sigmoid. One kernel serves
// the `pooled_linear` op (the engine's Python head) and BlockLoop's C++ forward, so
// both compute bit-identical logits; every row is computed on its own, in a fixed
// order, so the result does not depend on the batch or on how it is split.
#pragma once

#include <cstdint>

namespace dynexec {
namespace cpu {

// out[r, k] = bias[k] + sum_c mean(h[r, :, c]) * weight[k, c]   (then sigmoid when asked)
// for the n NHWC-dense rows of h ([HW, C] each); weight [K, C] and out [n, K] contiguous.
void pooled_linear_nhwc_f32(const float* h, int64_t n, int64_t HW, int64_t C, const float* weight,
                            const float* bias, int64_t K, bool sigmoid, float* out);

}  // namespace cpu
}  // namespace dynexec
