// torch.classes.dynexec.RecurrentBlocks: the block loop of a SkipNet with the recurrent
// gate, in C++, for programs whose branches and projection shortcuts are OneDnnChains.
//
// It runs exactly the steps of the Python engine's online loop (dynexec/engine.py) —
// per block: the rows the previous gate routed (partition), the branch on them or on
// the whole batch, the fused scatter that also pools, then one recurrent_gate_step —
// but without ~6 Python-level calls per block, which on 2 CPU cores cost as much as the
// arithmetic of a block on a small sub-batch. The kernels are the same (the native ops
// through the dispatcher, OneDnnChain's convolutions), so results are identical to the
// Python loop's; tests/test_engine.py compares both with the reference model.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "chain.h"

namespace dynexec {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_gate_step(
    const at::Tensor& pooled, const at::Tensor& embed_w, const at::Tensor& embed_b, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& proj_w,
    const at::Tensor& proj_b, const at::Tensor& hx, const at::Tensor& cx) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dynexec::recurrent_gate_step", "").typed<Sig>();
  return op.call(pooled, embed_w, embed_b, w_ih, w_hh, b_ih, b_hh, proj_w, proj_b, hx, cx);
}

struct Block {
  c10::intrusive_ptr<OneDnnChain> branch;
  c10::intrusive_ptr<OneDnnChain> projection;  // null: identity shortcut
  at::Tensor embed_w, embed_b;                 // the gate after this block
};

class RecurrentBlocks : public torch::CustomClassHolder {
 public:
  // The LSTM cell and projection shared by all gates (see recurrent_gate_step).
  RecurrentBlocks(at::Tensor w_ih, at::Tensor w_hh, at::Tensor b_ih, at::Tensor b_hh, at::Tensor proj_w,
                  at::Tensor proj_b)
      : w_ih_(std::move(w_ih)), w_hh_(std::move(w_hh)), b_ih_(std::move(b_ih)), b_hh_(std::move(b_hh)),
        proj_w_(std::move(proj_w)), proj_b_(std::move(proj_b)) {
    TORCH_CHECK(w_hh_.dim() == 2, "RecurrentBlocks: expected w_hh [4 * hidden, hidden], got shape ",
                w_hh_.sizes());
  }

  // Appends a block: its branch, its projection shortcut (None: identity) and the
  // embedding of the gate that follows it (unused after the last block).
  void add_block(c10::intrusive_ptr<OneDnnChain> branch, std::optional<c10::intrusive_ptr<OneDnnChain>> projection,
                 at::Tensor embed_w, at::Tensor embed_b) {
    blocks_.push_back(Block{std::move(branch), projection ? *projection : nullptr, std::move(embed_w),
                            std::move(embed_b)});
  }

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // h: the stem output [N, C, H, W]. Returns (the last block's output, routing [N, K] bool);
  // block 0 always runs, block k + 1 iff the gate after block k gives p > 0.5.
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor h) {
    const int64_t n = h.size(0), num = num_blocks();
    TORCH_CHECK(num > 0, "RecurrentBlocks.run: no blocks were added");
    at::Tensor routing = at::ones({n, num}, h.options().dtype(at::kBool));
    at::Tensor hx = at::zeros({n, w_hh_.size(1)}, h.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor cx = hx.clone();
    at::Tensor idx = at::empty({n}, h.options().dtype(at::kLong));
    at::Tensor pooled;  // the current h's spatial means [N, C] (undefined before block 0)
    int64_t active = n;
    bool* route = routing.data_ptr<bool>();
    for (int64_t k = 0; k < num; ++k) {
      const Block& b = blocks_[k];
      h = run_block(b, h, idx, active, pooled, /*pool=*/k + 1 < num);
      if (k + 1 == num) break;
      at::Tensor p;
      std::tie(p, hx, cx) = recurrent_gate_step(pooled, b.embed_w, b.embed_b, w_ih_, w_hh_, b_ih_, b_hh_,
                                                proj_w_, proj_b_, hx, cx);
      active = decide(p, idx, route, k + 1, num);
    }
    return {h, routing};
  }

 private:
  // Block b on the `active` rows idx[:active] of h; with `pool`, pooled becomes the
  // output's means (the next gate's input).
  at::Tensor run_block(const Block& b, at::Tensor h, const at::Tensor& idx, int64_t active, at::Tensor& pooled,
                       bool pool) {
    const int64_t n = h.size(0);
    if (b.projection || !pooled.defined() || !pool) {  // (the first block has no cached means)
      at::Tensor out = b.projection ? b.projection->forward(h) : h;
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

  // route[:, column] = p > 0.5 (NaN: false) and idx = that partition (routed rows first,
  // both parts in increasing order); returns the number of routed rows.
  static int64_t decide(const at::Tensor& prob, at::Tensor& idx, bool* route, int64_t column, int64_t num) {
    TORCH_CHECK(prob.scalar_type() == at::kFloat, "RecurrentBlocks: expected float32 gate probabilities, got ",
                prob.scalar_type());
    const at::Tensor p = prob.reshape({-1}).contiguous();
    const float* pp = p.const_data_ptr<float>();
    const int64_t n = p.numel();
    int64_t* ip = idx.data_ptr<int64_t>();
    int64_t active = 0;
    for (int64_t i = 0; i < n; ++i) active += pp[i] > 0.5f;
    int64_t routed = 0, skipped = active;
    for (int64_t i = 0; i < n; ++i) {
      const bool run = pp[i] > 0.5f;
      route[i * num + column] = run;
      ip[run ? routed++ : skipped++] = i;
    }
    return active;
  }

  at::Tensor w_ih_, w_hh_, b_ih_, b_hh_, proj_w_, proj_b_;
  std::vector<Block> blocks_;
};

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_FRAGMENT(dynexec, m) {
  using dynexec::RecurrentBlocks;
  m.class_<RecurrentBlocks>("RecurrentBlocks")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_block", &RecurrentBlocks::add_block)
      .def("num_blocks", &RecurrentBlocks::num_blocks)
      .def("run", &RecurrentBlocks::run);
}
