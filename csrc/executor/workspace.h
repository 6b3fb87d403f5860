// Buffers that a block loop reuses from block to block for the intermediate / output
// activations of its branches.
// Each slot grows to the largest size asked for and is then reused, so a forward
// allocates a few buffers instead of ~3 tensors per block. One Workspace per shard of
// one forward: it is never shared between threads.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace dynexec {

class Workspace {
 public:
  enum Slot { kFirst = 0, kSecond = 1, kGroupSums = 2 };  // kGroupSums: a pooling's partial sums

  // Slot's buffer with room for at least numel floats (contents unspecified).
  float* get(Slot slot, int64_t numel) {
    at::Tensor& buffer = buffers_[slot];
    if (!buffer.defined() || buffer.numel() < numel) {
      buffer = at::Tensor();  // (free first: the old contents are not needed)
      buffer = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
    }
    return buffer.data_ptr<float>();
  }

 private:
  std::array<at::Tensor, 3> buffers_;
};

}  // namespace dynexec
