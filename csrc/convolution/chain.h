// torch.classes.dynexec.OneDnnChain: a residual branch (or a stem, or a projection
// shortcut) as a chain of packed oneDNN convolutions, ReLU after every convolution but
// the last, and the engine's per-block steps around it in one call each:
//
//   forward(x)                                  chain(x)
//   add_(x, residual)                           residual += chain(x)
//   add_relu_(x, residual)                      residual = relu(residual + chain(x))
//   add_relu_pool_(x, residual, pooled)         ... and pooled = its spatial mean
//   rows_add_relu_(x, idx, count, out)          the routed step: gather x[idx[:count]],
//                                               chain, scatter relu(out[idx] + y) into out
//   rows_add_relu_pool_(x, idx, count, out, pooled)   ... and pooled[idx] = row means
//
// A routed block otherwise costs ~5 Python-level op calls (~5 us each) around two
// convolutions of a few samples; here it is one. The regrouping steps are the native
// ops (torch.ops.dynexec.*, called through the dispatcher), so they keep their checks.
// ReLUs are torch's (NaN propagates); oneDNN's fused ReLU would map NaN to 0.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "../ops/cpu/regroup_cpu.h"
#include "../ops/cpu/winograd_cpu.h"
#include "../executor/native_ops.h"
#include "packed_conv.h"
#include "../executor/workspace.h"

namespace dynexec {


class OneDnnChain : public torch::CustomClassHolder {
 public:
  // Convolution i: weights[i] [OC, IC, KH, KW], biases[i] [OC] (float32, CPU), strides[i],
  // paddings[i]. relu_last: forward() also applies a ReLU after the last convolution
  // (a stem); the add methods need relu_last == false.
  OneDnnChain(std::vector<at::Tensor> weights, std::vector<at::Tensor> biases, std::vector<int64_t> strides,
              std::vector<int64_t> paddings, bool relu_last)
      : relu_last_(relu_last) {
    const size_t n = weights.size();
    TORCH_CHECK(n > 0 && biases.size() == n && strides.size() == n && paddings.size() == n,
                "OneDnnChain: expected one weight, bias, stride and padding per convolution (at least "
                "one), got ", n, " weights, ", biases.size(), " biases, ", strides.size(), " strides, ",
                paddings.size(), " paddings");
    for (size_t i = 0; i < n; ++i) {
      convs_.push_back(std::make_unique<onednn::PackedConv>(weights[i], biases[i], strides[i], paddings[i],
                                                            "OneDnnChain conv " + std::to_string(i)));
      TORCH_CHECK(i == 0 || convs_[i]->in_channels() == convs_[i - 1]->out_channels(),
                  "OneDnnChain: conv ", i, " expects ", convs_[i]->in_channels(),
                  " input channels but conv ", i - 1, " outputs ", convs_[i - 1]->out_channels());
    }
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = all_but_last(x);
    y = convs_.back()->forward(y);
    return relu_last_ ? y.relu_() : y;
  }

  at::Tensor add_(const at::Tensor& x, at::Tensor residual) {
    check_no_relu_last("add_");
    convs_.back()->add_(all_but_last(x), residual);
    return residual;
  }

  at::Tensor add_relu_(const at::Tensor& x, at::Tensor residual) {
    return add_(x, residual).relu_();
  }

  at::Tensor add_relu_pool_(const at::Tensor& x, at::Tensor residual, const at::Tensor& pooled) {
    if (pools_in_conv(residual, pooled, residual.size(0))) {
      add_relu_pool_in_conv(all_but_last(x), residual, pooled, nullptr);
      return residual;
    }
    add_(x, residual);
    native::relu_pool_(residual, pooled);
    return residual;
  }

  at::Tensor rows_add_relu_(const at::Tensor& x, const at::Tensor& idx, int64_t count, at::Tensor out) {
    check_no_relu_last("rows_add_relu_");
    if (count == 0) return out;
    native::scatter_residual_relu_(out, forward(native::gather_rows(x, idx, count)), idx, count);
    return out;
  }

  at::Tensor rows_add_relu_pool_(const at::Tensor& x, const at::Tensor& idx, int64_t count, at::Tensor out,
                                 const at::Tensor& pooled) {
    check_no_relu_last("rows_add_relu_pool_");
    if (count > 0 && pools_in_conv(out, pooled, out.size(0))) {
      // the routed rows of out, updated and pooled in the convolution's pass, then put back
      const at::Tensor rows_idx = idx.narrow(0, 0, count);
      at::Tensor rows = native::gather_rows(out, rows_idx, count);  // (checks idx against out)
      const at::Tensor ip = rows_idx.contiguous();
      cpu::check_rows_distinct("OneDnnChain.rows_add_relu_pool_", ip.const_data_ptr<int64_t>(), count,
                               out.size(0));
      add_relu_pool_in_conv(all_but_last(native::gather_rows(x, idx, count)), rows, pooled,
                            ip.const_data_ptr<int64_t>());
      out.index_copy_(0, ip, rows);
      return out;
    }
    native::scatter_residual_relu_pool_(out, forward(native::gather_rows(x, idx, count)), idx, count, pooled);
    return out;
  }

  int64_t num_convs() const { return static_cast<int64_t>(convs_.size()); }

  // Moves the eligible convolutions (3x3, stride 1, padding 1, channels multiples of 8 in
  // and 16 out, AVX2 + FMA) onto the Winograd F(2x2, 3x3) kernel (PackedConv::enable_winograd);
  // returns how many now run there. For compile time, before the chain is shared.
  int64_t enable_winograd() {
    for (auto& conv : convs_) conv->enable_winograd();
    return winograd_convs();
  }

  int64_t winograd_convs() const {
    return std::count_if(convs_.begin(), convs_.end(), [](const auto& c) { return c->uses_winograd(); });
  }

  // Whether add_into's ReLU rides in the last convolution's own output pass (the Winograd
  // kernel's) rather than costing a pass of its own (after a oneDNN primitive).
  bool fuses_relu() const { return convs_.back()->uses_winograd(); }

  // ---- For BlockLoop: NHWC-dense float32 activations, intermediates in a Workspace, no
  // per-call checks or allocations (BlockLoop validated its inputs once).

  // The chain's output shape for x (data null), checking every convolution's input:
  // BlockLoop checks each block once per call instead of each convolution.
  onednn::Nhwc checked_output(onednn::Nhwc x) const {
    for (const auto& conv : convs_) {
      conv->check_input(x);
      x = conv->output_of(x, nullptr);
    }
    return x;
  }

  // residual += chain(x) (residual: x's output shape), the add being the last
  // convolution's sum post-op; then residual = relu(residual) when relu.
  // With group_sums (fuses_relu() chains only), also the last convolution's tile-group
  // sums of the result, for cpu::winograd_group_means.
  void add_into(const onednn::Nhwc& x, float* residual, Workspace& ws, bool relu = false,
                float* group_sums = nullptr) {
    onednn::Nhwc y = x;
    for (size_t i = 0; i + 1 < convs_.size(); ++i) y = conv_into(i, y, ws);
    if (y.data == residual) {  // a one-convolution branch on its own residual: read a copy
      float* copy = ws.get(Workspace::kFirst, y.numel());
      std::copy(y.data, y.data + y.numel(), copy);
      y.data = copy;
    }
    convs_.back()->run(y, residual, /*sum=*/true, relu, group_sums);
  }

 private:
  // Whether the pooled steps run in the last convolution's pass: a Winograd convolution,
  // an NHWC-dense float32 residual and a contiguous float32 pooled [rows, channels] (else
  // the separate pooling kernels, which check and report what they were given).
  bool pools_in_conv(const at::Tensor& residual, const at::Tensor& pooled, int64_t rows) const {
    return fuses_relu() && residual.device().is_cpu() && residual.scalar_type() == at::kFloat &&
           residual.dim() == 4 && residual.is_contiguous(at::MemoryFormat::ChannelsLast) &&
           pooled.device().is_cpu() && pooled.scalar_type() == at::kFloat && pooled.dim() == 2 &&
           pooled.is_contiguous() && pooled.size(0) == rows && pooled.size(1) == residual.size(1);
  }

  // residual = relu(residual + last_conv(y)) and pooled[rows ? rows[r] : r] = the means of
  // its rows r, the sums taken in the Winograd kernel's output pass (the same order as
  // BlockLoop's identity blocks, so both loops pool bit-identically).
  void add_relu_pool_in_conv(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& pooled,
                             const int64_t* rows) {
    onednn::PackedConv& last = *convs_.back();
    const at::Tensor yin = y.contiguous(at::MemoryFormat::ChannelsLast);
    const onednn::Nhwc in = onednn::nhwc_of(yin);
    last.check_input(in);
    const onednn::Nhwc expected = last.output_of(in, nullptr);
    TORCH_CHECK(residual.size(0) == expected.n && residual.size(1) == expected.c &&
                    residual.size(2) == expected.h && residual.size(3) == expected.w,
                "OneDnnChain: expected a residual [", expected.n, ", ", expected.c, ", ", expected.h, ", ",
                expected.w, "], got ", residual.sizes());
    at::assert_no_internal_overlap(residual);
    at::assert_no_overlap(residual, yin);
    if (expected.n == 0) return;
    at::Tensor sums = at::empty({expected.n * cpu::winograd_tile_groups(expected.h, expected.w) * expected.c},
                                residual.options().memory_format(at::MemoryFormat::Contiguous));
    last.run(in, residual.data_ptr<float>(), /*sum=*/true, /*relu=*/true, sums.data_ptr<float>());
    cpu::winograd_group_means(sums.const_data_ptr<float>(), expected.n, expected.h, expected.w, expected.c,
                              pooled.data_ptr<float>(), rows);
  }

  // Convolution i of the chain on x into slot kFirst / kSecond (alternating, so never
  // x's own), followed by a ReLU unless it is the last one.
  onednn::Nhwc conv_into(size_t i, const onednn::Nhwc& x, Workspace& ws) {
    onednn::PackedConv& conv = *convs_[i];
    onednn::Nhwc y = conv.output_of(x, nullptr);
    y.data = ws.get(i % 2 == 0 ? Workspace::kFirst : Workspace::kSecond, y.numel());
    conv.run(x, y.data, /*sum=*/false, /*relu=*/i + 1 < convs_.size());
    return y;
  }

  at::Tensor all_but_last(const at::Tensor& x) {
    at::Tensor y = x;
    for (size_t i = 0; i + 1 < convs_.size(); ++i) y = convs_[i]->forward(y).relu_();
    return y;
  }

  void check_no_relu_last(const char* method) const {
    TORCH_CHECK(!relu_last_, "OneDnnChain.", method, ": this chain ends in a ReLU (a stem); the add "
                "methods are for residual branches");
  }

  std::vector<std::unique_ptr<onednn::PackedConv>> convs_;
  bool relu_last_;
};

}  // namespace dynexec

