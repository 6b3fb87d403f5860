// torch.classes.dynexec.BlockLoop: the engine's block loop in C++, for programs whose
// branches and projection shortcuts are OneDnnChains:
//   run_planned(h, routing)  a routing known up front (BlockDrop's policy, a forced one)
//   run_recurrent(h)         SkipNet's recurrent gate decides block k + 1 after block k
//
// It runs exactly the steps of the Python engine's loops (dynexec/engine.py) — per
// block: partition the routed rows, the branch on them or on the whole batch, the fused
// scatter (which also pools for the gate), one recurrent_gate_step — but without the ~6
// Python-level calls per block, which on 2 CPU cores cost as much as the arithmetic of a
// block on a small sub-batch. The kernels are the same (the native ops through the
// dispatcher, OneDnnChain's convolutions), so the results are identical to the Python
// loop's; tests/test_engine.py compares both, and both with the reference model.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../index_math.h"
#include "chain.h"
#include "native_ops.h"

namespace dynexec {
namespace loop_detail {

// Writes idx = the partition of the rows whose route[i * stride] is true (routed rows
// first, both parts in increasing order); returns the number of routed rows.
inline int64_t partition_rows(const bool* route, int64_t stride, int64_t n, int64_t* idx) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += route[i * stride];
  int64_t before = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool active = route[i * stride];
    idx[index_math::partition_slot(active, i, before, total)] = i;  // the partition op's arithmetic
    before += active;
  }
  return total;
}

struct Block {
  c10::intrusive_ptr<OneDnnChain> branch;
  c10::intrusive_ptr<OneDnnChain> projection;  // shortcut: projection, else
  int64_t downsample_channels = 0;             // DownsampleB to this many channels, else identity
  bool identity() const { return !projection && downsample_channels == 0; }
};

struct RecurrentGate {  // SkipNet's recurrent gate (see recurrent_gate_step)
  at::Tensor w_ih, w_hh, b_ih, b_hh, proj_w, proj_b;
  std::vector<at::Tensor> embed_w, embed_b;  // the gate after block k
};

class BlockLoop : public torch::CustomClassHolder {
 public:
  // Appends a block: its branch and its shortcut — projection (a OneDnnChain), else
  // DownsampleB to downsample_channels (> 0), else identity.
  void add_block(c10::intrusive_ptr<OneDnnChain> branch, std::optional<c10::intrusive_ptr<OneDnnChain>> projection,
                 int64_t downsample_channels) {
    TORCH_CHECK(downsample_channels >= 0 && !(projection && downsample_channels > 0),
                "BlockLoop.add_block: expected a projection or downsample_channels > 0 or neither, got ",
                projection ? "a projection and " : "", "downsample_channels=", downsample_channels);
    blocks_.push_back(Block{std::move(branch), projection ? *projection : nullptr, downsample_channels});
  }

  void set_recurrent_gate(at::Tensor w_ih, at::Tensor w_hh, at::Tensor b_ih, at::Tensor b_hh, at::Tensor proj_w,
                          at::Tensor proj_b, std::vector<at::Tensor> embed_w, std::vector<at::Tensor> embed_b) {
    TORCH_CHECK(w_hh.dim() == 2, "BlockLoop.set_recurrent_gate: expected w_hh [4 * hidden, hidden], got shape ",
                w_hh.sizes());
    TORCH_CHECK(embed_w.size() == blocks_.size() && embed_b.size() == blocks_.size(),
                "BlockLoop.set_recurrent_gate: expected one embedding per block (", blocks_.size(), "), got ",
                embed_w.size(), " weights and ", embed_b.size(), " biases");
    gate_ = RecurrentGate{std::move(w_ih), std::move(w_hh), std::move(b_ih), std::move(b_hh), std::move(proj_w),
                          std::move(proj_b), std::move(embed_w), std::move(embed_b)};
  }

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // h: the stem output [N, C, H, W]; routing [N, K] bool, block k runs on routing[:, k].
  at::Tensor run_planned(at::Tensor h, const at::Tensor& routing_) {
    const int64_t n = h.size(0), num = num_blocks();
    TORCH_CHECK(routing_.scalar_type() == at::kBool && routing_.dim() == 2 && routing_.size(0) == n &&
                    routing_.size(1) == num,
                "BlockLoop.run_planned: expected a bool routing [", n, ", ", num, "], got ", routing_.scalar_type(),
                " with shape ", routing_.sizes());
    const at::Tensor routing = routing_.cpu().contiguous();
    at::Tensor idx = at::empty({n}, h.options().dtype(at::kLong));
    at::Tensor no_pool;
    for (int64_t k = 0; k < num; ++k) {
      const int64_t active = partition_rows(routing.const_data_ptr<bool>() + k, num, n, idx.data_ptr<int64_t>());
      h = run_block(blocks_[k], h, idx, active, no_pool, /*pool=*/false);
    }
    return h;
  }

  // Returns (the last block's output, routing [N, K] bool): block 0 always runs, block
  // k + 1 iff the gate after block k gives p > 0.5 (NaN: skip).
  std::tuple<at::Tensor, at::Tensor> run_recurrent(at::Tensor h) {
    const int64_t n = h.size(0), num = num_blocks();
    TORCH_CHECK(gate_.has_value(), "BlockLoop.run_recurrent: no recurrent gate was set");
    const RecurrentGate& g = *gate_;
    at::Tensor routing = at::ones({n, num}, h.options().dtype(at::kBool));
    at::Tensor hx = at::zeros({n, g.w_hh.size(1)}, h.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor cx = hx.clone();
    at::Tensor idx = at::arange(n, h.options().dtype(at::kLong));
    at::Tensor pooled;  // the current h's spatial means [N, C] (undefined before block 0)
    int64_t active = n;
    bool* route = routing.data_ptr<bool>();
    for (int64_t k = 0; k < num; ++k) {
      h = run_block(blocks_[k], h, idx, active, pooled, /*pool=*/k + 1 < num);
      if (k + 1 == num) break;
      at::Tensor p;
      std::tie(p, hx, cx) = native::recurrent_gate_step(pooled, g.embed_w[k], g.embed_b[k], g.w_ih, g.w_hh, g.b_ih,
                                                g.b_hh, g.proj_w, g.proj_b, hx, cx);
      active = decide(p, route + k + 1, num, idx);
    }
    return {h, routing};
  }

 private:
  at::Tensor shortcut(const Block& b, const at::Tensor& h) const {
    if (b.projection) return b.projection->forward(h);
    if (b.downsample_channels > 0) return native::downsample_b(h, b.downsample_channels);
    return h;  // the engine owns h: an identity block updates it in place
  }

  // Block b on the `active` rows idx[:active] of h; with `pool`, pooled becomes the
  // output's spatial means (the next gate's input).
  at::Tensor run_block(const Block& b, const at::Tensor& h, const at::Tensor& idx, int64_t active,
                       at::Tensor& pooled, bool pool) {
    const int64_t n = h.size(0);
    if (!b.identity() || !pool || !pooled.defined()) {  // (block 0 has no cached means)
      at::Tensor out = shortcut(b, h);
      if (active == n) {
        b.branch->add_relu_(h, out);
      } else if (active > 0) {
        b.branch->rows_add_relu_(h, idx, active, out);
      }
      if (pool) pooled = out.mean({2, 3}).contiguous();
      return out;
    }
    // Identity shortcut: rows the block skips keep their values and their cached means.
    if (active == n) {
      b.branch->add_relu_pool_(h, h, pooled);
    } else if (active > 0) {
      b.branch->rows_add_relu_pool_(h, idx, active, h, pooled);
    }
    return h;
  }

  // route[i * stride] = p[i] > 0.5 (SkipNet's rule; NaN: false) and idx = the partition.
  static int64_t decide(const at::Tensor& prob, bool* route, int64_t stride, at::Tensor& idx) {
    TORCH_CHECK(prob.scalar_type() == at::kFloat, "BlockLoop: expected float32 gate probabilities, got ",
                prob.scalar_type());
    const at::Tensor p = prob.reshape({-1}).contiguous();
    const float* pp = p.const_data_ptr<float>();
    for (int64_t i = 0; i < p.numel(); ++i) route[i * stride] = pp[i] > 0.5f;
    return partition_rows(route, stride, p.numel(), idx.data_ptr<int64_t>());
  }

  std::vector<Block> blocks_;
  std::optional<RecurrentGate> gate_;
};

}  // namespace loop_detail

using loop_detail::BlockLoop;

}  // namespace dynexec

