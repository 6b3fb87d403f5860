// CUDA kernel of recurrent_gate_step: one block per sample (grid-stride over samples),
// whose threads share the two small products, the cell update and the projection. E and
// H are ~10, so the point is one launch instead of the composite's five (two addmm,
// lstm_cell, sigmoid), not a tuned GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../index_math.h"

namespace dynexec {
namespace {

namespace im = index_math;

constexpr int kGateThreads = 128;

__device__ __forceinline__ float sigmoid_acc(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid_acc(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <typename T>
__global__ void recurrent_gate_step_kernel(
    const T* __restrict__ pooled, const T* __restrict__ embed_w, const T* __restrict__ embed_b,
    const T* __restrict__ w_ih, const T* __restrict__ w_hh, const T* __restrict__ b_ih,
    const T* __restrict__ b_hh, const T* __restrict__ proj_w, const T* __restrict__ proj_b,
    const T* __restrict__ hx, const T* __restrict__ cx, int64_t N, int64_t C, int64_t E, int64_t H,
    T* __restrict__ prob, T* __restrict__ hx_new, T* __restrict__ cx_new) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ unsigned char smem[];
  acc_t* part = reinterpret_cast<acc_t*>(smem);  // [blockDim.x] partial sums
  acc_t* e = part + blockDim.x;                   // [E]  embedding
  acc_t* g = e + E;                               // [4H] gate pre-activations
  acc_t* hn = g + 4 * H;                          // [H]  new hidden state
  const int t = threadIdx.x;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    // e = pooled[n] @ embed_w + embed_b: a pass covers `kpt` adjacent outputs (coalesced
    // rows of embed_w), each summed over c by `slices` threads, then in shared memory.
    const T* p = pooled + n * C;
    const int kpt = static_cast<int>(E < blockDim.x ? (E > 0 ? E : 1) : blockDim.x);
    const int slices = blockDim.x / kpt;
    const int slice = t / kpt;
    for (int64_t k0 = 0; k0 < E; k0 += kpt) {
      const int64_t k = k0 + t % kpt;
      acc_t acc = acc_t(0);
      if (slice < slices && k < E) {
        for (int64_t c = slice; c < C; c += slices) {
          acc += static_cast<acc_t>(p[c]) * static_cast<acc_t>(embed_w[c * E + k]);
        }
      }
      part[t] = acc;
      __syncthreads();
      if (t < kpt && k < E) {
        acc_t sum = static_cast<acc_t>(embed_b[k]);
        for (int s = 0; s < slices; ++s) sum += part[s * kpt + t];
        e[k] = sum;
      }
      __syncthreads();
    }
    // gates = e @ w_ih^T + b_ih + hx[n] @ w_hh^T + b_hh: a thread per gate row
    for (int64_t j = t; j < 4 * H; j += blockDim.x) {
      acc_t acc = static_cast<acc_t>(b_ih[j]) + static_cast<acc_t>(b_hh[j]);
      for (int64_t k = 0; k < E; ++k) acc += static_cast<acc_t>(w_ih[j * E + k]) * e[k];
      for (int64_t k = 0; k < H; ++k) {
        acc += static_cast<acc_t>(w_hh[j * H + k]) * static_cast<acc_t>(hx[n * H + k]);
      }
      g[j] = acc;
    }
    __syncthreads();
    // the cell update: a thread per hidden unit
    for (int64_t h = t; h < H; h += blockDim.x) {
      const acc_t i = sigmoid_acc(g[im::gate_index(im::kGateI, h, H)]);
      const acc_t f = sigmoid_acc(g[im::gate_index(im::kGateF, h, H)]);
      const acc_t gg = tanh_acc(g[im::gate_index(im::kGateG, h, H)]);
      const acc_t o = sigmoid_acc(g[im::gate_index(im::kGateO, h, H)]);
      const acc_t c_new = im::lstm_cell_state<acc_t>(i, f, gg, static_cast<acc_t>(cx[n * H + h]));
      const acc_t h_new = im::lstm_hidden_state<acc_t>(o, tanh_acc(c_new));
      cx_new[n * H + h] = static_cast<T>(c_new);
      hx_new[n * H + h] = static_cast<T>(h_new);
      hn[h] = h_new;
    }
    __syncthreads();
    if (t == 0) {
      acc_t s = static_cast<acc_t>(proj_b[0]);
      for (int64_t h = 0; h < H; ++h) s += hn[h] * static_cast<acc_t>(proj_w[h]);
      prob[n] = static_cast<T>(sigmoid_acc(s));
    }
    __syncthreads();  // the next sample reuses the shared buffers
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_gate_step_cuda(
    const at::Tensor& pooled_, const at::Tensor& embed_w_, const at::Tensor& embed_b_,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& b_ih_,
    const at::Tensor& b_hh_, const at::Tensor& proj_w_, const at::Tensor& proj_b_,
    const at::Tensor& hx_, const at::Tensor& cx_) {
  c10::cuda::CUDAGuard guard(pooled_.device());
  GateStepCall g(pooled_, embed_w_, embed_b_, w_ih_, w_hh_, b_ih_, b_hh_, proj_w_, proj_b_, hx_,
                 cx_);
  const int64_t N = g.N, C = g.C, E = g.E, H = g.H;
  if (N == 0) return g.outputs();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(N, sms * 16));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled_.scalar_type(),
                                  "dynexec_recurrent_gate_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared = (kGateThreads + E + 5 * H) * sizeof(acc_t);
    TORCH_CHECK(shared <= 48 * 1024, "dynexec::recurrent_gate_step: E=", E, " and H=", H,
                " need ", shared, " bytes of shared memory per block on CUDA, more than the ",
                "48 KiB supported");
    recurrent_gate_step_kernel<scalar_t><<<blocks, kGateThreads, shared, stream>>>(
        g.pooled->const_data_ptr<scalar_t>(), g.embed_w->const_data_ptr<scalar_t>(),
        g.embed_b->const_data_ptr<scalar_t>(), g.w_ih->const_data_ptr<scalar_t>(),
        g.w_hh->const_data_ptr<scalar_t>(), g.b_ih->const_data_ptr<scalar_t>(),
        g.b_hh->const_data_ptr<scalar_t>(), g.proj_w->const_data_ptr<scalar_t>(),
        g.proj_b->const_data_ptr<scalar_t>(), g.hx->const_data_ptr<scalar_t>(),
        g.cx->const_data_ptr<scalar_t>(), N, C, E, H, g.prob.data_ptr<scalar_t>(),
        g.hx_new.data_ptr<scalar_t>(), g.cx_new.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g.outputs();
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CUDA, m) {
  m.impl("recurrent_gate_step", &dynexec::recurrent_gate_step_cuda);
}
