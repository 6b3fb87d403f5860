// dynexec._C: operator schemas of the regrouping and gate ops (registered once, here) and
// the Python module stub that makes the shared library importable as `dynexec._C`.
//
// Kernels are registered per backend with TORCH_LIBRARY_IMPL in csrc/ops/cpu/*.cpp and
// csrc/ops/cuda/*.cu; fake (meta) kernels for torch.compile live in dynexec/runtime/ops/fake.py.
#include <Python.h>

#include <torch/library.h>

#include "ops/cpu/winograd_cpu.h"

#ifdef DYNEXEC_WITH_CUDA
#include <cuda.h>
#endif

namespace dynexec {

// CUDA_VERSION the extension was compiled against (e.g. 13000), or 0 for a CPU-only
// build. Python compares it with torch.version.cuda at import.
int64_t cuda_version() {
#ifdef DYNEXEC_WITH_CUDA
  return CUDA_VERSION;
#else
  return 0;
#endif
}

#ifdef DYNEXEC_WITH_ONEDNN
int64_t onednn_version();     // csrc/executor/register.cpp
int64_t onednn_plan_count();
std::vector<std::string> onednn_plan_impls();
#else
// 0: built without oneDNN (no torch.classes.dynexec.OneDnnChain).
int64_t onednn_version() { return 0; }
int64_t onednn_plan_count() { return 0; }
std::vector<std::string> onednn_plan_impls() { return {}; }
#endif

}  // namespace dynexec

TORCH_LIBRARY(dynexec, m) {
  m.def("partition(Tensor mask) -> (Tensor idx, Tensor count)");
  m.def("gather_rows(Tensor x, Tensor idx, SymInt count) -> Tensor");
  m.def("scatter_residual_relu_(Tensor(a!) out, Tensor y, Tensor idx, SymInt count) -> ()");
  m.def("downsample_b(Tensor x, SymInt out_channels) -> Tensor");
  // The scatter plus pooled[idx[i]] = out[idx[i]].mean((H, W)) in the same pass: the
  // input of SkipNet's next gate without a separate pooling kernel.
  m.def(
      "scatter_residual_relu_pool_(Tensor(a!) out, Tensor y, Tensor idx, SymInt count, "
      "Tensor(b!) pooled) -> ()");
  // x = relu(x) in place and pooled[n, c] = x[n, c].mean((H, W)) for every n, in one pass
  // (the whole-batch block's ReLU plus the input of SkipNet's next gate).
  m.def("relu_pool_(Tensor(a!) x, Tensor(b!) pooled) -> ()");
  // One step of SkipNet's recurrent gate (1x1 embedding, LSTM cell, projection, sigmoid).
  m.def(
      "recurrent_gate_step(Tensor pooled, Tensor embed_w, Tensor embed_b, Tensor w_ih, "
      "Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor proj_w, Tensor proj_b, Tensor hx, "
      "Tensor cx) -> (Tensor prob, Tensor hx_new, Tensor cx_new)");
  // A classifier head: global average pooling, linear layer, optional sigmoid (a policy's
  // block probabilities) -> [N, K].
  m.def("pooled_linear(Tensor h, Tensor weight, Tensor bias, bool sigmoid) -> Tensor");
  // Winograd F(2x2, 3x3) convolution, 3x3 stride 1 padding 1 (csrc/ops/cpu/winograd_cpu.h)
  m.def("winograd_weights(Tensor weight) -> Tensor");
  m.def("conv3x3_winograd(Tensor x, Tensor weights, Tensor bias) -> Tensor");
  m.def("winograd_supported() -> bool", &dynexec::cpu::winograd_supported);
  m.def("winograd_isa() -> str", &dynexec::cpu::winograd_isa);
  m.def("cuda_version() -> int", &dynexec::cuda_version);
  // oneDNN version (major*10000 + minor*100 + patch) behind torch.classes.dynexec.OneDnnChain
  // (csrc/convolution/), or 0 when the extension was built without it.
  m.def("onednn_version() -> int", &dynexec::onednn_version);
  // oneDNN primitives created so far (one per convolution geometry and sub-batch size).
  m.def("onednn_plan_count() -> int", &dynexec::onednn_plan_count);
  // oneDNN's implementation name of each of those primitives (e.g. "brgconv:avx2"): a
  // "ref:" name means oneDNN's reference code, 50-100x slower than its JIT kernels.
  m.def("onednn_plan_impls() -> str[]", &dynexec::onednn_plan_impls);
}

// `import dynexec._C` only needs a module object; loading the library runs the static
// registrations above. Built against the limited API (see setup.py).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size of per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
