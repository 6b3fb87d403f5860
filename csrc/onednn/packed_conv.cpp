#include "packed_conv.h"

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
  memory::desc weights, src, dst, bias, scratchpad;
};

dnnl::convolution_forward::primitive_desc describe(const PlanKey& k, const memory::desc& wei_md) {
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
      memory::desc({n, ic, h, w}, f32, memory::format_tag::nhwc), wei_md,
      memory::desc({oc}, f32, memory::format_tag::a),
      memory::desc({n, oc, oh, ow}, f32, memory::format_tag::nhwc), Dims{stride, stride},
      Dims{pad, pad}, Dims{pad, pad}, attr);
}

// Plans of one key, one per weight layout: convolutions of one geometry pack their
// weights in the layout oneDNN prefers for the first batch size each of them sees. On
// this project's machine that layout never depends on the batch size (checked for the
// CIFAR / ImageNet geometries, n = 1-130, with and without the sum post-op), but a
// primitive must never read weights packed for another, so the layout is part of the
// identity. Plans are heap-allocated: Bound keeps pointers to them.
using PlanList = std::vector<std::unique_ptr<Plan>>;

const Plan* find_plan(const PlanList& list, const memory::desc& wei_md) {
  for (const auto& plan : list) {
    if (plan->weights == wei_md) return plan.get();
  }
  return nullptr;
}

std::mutex plans_mu;
std::map<PlanKey, PlanList>& plans() {
  static std::map<PlanKey, PlanList> cache;
  return cache;
}

// The plan of key for weights in layout wei_md. Creating one costs ~0.1-1 ms (oneDNN's
// JIT), so it happens once per key and layout; entries are never evicted (a model has a
// few geometries times the batch sizes it sees, ~40 KB each).
const Plan& plan_for(const PlanKey& key, const memory::desc& wei_md) {
  std::lock_guard<std::mutex> lock(plans_mu);
  PlanList& list = plans()[key];
  if (const Plan* plan = find_plan(list, wei_md)) return *plan;
  const auto pd = describe(key, wei_md);
  list.push_back(std::make_unique<Plan>(Plan{dnnl::convolution_forward(pd), wei_md, pd.src_desc(), pd.dst_desc(),
                                             pd.bias_desc(), pd.scratchpad_desc()}));
  return *list.back();
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

Bound& bound_for(const PlanKey& key, const memory::desc& wei_md) {
  thread_local std::map<PlanKey, std::vector<Bound>> bound;
  std::vector<Bound>& list = bound[key];
  for (Bound& b : list) {
    if (b.plan->weights == wei_md) return b;
  }
  const Plan& plan = plan_for(key, wei_md);
  auto& engine = cpu_engine();
  list.push_back(Bound{&plan, memory(plan.src, engine, nullptr), memory(plan.dst, engine, nullptr),
                       memory(plan.scratchpad, engine, nullptr)});
  return list.back();
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

// The weights, reordered once into the layout oneDNN prefers for the first input seen
// (sub-batches of other sizes reuse that layout: their primitives are created for it).
void PackedConv::pack_once(const Nhwc& x) {
  std::call_once(packed_once_, [&] {
    const memory::desc any({oc_, ic_, kh_, kw_}, memory::data_type::f32, memory::format_tag::any);
    const PlanKey first{x.n, ic_, x.h, x.w, oc_, kh_, kw_, stride_, padding_, 0, available_threads()};
    const auto pd = describe(first, any);
    const auto wei_md = pd.weights_desc();
    memory plain({{oc_, ic_, kh_, kw_}, memory::data_type::f32, memory::format_tag::oihw}, cpu_engine(),
                 weight_.data_ptr<float>());
    packed_storage_ = at::empty({static_cast<int64_t>(wei_md.get_size())}, weight_.options().dtype(at::kByte));
    dnnl::memory packed(wei_md, cpu_engine(), packed_storage_.data_ptr());
    dnnl::reorder(plain, packed).execute(thread_stream(), plain, packed);
    thread_stream().wait();
    packed_ = packed;
    bias_memory_ = memory(pd.bias_desc(), cpu_engine(), bias_.data_ptr());
  });
}

void PackedConv::run(const Nhwc& x, float* out, bool sum) {
  // Visible to torch.profiler like an op (the class methods bypass the dispatcher).
  RECORD_FUNCTION(sum ? "dynexec::onednn_conv_add_" : "dynexec::onednn_conv", std::vector<c10::IValue>());
  if (x.n == 0) return;
  pack_once(x);
  const PlanKey key{x.n, ic_, x.h, x.w, oc_, kh_, kw_, stride_, padding_, sum ? 1 : 0, available_threads()};
  Bound& bound = bound_for(key, packed_.get_desc());
  at::internal::lazy_init_num_threads();  // this thread's OpenMP team follows torch's setting
  bound.src.set_data_handle(x.data);
  bound.dst.set_data_handle(out);
  dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, bound.src.get()},
                             {DNNL_ARG_WEIGHTS, packed_.get()},
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
  int64_t count = 0;
  for (const auto& entry : plans()) count += static_cast<int64_t>(entry.second.size());
  return count;
}

int64_t version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

}  // namespace onednn
}  // namespace dynexec
