#include "packed_conv.h"

#include "../ops/cpu/regroup_cpu.h"
#include "../ops/cpu/winograd_cpu.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <map>
#include <memory>
#include <vector>
#include <utility>

namespace dynexec {
namespace onednn {
namespace {

using dnnl::memory;
using Dims = memory::dims;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// A primitive holds no weights, so one cache serves every convolution of a geometry
// (a CIFAR ResNet-110 has a handful of geometries and 100+ convolutions).
// Key: (n, ic, h, w, oc, kh, kw, stride, padding, sum post-op, threads). oneDNN fixes a
// primitive's work split for the threads it may use when it is created: a primitive
// made inside one of BlockLoop's shards (one thread) must not serve a call that may use
// every thread, and the other way round.
using PlanKey = std::array<int64_t, 11>;

int64_t available_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

struct Plan {
  dnnl::convolution_forward primitive;
  memory::desc weights, src, dst, scratchpad;
  std::string impl;  // oneDNN's implementation name, e.g. "brgconv:avx2"
};

// The primitive for key k, its weights described as format_tag::any: oneDNN picks their
// layout (see plans()).
dnnl::convolution_forward::primitive_desc describe(const PlanKey& k) {
  [[maybe_unused]] const auto [n, ic, h, w, oc, kh, kw, stride, pad, sum, threads] = k;
  const int64_t oh = (h + 2 * pad - kh) / stride + 1, ow = (w + 2 * pad - kw) / stride + 1;
  const auto f32 = memory::data_type::f32;
  dnnl::primitive_attr attr;
  // User scratchpad: concurrent calls from several threads never share a buffer.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (sum) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      memory::desc({n, ic, h, w}, f32, memory::format_tag::nhwc),
      memory::desc({oc, ic, kh, kw}, f32, memory::format_tag::any),
      memory::desc({oc}, f32, memory::format_tag::a),
      memory::desc({n, oc, oh, ow}, f32, memory::format_tag::nhwc), Dims{stride, stride},
      Dims{pad, pad}, Dims{pad, pad}, attr);
}

// One plan per key, for the weight layout oneDNN prefers for that key (weights described
// as format_tag::any): the layout can depend on the batch size. On AVX2 machines oneDNN
// 3.2 picks 8-, 16- or 24-output-channel blocks by batch size for the CIFAR geometries;
// a primitive forced onto weights packed for another batch size's choice falls back to
// the reference implementation (ref:any), 50-100x slower. Each PackedConv therefore keeps
// one packed copy of its weights per layout its plans ask for (see packed_for).
// Plans are heap-allocated: Bound keeps pointers to them.
std::mutex plans_mu;
std::map<PlanKey, std::unique_ptr<Plan>>& plans() {
  static std::map<PlanKey, std::unique_ptr<Plan>> cache;
  return cache;
}

// The plan of key. Creating one costs ~0.1-1 ms (oneDNN's JIT), so it happens once per
// key; entries are never evicted (a model has a few geometries times the batch sizes it
// sees, ~40 KB each).
const Plan& plan_for(const PlanKey& key) {
  std::lock_guard<std::mutex> lock(plans_mu);
  std::unique_ptr<Plan>& plan = plans()[key];
  if (!plan) {
    const auto pd = describe(key);
    plan = std::make_unique<Plan>(Plan{dnnl::convolution_forward(pd), pd.weights_desc(), pd.src_desc(),
                                       pd.dst_desc(), pd.scratchpad_desc(), pd.impl_info_str()});
  }
  return *plan;
}

// This thread's scratchpad, grown as needed and reused by every call on the thread (a
// convolution never runs inside another on the same thread): no allocation per call.
void* thread_scratchpad(size_t bytes) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < bytes) {
    buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  }
  return buffer.data_ptr();
}

// A plan with this thread's memory objects for its src, dst and scratchpad: a call only
// sets their data pointers (creating dnnl::memory objects and an argument map per call
// cost ~1-2 us, as much as a small convolution's arithmetic). Thread-local, so the plan
// cache's lock is taken only the first time a thread sees a key.
struct Bound {
  const Plan* plan;
  memory src, dst, scratchpad;
};

Bound& bound_for(const PlanKey& key) {
  thread_local std::map<PlanKey, Bound> bound;
  auto it = bound.find(key);
  if (it != bound.end()) return it->second;
  const Plan& plan = plan_for(key);
  auto& engine = cpu_engine();
  return bound.emplace(key, Bound{&plan, memory(plan.src, engine, nullptr), memory(plan.dst, engine, nullptr),
                                  memory(plan.scratchpad, engine, nullptr)})
      .first->second;
}

}  // namespace

PackedConv::PackedConv(const at::Tensor& weight, const at::Tensor& bias, int64_t stride,
                       int64_t padding, std::string name)
    : name_(std::move(name)), stride_(stride), padding_(padding) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.numel() > 0,
              name_, ": expected a non-empty float32 CPU weight [OC, IC, KH, KW], got ",
              weight.scalar_type(), " on ", weight.device(), " with shape ", weight.sizes());
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.size(0) == weight.size(0),
              name_, ": expected a float32 CPU bias [", weight.size(0), "], got ", bias.scalar_type(),
              " on ", bias.device(), " with shape ", bias.sizes());
  TORCH_CHECK(stride >= 1 && padding >= 0, name_, ": expected stride >= 1 and padding >= 0, got ",
              stride, " and ", padding);
  weight_ = weight.contiguous();
  bias_ = bias.contiguous();
  oc_ = weight.size(0);
  ic_ = weight.size(1);
  kh_ = weight.size(2);
  kw_ = weight.size(3);
  bias_memory_ = memory(memory::desc({oc_}, memory::data_type::f32, memory::format_tag::a), cpu_engine(),
                        bias_.data_ptr());
}

namespace {
// x's dimensions as an Nhwc (no data): the geometry the checks and shapes work on.
Nhwc dims_of(const at::Tensor& x) { return Nhwc{nullptr, x.size(0), x.size(2), x.size(3), x.size(1)}; }
}  // namespace

at::Tensor PackedConv::checked_input(const at::Tensor& x) const {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.size(1) == ic_,
              name_, ": expected a float32 CPU input [N, ", ic_, ", H, W], got ", x.scalar_type(),
              " on ", x.device(), " with shape ", x.sizes());
  check_input(dims_of(x));
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
}

std::array<int64_t, 4> PackedConv::output_shape(const at::Tensor& x) const {
  const Nhwc y = output_of(dims_of(x), nullptr);
  return {y.n, y.c, y.h, y.w};
}

void PackedConv::check_input(const Nhwc& x) const {
  TORCH_CHECK(x.c == ic_, name_, ": expected an input [N, ", ic_, ", H, W], got [", x.n, ", ", x.c, ", ", x.h, ", ",
              x.w, "]");
  TORCH_CHECK(x.h + 2 * padding_ >= kh_ && x.w + 2 * padding_ >= kw_, name_, ": the input's spatial size ", x.h, "x",
              x.w, " is smaller than the kernel ", kh_, "x", kw_, " with padding ", padding_);
}

Nhwc PackedConv::output_of(const Nhwc& x, float* data) const {
  return Nhwc{data, x.n, (x.h + 2 * padding_ - kh_) / stride_ + 1, (x.w + 2 * padding_ - kw_) / stride_ + 1, oc_};
}

at::Tensor PackedConv::forward(const at::Tensor& input) {
  const at::Tensor x = checked_input(input);
  at::Tensor out = at::empty(output_shape(x), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  run(nhwc_of(x), out.data_ptr<float>(), /*sum=*/false);  // (nothing to do for n == 0)
  return out;
}

void PackedConv::add_(const at::Tensor& input, const at::Tensor& residual) {
  const at::Tensor x = checked_input(input);
  const auto shape = output_shape(x);
  TORCH_CHECK(residual.device().is_cpu() && residual.scalar_type() == at::kFloat &&
                  residual.sizes() == at::IntArrayRef(shape),
              name_, ": expected a float32 CPU residual of shape ", at::IntArrayRef(shape), ", got ",
              residual.scalar_type(), " on ", residual.device(), " with shape ", residual.sizes());
  at::assert_no_internal_overlap(residual);
  at::assert_no_overlap(residual, x);
  if (x.size(0) == 0) return;
  if (!residual.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    at::Tensor(residual).add_(forward(x));  // no in-place epilogue into this layout
    return;
  }
  run(nhwc_of(x), residual.data_ptr<float>(), /*sum=*/true);
}

// The weights in layout wei_md, reordered the first time a plan asks for that layout.
// Lookups read the filled slots without a lock (a slot is complete before the count
// that publishes it is raised); only packing a new layout takes the lock.
const memory& PackedConv::packed_for(const memory::desc& wei_md) {
  const int count = packs_filled_.load(std::memory_order_acquire);
  for (int i = 0; i < count; ++i) {
    if (packs_[i].weights == wei_md) return packs_[i].weights_memory;
  }
  std::lock_guard<std::mutex> lock(packs_mu_);
  const int filled = packs_filled_.load(std::memory_order_relaxed);
  for (int i = count; i < filled; ++i) {
    if (packs_[i].weights == wei_md) return packs_[i].weights_memory;
  }
  TORCH_CHECK(filled < kMaxLayouts, name_, ": oneDNN asked for more than ", kMaxLayouts,
              " weight layouts across batch sizes");
  memory plain({{oc_, ic_, kh_, kw_}, memory::data_type::f32, memory::format_tag::oihw}, cpu_engine(),
               weight_.data_ptr<float>());
  Pack& pack = packs_[filled];
  pack.storage = at::empty({static_cast<int64_t>(wei_md.get_size())}, weight_.options().dtype(at::kByte));
  pack.weights = wei_md;
  pack.weights_memory = memory(wei_md, cpu_engine(), pack.storage.data_ptr());
  dnnl::reorder(plain, pack.weights_memory).execute(thread_stream(), plain, pack.weights_memory);
  thread_stream().wait();
  packs_filled_.store(filled + 1, std::memory_order_release);
  return pack.weights_memory;
}

bool PackedConv::enable_winograd() {
  if (kh_ != 3 || kw_ != 3 || stride_ != 1 || padding_ != 1 || !cpu::winograd_channels_ok(ic_, oc_) ||
      !cpu::winograd_supported()) {
    return false;
  }
  if (!winograd_weights_.defined()) winograd_weights_ = cpu::transformed_weights(weight_);
  return true;
}

void PackedConv::run(const Nhwc& x, float* out, bool sum, bool relu, float* group_sums) {
  if (winograd_weights_.defined()) {
    RECORD_FUNCTION(sum ? "dynexec::winograd_conv_add_" : "dynexec::winograd_conv", std::vector<c10::IValue>());
    cpu::winograd_conv3x3_nhwc_f32(x.data, x.n, x.h, x.w, ic_, oc_, winograd_weights_.const_data_ptr<float>(),
                                   bias_.const_data_ptr<float>(), sum, relu, out, group_sums);
    return;
  }
  TORCH_CHECK(group_sums == nullptr, name_, ": tile-group sums need the Winograd kernel");
  run_onednn(x, out, sum);
  if (relu) cpu::relu_f32(out, output_of(x, out).numel());
}

void PackedConv::run_onednn(const Nhwc& x, float* out, bool sum) {
  // Visible to torch.profiler like an op (the class methods bypass the dispatcher).
  RECORD_FUNCTION(sum ? "dynexec::onednn_conv_add_" : "dynexec::onednn_conv", std::vector<c10::IValue>());
  if (x.n == 0) return;
  const PlanKey key{x.n, ic_, x.h, x.w, oc_, kh_, kw_, stride_, padding_, sum ? 1 : 0, available_threads()};
  Bound& bound = bound_for(key);
  const memory& weights = packed_for(bound.plan->weights);
  at::internal::lazy_init_num_threads();  // this thread's OpenMP team follows torch's setting
  bound.src.set_data_handle(x.data);
  bound.dst.set_data_handle(out);
  dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, bound.src.get()},
                             {DNNL_ARG_WEIGHTS, weights.get()},
                             {DNNL_ARG_BIAS, bias_memory_.get()},
                             {DNNL_ARG_DST, bound.dst.get()},
                             {DNNL_ARG_SCRATCHPAD, nullptr}};
  int nargs = 4;
  if (const size_t bytes = bound.plan->scratchpad.get_size(); bytes > 0) {
    bound.scratchpad.set_data_handle(thread_scratchpad(bytes));
    args[nargs++].memory = bound.scratchpad.get();
  }
  dnnl::error::wrap_c_api(dnnl_primitive_execute(bound.plan->primitive.get(), thread_stream().get(), nargs, args),
                          "dynexec: oneDNN convolution failed");
  thread_stream().wait();
}

int64_t plan_count() {
  std::lock_guard<std::mutex> lock(plans_mu);
  return static_cast<int64_t>(plans().size());
}

std::vector<std::string> plan_impls() {
  std::lock_guard<std::mutex> lock(plans_mu);
  std::vector<std::string> impls;
  for (const auto& entry : plans()) impls.push_back(entry.second->impl);
  return impls;
}

int64_t version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

}  // namespace onednn
}  // namespace dynexec
