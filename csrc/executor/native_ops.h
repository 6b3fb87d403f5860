// The native ops (torch.ops.dynexec.*) as the oneDNN classes call them: through the
// dispatcher, so they keep their argument checks and stay the one implementation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

namespace dynexec {

namespace native {

inline c10::Dispatcher& dispatcher() { return c10::Dispatcher::singleton(); }

inline at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& idx, int64_t count) {
  static auto op = dispatcher().findSchemaOrThrow("dynexec::gather_rows", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(x, idx, count);
}

inline void scatter_residual_relu_(const at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                            int64_t count) {
  static auto op = dispatcher().findSchemaOrThrow("dynexec::scatter_residual_relu_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  op.call(out, y, idx, count);
}

inline void scatter_residual_relu_pool_(const at::Tensor& out, const at::Tensor& y, const at::Tensor& idx,
                                 int64_t count, const at::Tensor& pooled) {
  static auto op =
      dispatcher()
          .findSchemaOrThrow("dynexec::scatter_residual_relu_pool_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt, const at::Tensor&)>();
  op.call(out, y, idx, count, pooled);
}

inline void relu_pool_(const at::Tensor& x, const at::Tensor& pooled) {
  static auto op = dispatcher().findSchemaOrThrow("dynexec::relu_pool_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&)>();
  op.call(x, pooled);
}

inline at::Tensor downsample_b(const at::Tensor& x, int64_t out_channels) {
  static auto op = dispatcher()
                       .findSchemaOrThrow("dynexec::downsample_b", "")
                       .typed<at::Tensor(const at::Tensor&, c10::SymInt)>();
  return op.call(x, out_channels);
}

}  // namespace native

}  // namespace dynexec
