// torch.classes.dynexec.BlockLoop: the CPU executor, for programs whose branches and
// projection shortcuts are OneDnnChains. One entry point, forward(input, routing?), runs
// the optional stem, the blocks under a given routing or the loop's router (BlockDrop's
// policy network, SkipNet's recurrent gate, or none), and the optional head, shard by
// shard — no Python and no thread fork/join between the parts.
//
// It computes what the portable Python loop (dynexec/runtime/executors/python_loop.py)
// computes — per block: the branch on the routed rows, residual add and ReLU (with the
// pooled means for the gate), one step of the recurrent gate — but without the ~6
// Python-level calls per block, which on 2 CPU cores cost as much as the arithmetic of a
// block on a small sub-batch, and without their gather and scatter: the routed rows are kept in front of
// the activations (RowOrder) and the branch's last convolution adds its output to them in
// place. The kernels are the same (OneDnnChain's convolutions, the regrouping ops' CPU
// ReLU and pooling kernels, recurrent_gate_step's CPU kernel with its LSTM weights
// prepared once), so the results are identical to the Python loop's; tests/test_engine.py
// compares both, and both with the reference model.
//
// Branch intermediates live in a per-shard Workspace reused by every block of the forward.
// Batch shards: by default the batch is split into one shard per intra-op thread (more
// for batches of more than 32 rows per thread) and the shards run side by side, each
// through the whole loop with single-threaded kernels (set_shards; see sharded()).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../ops/cpu/gate_cpu.h"
#include "../ops/cpu/head_cpu.h"
#include "../ops/cpu/regroup_cpu.h"
#include "../ops/cpu/work_sharing.h"
#include "../convolution/chain.h"
#include "native_ops.h"
#include "workspace.h"

namespace dynexec {
namespace loop_detail {

// A shard's rows in the loop's own order. The loop keeps each block's routed rows in
// front, rows [0, active), so that the branch reads them and its last convolution adds
// its output to them where they are: no gather before a routed branch, no scatter after
// it. Consecutive blocks route mostly the same samples (SkipNet-110, BlockDrop R110 with
// calibrated routing: ~0.12 rows change sides per routed row), so bringing the next
// block's routed rows to the front swaps a few rows in place, where a gather and a
// scatter would move every routed row twice. The loop puts the rows back in sample order
// once, after the last block.
struct RowSpan {  // a per-row array that moves with the rows: row j at data + j * row_len
  float* data;
  int64_t row_len;
};

inline RowSpan rows_of(const at::Tensor& t) {  // t: float32, dense rows
  return RowSpan{t.data_ptr<float>(), t.numel() / std::max<int64_t>(1, t.size(0))};
}

class RowOrder {
 public:
  explicit RowOrder(int64_t n) : sample_(static_cast<size_t>(n)) {
    std::iota(sample_.begin(), sample_.end(), int64_t{0});
  }

  // The sample (row of the shard's input) now in row j.
  int64_t sample(int64_t j) const { return sample_[j]; }

  // Moves the rows whose route[sample * stride] is true to the front of every array in
  // `arrays` (all in this order), each routed row behind the front trading places with a
  // skipped row in it; returns the number of routed rows.
  int64_t routed_to_front(const bool* route, int64_t stride, std::initializer_list<RowSpan> arrays) {
    const int64_t n = static_cast<int64_t>(sample_.size());
    auto routed = [&](int64_t j) { return route[sample_[j] * stride]; };
    int64_t total = 0;
    for (int64_t j = 0; j < n; ++j) total += routed(j);
    int64_t behind = total;  // the next row behind the front that may be routed
    for (int64_t j = 0; j < total; ++j) {
      if (routed(j)) continue;
      while (!routed(behind)) ++behind;  // as many routed rows behind the front as skipped rows in it
      for (const RowSpan& a : arrays) {
        std::swap_ranges(a.data + j * a.row_len, a.data + (j + 1) * a.row_len, a.data + behind * a.row_len);
      }
      std::swap(sample_[j], sample_[behind]);
      ++behind;
      moved_ = true;
    }
    return total;
  }

  // x (NHWC-dense, one row per sample) with its rows in sample order: x itself when no
  // row has moved.
  at::Tensor in_sample_order(const at::Tensor& x) const {
    if (!moved_) return x;
    const int64_t n = x.size(0), row = rows_of(x).row_len;
    std::vector<int64_t> row_of(sample_.size());
    for (size_t j = 0; j < sample_.size(); ++j) row_of[sample_[j]] = static_cast<int64_t>(j);
    at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    cpu::gather_rows_f32(x.const_data_ptr<float>(), row, row_of.data(), n, row, out.data_ptr<float>());
    return out;
  }

 private:
  std::vector<int64_t> sample_;
  bool moved_ = false;
};

struct Block {
  c10::intrusive_ptr<OneDnnChain> branch;
  c10::intrusive_ptr<OneDnnChain> projection;  // shortcut: projection, else
  int64_t downsample_channels = 0;             // DownsampleB to this many channels, else identity
  bool identity() const { return !projection && downsample_channels == 0; }
};

struct RecurrentGate {  // SkipNet's recurrent gate (see recurrent_gate_step)
  cpu::PreparedGate lstm;
  std::vector<at::Tensor> embed_w, embed_b;  // the gate after block k: [C_k, E], [E]
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
    TORCH_CHECK(embed_w.size() == blocks_.size() && embed_b.size() == blocks_.size(),
                "BlockLoop.set_recurrent_gate: expected one embedding per block (", blocks_.size(), "), got ",
                embed_w.size(), " weights and ", embed_b.size(), " biases");
    cpu::PreparedGate lstm(w_ih, w_hh, b_ih, b_hh, proj_w, proj_b);
    for (size_t k = 0; k < embed_w.size(); ++k) {
      const at::Tensor& w = embed_w[k];
      const at::Tensor& b = embed_b[k];
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.device().is_cpu() && w.dim() == 2 && w.size(1) == lstm.embed() &&
                      b.scalar_type() == at::kFloat && b.device().is_cpu() && b.sizes().equals({lstm.embed()}),
                  "BlockLoop.set_recurrent_gate: expected embedding ", k, " as float32 CPU [C, ", lstm.embed(),
                  "] and [", lstm.embed(), "], got ", w.scalar_type(), " ", w.sizes(), " and ", b.scalar_type(), " ",
                  b.sizes());
      embed_w[k] = w.contiguous();
      embed_b[k] = b.contiguous();
    }
    gate_ = RecurrentGate{std::move(lstm), std::move(embed_w), std::move(embed_b)};
  }

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // The network's stem: a OneDnnChain ending in a ReLU (the engine's folded stem).
  void set_stem(c10::intrusive_ptr<OneDnnChain> stem) { stem_ = std::move(stem); }

  // The network's head: global average pooling over a pool x pool map, then
  // weight [K, C] and bias [K] (then a sigmoid when `sigmoid`: a policy's probabilities).
  void set_head(const at::Tensor& weight, const at::Tensor& bias, int64_t pool, bool sigmoid) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() && weight.dim() == 2 &&
                    bias.scalar_type() == at::kFloat && bias.device().is_cpu() &&
                    bias.sizes().equals({weight.size(0)}) && pool > 0,
                "BlockLoop.set_head: expected a float32 CPU weight [K, C], bias [K] and pool > 0, got ",
                weight.scalar_type(), " ", weight.sizes(), ", ", bias.scalar_type(), " ", bias.sizes(), " and pool ",
                pool);
    head_ = Head{weight.contiguous(), bias.contiguous(), pool, sigmoid};
  }

  // The network's router when it is BlockDrop's policy: `policy`, a BlockLoop with a stem
  // and a sigmoid head giving one probability per block of this loop, runs with every
  // block on the input, and the decision rule turns its probabilities into the routing.
  void set_policy(c10::intrusive_ptr<BlockLoop> policy) {
    TORCH_CHECK(policy && policy->stem_ && policy->head_ && policy->head_->weight.size(0) == num_blocks() &&
                    !policy->policy_ && !policy->gate_,
                "BlockLoop.set_policy: expected a loop without a router, with a stem and a head giving ", num_blocks(),
                " probabilities, got ",
                !policy                            ? std::string("none")
                : policy->policy_ || policy->gate_ ? std::string("a loop with a router of its own")
                : policy->stem_ && policy->head_   ? std::to_string(policy->head_->weight.size(0)) + " probabilities"
                                                   : std::string("a loop without a stem or head"));
    policy_ = std::move(policy);
  }

  // The model's decision rule: a block runs for a sample iff its probability p >= threshold
  // (at_threshold) or p > threshold; NaN never runs it.
  void set_decision_rule(double threshold, bool at_threshold) {
    rule_ = DecisionRule{static_cast<float>(threshold), at_threshold};
  }

  bool has_stem() const { return static_cast<bool>(stem_); }
  bool has_head() const { return head_.has_value(); }
  bool has_policy() const { return static_cast<bool>(policy_); }
  bool has_recurrent_gate() const { return gate_.has_value(); }

  // The whole forward, one call: input [N, C, H, W] -> (output, routing [N, K] bool).
  // The input is the image when a stem is set (else the stem's output), the output the
  // logits when a head is set (else the last block's output). The routing is `routing`
  // when given, else the router's: the policy (set_policy), the recurrent gate
  // (set_recurrent_gate: block 0 always runs, block k + 1 by the gate after block k), or
  // none (every block runs). Each batch shard runs all of it on its rows, so no shard
  // waits for another between the parts.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const std::optional<at::Tensor>& routing_) {
    check_input(input);
    const int64_t n = input.size(0), num = num_blocks();
    TORCH_CHECK(routing_ || !(policy_ || gate_) || rule_,
                "BlockLoop.forward: the loop has a router but no decision rule (set_decision_rule)");
    at::Tensor routing;
    if (routing_) {
      routing = checked_routing(*routing_, n, "forward");
    } else if (!policy_ && !gate_) {
      routing = at::ones({n, num}, input.options().dtype(at::kBool));
    }
    auto [out, decided] = sharded(input, [&](const at::Tensor& xs, int64_t lo) {
      at::Tensor h = stem_ ? stem(xs) : xs;
      at::Tensor r;
      if (routing.defined()) {
        h = planned_rows(h, routing.narrow(0, lo, xs.size(0)));
      } else if (policy_) {
        r = rule_->apply(policy_->dense_rows(xs));
        h = planned_rows(h, r);
      } else {
        std::tie(h, r) = recurrent_rows(h);
      }
      return std::make_tuple(head_ ? head(h) : h, r);
    });
    // (a given routing is returned as a copy: the caller's tensor is never aliased)
    return {out, !routing.defined() ? decided : routing_ ? routing.clone() : routing};
  }

  // The number of batch shards: 0 (the default) = one per intra-op thread (with ATen's
  // OpenMP backend, else 1), times ceil(rows / (threads * 32)) (see default_shards),
  // 1 = no sharding, k = k shards (at most one per sample).
  void set_shards(int64_t shards) {
    TORCH_CHECK(shards >= 0, "BlockLoop.set_shards: expected shards >= 0 (0: one per intra-op thread), got ",
                shards);
    shards_ = shards;
  }

  int64_t shards() const { return shards_; }

  // Whether a shard's thread that has run out of shards takes chunks of the Winograd
  // convolutions the other threads are still running (default true; see sharded()).
  // Results are the same either way.
  void set_work_sharing(bool on) { work_sharing_ = on; }
  bool work_sharing() const { return work_sharing_; }

  // The number of shards a call on n rows makes here and now (the intra-op thread count
  // is read at call time).
  int64_t shards_for(int64_t n) const {
    TORCH_CHECK(n >= 0, "BlockLoop.shards_for: expected n >= 0 rows, got ", n);
#if AT_PARALLEL_OPENMP
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#else
    const int64_t threads = 1;  // oneDNN's OpenMP threads inside another pool's workers would oversubscribe
#endif
    return std::max<int64_t>(1, std::min<int64_t>(n, shards_ == 0 ? default_shards(n, threads) : shards_));
  }

 private:
  struct Head {
    at::Tensor weight, bias;  // [K, C], [K]
    int64_t pool;
    bool sigmoid;
  };

  struct DecisionRule {
    float threshold;
    bool at_threshold;
    at::Tensor apply(const at::Tensor& p) const { return at_threshold ? p.ge(threshold) : p.gt(threshold); }
    bool runs(float p) const { return at_threshold ? p >= threshold : p > threshold; }
  };

  // This loop (no router; stem and head set) on the rows xs with every block: the
  // policy's probabilities.
  at::Tensor dense_rows(const at::Tensor& xs) {
    const at::Tensor every = at::ones({xs.size(0), num_blocks()}, xs.options().dtype(at::kBool));
    return head(planned_rows(stem(xs), every));
  }

  static void check_input(const at::Tensor& input) {
    TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu() && input.dim() == 4,
                "BlockLoop: expected a float32 CPU input [N, C, H, W], got ", input.scalar_type(), " on ",
                input.device(), " with shape ", input.sizes());
  }

  at::Tensor checked_routing(const at::Tensor& routing, int64_t n, const char* method) const {
    const int64_t num = num_blocks();
    TORCH_CHECK(routing.scalar_type() == at::kBool && routing.dim() == 2 && routing.size(0) == n &&
                    routing.size(1) == num,
                "BlockLoop.", method, ": expected a bool routing [", n, ", ", num, "], got ", routing.scalar_type(),
                " with shape ", routing.sizes());
    return routing.cpu().contiguous();
  }

  // The stem's output on input rows x (NHWC-dense, as the blocks read it).
  at::Tensor stem(const at::Tensor& x) const {
    return stem_->forward(x).contiguous(at::MemoryFormat::ChannelsLast);
  }

  // The head on the last block's output h (NHWC-dense) -> [n, K].
  at::Tensor head(const at::Tensor& h_) const {
    const Head& hd = *head_;
    const at::Tensor h = h_.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t n = h.size(0), C = h.size(1), K = hd.weight.size(0);
    TORCH_CHECK(C == hd.weight.size(1) && h.size(2) == hd.pool && h.size(3) == hd.pool,
                "BlockLoop: the head pools a ", hd.pool, "x", hd.pool, " map of ", hd.weight.size(1),
                " channels, but the last block gives ", h.sizes());
    at::Tensor out = at::empty({n, K}, h.options().memory_format(at::MemoryFormat::Contiguous));
    cpu::pooled_linear_nhwc_f32(h.const_data_ptr<float>(), n, hd.pool * hd.pool, C,
                                hd.weight.const_data_ptr<float>(), hd.bias.const_data_ptr<float>(), K, hd.sigmoid,
                                out.data_ptr<float>());
    return out;
  }

  // The default shard count for n rows and `threads` threads: one shard per thread, or a
  // multiple of the threads when a shard would get more than kShardRows rows. Larger
  // shards run slower per row: a CIFAR ResNet's first-stage activations are 64 KB per
  // row, and past ~32 rows a shard's working set no longer fits a core's cache. Measured
  // side by side (2 threads, SkipNet-110 / BlockDrop R110): 4 shards of 32 rows instead
  // of 2 of 64 at batch 128 took 5-9 % less time, dense and routed; at batch 64, 4 shards
  // of 16 instead of 2 of 32 changed nothing.
  static constexpr int64_t kShardRows = 32;
  static int64_t default_shards(int64_t n, int64_t threads) {
    const int64_t per_round = threads * kShardRows;
    return threads * std::max<int64_t>(1, (n + per_round - 1) / per_round);
  }

  // Runs f(shard of h, its first row) -> (output, routing or undefined) on each shard of
  // consecutive rows and concatenates the results. With more than one shard, the shards
  // run side by side, one per intra-op thread; inside a shard every kernel runs on its
  // thread alone (a nested parallel region runs inline, oneDNN's included). A sample's
  // path through the network never depends on the other samples, so the results are
  // the same; what changes is the cost of the many small steps of a routed block on a
  // sub-batch of a few samples: one thread's work each instead of a fork and a join of
  // every thread per convolution, gather, ReLU, scatter and gate step. Measured on 2
  // cores: SkipNet-110 ~15 % faster at batch 8, ~6 % at 32.
  template <typename F>
  std::pair<at::Tensor, at::Tensor> sharded(const at::Tensor& input, const F& f) const {
    check_input(input);
    // NHWC-dense, as every kernel of the loop reads it (a no-op for the stem's output)
    const at::Tensor h = input.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t n = h.size(0);
    const int64_t shards = shards_for(n);
    if (shards <= 1) {
      auto [out, routing] = f(h, 0);
      return {out, routing};
    }
    std::vector<at::Tensor> outs(shards), routings(shards);
    const at::ThreadLocalState caller;  // inference mode, profiler, ... for the workers
    // With more shards than threads, each thread claims the next unstarted shard when it
    // is done with one, so a thread that was slowed (or descheduled) takes fewer shards.
    // A thread with no shard left then takes chunks of the others' Winograd convolutions
    // (cpu::HelpDesk) instead of waiting for them at the end.
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(shards, at::in_parallel_region() ? 1 : at::get_num_threads());
    std::optional<cpu::HelpDesk> desk;
    if (work_sharing_) desk.emplace(workers);
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(caller);
      for (int64_t worker = begin; worker < end; ++worker) {  // one per thread, unless threads are short
        std::optional<cpu::WorkerScope> scope;
        if (desk) scope.emplace(*desk);
        for (int64_t s = next++; s < shards; s = next++) {
          const int64_t lo = s * n / shards, hi = (s + 1) * n / shards;
          std::tie(outs[s], routings[s]) = f(h.narrow(0, lo, hi - lo), lo);
        }
        if (scope && worker + 1 == end) scope->finish_and_help();
      }
    });
    at::Tensor out = at::cat(outs, 0);
    if (out.dim() == 4) out = out.contiguous(at::MemoryFormat::ChannelsLast);
    return {out, routings[0].defined() ? at::cat(routings, 0) : at::Tensor()};
  }

  at::Tensor planned_rows(at::Tensor h, const at::Tensor& routing) {
    const int64_t n = h.size(0), num = num_blocks();
    RowOrder order(n);
    at::Tensor no_pool;
    Workspace ws;
    for (int64_t k = 0; k < num; ++k) {
      const int64_t active = order.routed_to_front(routing.const_data_ptr<bool>() + k, num, {rows_of(h)});
      h = run_block(blocks_[k], h, active, no_pool, /*pool=*/false, ws);
    }
    return order.in_sample_order(h);
  }

  std::tuple<at::Tensor, at::Tensor> recurrent_rows(at::Tensor h) {
    const int64_t n = h.size(0), num = num_blocks();
    const RecurrentGate& g = *gate_;
    at::Tensor routing = at::ones({n, num}, h.options().dtype(at::kBool));
    const at::TensorOptions plain = h.options().memory_format(at::MemoryFormat::Contiguous);
    // The gate's state and the pooled means are per row: they move with h's rows.
    at::Tensor hx = at::zeros({n, g.lstm.hidden()}, plain), cx = at::zeros({n, g.lstm.hidden()}, plain);
    at::Tensor p = at::empty({n}, plain);
    RowOrder order(n);
    at::Tensor pooled;  // the current h's spatial means [N, C] (undefined before block 0)
    int64_t active = n;
    bool* route = routing.data_ptr<bool>();
    Workspace ws;
    for (int64_t k = 0; k < num; ++k) {
      h = run_block(blocks_[k], h, active, pooled, /*pool=*/k + 1 < num, ws);
      if (k + 1 == num) break;
      g.lstm.step(pooled, g.embed_w[k], g.embed_b[k], hx, cx, p);
      const float* prob = p.const_data_ptr<float>();
      for (int64_t j = 0; j < n; ++j) route[order.sample(j) * num + k + 1] = rule_->runs(prob[j]);
      active = order.routed_to_front(route + k + 1, num, {rows_of(h), rows_of(pooled), rows_of(hx), rows_of(cx)});
    }
    return {order.in_sample_order(h), routing};
  }

  // A projection or DownsampleB shortcut's output (identity blocks update h in place:
  // the engine owns it).
  at::Tensor shortcut(const Block& b, const at::Tensor& h) const {
    if (b.projection) return b.projection->forward(h);
    return native::downsample_b(h, b.downsample_channels);
  }

  // Block b on rows [0, active) of h (NHWC-dense); the other rows skip it. With `pool`,
  // pooled becomes the output's spatial means (the next gate's input). The branch's
  // intermediates live in ws; its last convolution adds its output to the routed rows of
  // the residual in its epilogue (oneDNN's sum post-op: the same sums as the Python
  // loop's relu(h + y), bit for bit).
  at::Tensor run_block(const Block& b, const at::Tensor& h, int64_t active, at::Tensor& pooled, bool pool,
                       Workspace& ws) {
    const onednn::Nhwc expected = b.branch->checked_output(onednn::nhwc_of(h));
    onednn::Nhwc routed = onednn::nhwc_of(h);
    routed.n = active;
    if (b.identity()) {
      check_output(h, expected);
      // Rows the block skips keep their values, and their cached means (block 0 has none).
      const bool pool_rows = pool && pooled.defined();
      float* hp = h.data_ptr<float>();
      if (active > 0) {
        // The ReLU and the pooling's sums in the last convolution's pass when it is the
        // Winograd kernel's (the Python loop's OneDnnChain pools in the same order), else
        // with the pooling in one pass of its own.
        const bool relu_in_conv = !pool_rows || b.branch->fuses_relu();
        const int64_t C = h.size(1), H = h.size(2), W = h.size(3);
        float* group_sums = pool_rows && relu_in_conv
                                ? ws.get(Workspace::kGroupSums, active * cpu::winograd_tile_groups(H, W) * C)
                                : nullptr;
        b.branch->add_into(routed, hp, ws, /*relu=*/relu_in_conv, group_sums);
        if (group_sums) {
          cpu::winograd_group_means(group_sums, active, H, W, C, pooled.data_ptr<float>());
        } else if (pool_rows) {
          cpu::relu_pool_nhwc_f32(hp, active, C, H * W, pooled.data_ptr<float>());
        }
      }
      if (pool && !pool_rows) pooled = h.mean({2, 3}).contiguous();
      return h;
    }
    at::Tensor out = shortcut(b, h).contiguous(at::MemoryFormat::ChannelsLast);
    check_output(out, expected);
    if (active > 0) {  // skipped rows keep the shortcut's output
      b.branch->add_into(routed, out.data_ptr<float>(), ws, /*relu=*/true);
    }
    if (pool) pooled = out.mean({2, 3}).contiguous();
    return out;
  }

  static void check_output(const at::Tensor& out, const onednn::Nhwc& branch) {
    TORCH_CHECK(out.size(1) == branch.c && out.size(2) == branch.h && out.size(3) == branch.w,
                "BlockLoop: a block's shortcut gives ", out.sizes(), " but its branch [", branch.n, ", ", branch.c,
                ", ", branch.h, ", ", branch.w, "]");
  }

  std::vector<Block> blocks_;
  std::optional<RecurrentGate> gate_;
  c10::intrusive_ptr<OneDnnChain> stem_;
  std::optional<Head> head_;
  c10::intrusive_ptr<BlockLoop> policy_;
  std::optional<DecisionRule> rule_;
  int64_t shards_ = 0;
  bool work_sharing_ = true;
};

}  // namespace loop_detail

using loop_detail::BlockLoop;

}  // namespace dynexec

