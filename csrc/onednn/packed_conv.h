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
#include <cstdint>
#include <mutex>

namespace dynexec {
namespace onednn {

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

  int64_t in_channels() const { return ic_; }
  int64_t out_channels() const { return oc_; }

 private:
  at::Tensor checked_input(const at::Tensor& x) const;
  std::array<int64_t, 4> output_shape(const at::Tensor& x) const;
  const dnnl::memory& packed_weights(const at::Tensor& x);
  void run(const at::Tensor& x, const at::Tensor& out, bool sum);

  std::string name_;
  at::Tensor weight_, bias_;
  int64_t oc_, ic_, kh_, kw_, stride_, padding_;
  std::once_flag packed_once_;
  at::Tensor packed_storage_;
  dnnl::memory packed_;
};

// Number of oneDNN primitives created so far (one per geometry and sub-batch size).
int64_t plan_count();

// oneDNN's version as major * 10000 + minor * 100 + patch.
int64_t version();

}  // namespace onednn
}  // namespace dynexec
