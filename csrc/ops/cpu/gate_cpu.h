// SkipNet's recurrent gate for a loop that runs many steps with the same LSTM: the
// float32 CPU kernel of recurrent_gate_step (gate_cpu.cpp) with its per-call set-up —
// argument checks, [w_ih | w_hh] transposed, b_ih + b_hh, three output allocations —
// done once. torch.classes.dynexec.BlockLoop runs its 53 steps per forward this way.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dynexec {
namespace cpu {

class PreparedGate {
 public:
  // w_ih [4H, E], w_hh [4H, H], b_ih / b_hh [4H], proj_w [H, 1], proj_b [1]; float32, CPU.
  PreparedGate(const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
               const at::Tensor& proj_w, const at::Tensor& proj_b);

  int64_t hidden() const { return H_; }
  int64_t embed() const { return E_; }

  // One step for pooled [N, C] with the embedding embed_w [C, E], embed_b [E]:
  // prob[n] = the gate's probability, hx / cx [N, H] replaced by the new state (in place).
  // All float32 CPU contiguous; embed_w / embed_b are checked by the caller once.
  void step(const at::Tensor& pooled, const at::Tensor& embed_w, const at::Tensor& embed_b, at::Tensor& hx,
            at::Tensor& cx, at::Tensor& prob) const;

 private:
  int64_t E_, H_;
  std::vector<float> wt_, bias_;  // [E + H, 4H] and [4H]
  at::Tensor proj_w_;
  float proj_b_;
};

}  // namespace cpu
}  // namespace dynexec
