// A CPU float32 convolution (folded BatchNorm as bias) run by oneDNN primitives that
// dynexec creates once and reuses; the building block of torch.classes.dynexec.OneDnnChain.
//
// Why not torch's own oneDNN path (torch.ops.mkldnn._convolution_pointwise): it rebuilds
// the oneDNN descriptors and looks up its primitive cache on every call, a fixed
// ~20-25 us per convolution whatever the batch (measured on 64x8x8 NHWC inputs, called
// from C++ and from Python alike). A routed block runs on a sub-batch of a few samples,
// where that fixed cost is as large as the arithmetic and does not shrink with the
// routing; an executed primitive costs ~1 us on top of its arithmetic.
//
// dynexec links its own libdnnl (the onednn-cpu-gomp wheel): torch links oneDNN
// statically and exports none of its symbols. Both use the process's one libgomp, so
// torch's thread setting applies to both.
#pragma once

#include <ATen/ATen.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace dynexec {
namespace onednn {

// An NHWC-dense float32 activation: n samples of [h, w, c] at data.
struct Nhwc {
  float* data;
  int64_t n, h, w, c;
  int64_t numel() const { return n * h * w * c; }
};

class PackedConv {
 public:
  // weight [OC, IC, KH, KW] and bias [OC], float32 on CPU (checked; errors name the
  // convolution by ``name``).
  PackedConv(const at::Tensor& weight, const at::Tensor& bias, int64_t stride, int64_t padding,
             std::string name);

  // conv(x) + bias as a new NHWC tensor (x: float32 CPU [N, IC, H, W], any layout).
  at::Tensor forward(const at::Tensor& x);
  // residual += conv(x) + bias in place; the add is the convolution's sum post-op when
  // residual is NHWC-dense (no output allocated), else a separate add.
  void add_(const at::Tensor& x, const at::Tensor& residual);

  // out = conv(x) + bias (+ out with sum) for NHWC-dense x and out, without the checks of
  // forward / add_: x.c == in_channels() and out has x.n samples of output_hw(x) x
  // out_channels() (the caller, OneDnnChain, sizes its buffers so). Allocates nothing
  // once this thread has run the same geometry and batch size before.
  // With relu, then out = relu(out) (torch's ReLU: NaN and -0.0 kept), fused into the
  // Winograd kernel's output transform, a separate pass after a oneDNN primitive.
  // With group_sums (Winograd only: uses_winograd()), also the per-tile-group sums of
  // what it stored, for cpu::winograd_group_means (see winograd_cpu.h).
  void run(const Nhwc& x, float* out, bool sum, bool relu = false, float* group_sums = nullptr);
  // The output of x: [x.n, oh, ow, out_channels()].
  Nhwc output_of(const Nhwc& x, float* data) const;
  // Checks that x has in_channels() channels and room for the kernel (forward checks
  // its input with it too), for callers of run.
  void check_input(const Nhwc& x) const;

  // Runs this convolution with dynexec's Winograd F(2x2, 3x3) kernel from now on
  // (csrc/ops/cpu/winograd_cpu.h) when it is eligible — 3x3, stride 1, padding 1, input
  // channels a multiple of 8, output channels a multiple of 16, a CPU with AVX2 and FMA; returns
  // whether it does. Call before the convolution is shared between threads.
  bool enable_winograd();
  bool uses_winograd() const { return winograd_weights_.defined(); }

  int64_t in_channels() const { return ic_; }
  int64_t out_channels() const { return oc_; }

 private:
  at::Tensor checked_input(const at::Tensor& x) const;
  std::array<int64_t, 4> output_shape(const at::Tensor& x) const;
  const dnnl::memory& packed_for(const dnnl::memory::desc& wei_md);
  void run_onednn(const Nhwc& x, float* out, bool sum);

  struct Pack {
    at::Tensor storage;
    dnnl::memory::desc weights;
    dnnl::memory weights_memory;
  };
  static constexpr int kMaxLayouts = 8;

  std::string name_;
  at::Tensor weight_, bias_;
  at::Tensor winograd_weights_;  // [16, OC / 16, IC, 16] when enable_winograd() took
  int64_t oc_, ic_, kh_, kw_, stride_, padding_;
  dnnl::memory bias_memory_;
  std::mutex packs_mu_;
  std::array<Pack, kMaxLayouts> packs_;
  std::atomic<int> packs_filled_{0};
};

// An at::Tensor's NHWC-dense data as an Nhwc (t: float32, 4-D, channels_last-contiguous).
inline Nhwc nhwc_of(const at::Tensor& t) {
  return Nhwc{t.data_ptr<float>(), t.size(0), t.size(2), t.size(3), t.size(1)};
}

// Number of oneDNN primitives created so far (one per geometry and sub-batch size).
int64_t plan_count();

// oneDNN's implementation name of every primitive created so far (e.g. "brgconv:avx2").
std::vector<std::string> plan_impls();

// oneDNN's version as major * 10000 + minor * 100 + patch.
int64_t version();

}  // namespace onednn
}  // namespace dynexec
