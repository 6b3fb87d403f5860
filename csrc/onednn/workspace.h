// Buffers that a block loop reuses from block to block for its sub-batches: the gathered
// input rows of a routed block and the intermediate / output activations of its branch.
// Each slot grows to the largest size asked for and is then reused, so a forward
// allocates a few buffers instead of ~3 tensors per block (issue #4: "reuse workspaces
// instead of allocating per block"). One Workspace per shard of one forward: it is never
// shared between threads.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace dynexec {

class Workspace {
 public:
  enum Slot { kGathered = 0, kFirst = 1, kSecond = 2 };

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
