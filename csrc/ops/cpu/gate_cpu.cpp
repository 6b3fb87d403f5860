// CPU kernel of recurrent_gate_step: one step of SkipNet's recurrent gate,
//   e = pooled[n] @ embed_w + embed_b -> LSTM cell (w_ih, w_hh, b_ih, b_hh)
//   -> prob[n] = sigmoid(hx_new[n] @ proj_w + proj_b),
// in plain C++. E and H are ~10, so the composite's ATen calls (two addmm, lstm_cell,
// sigmoid) cost far more in dispatch and allocation than in arithmetic.
//
// Samples are processed in tiles: a tile's values of one quantity (a feature, a gate, ...)
// form one GCC/Clang vector with a lane per sample, so every step below is a few SIMD
// instructions whatever E and H are (per-sample loops over E = 10 outputs vectorise
// badly), and sigmoid / tanh are branch-free polynomials on those vectors. gate_rows is
// compiled for AVX2 too (clones.h); without AVX2 it runs several times slower.
#if defined(__GNUC__) && !defined(__clang__)
// GCC notes that vector arguments change the ABI between SSE2 and AVX2 code: no vector
// crosses a call here (every function taking one is always inlined).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "gate_cpu.h"
#include "../index_math.h"
#include "clones.h"

// Functions on the lane vectors are always inlined into each clone, so they are compiled
// for the clone's target and no vector crosses a call.
#define DYNEXEC_LANE_FN __attribute__((always_inline)) inline

namespace dynexec {
namespace {

namespace im = index_math;

// A tile is one 32-byte vector of samples (one AVX register): 8 float or 4 double lanes.
constexpr int64_t kTileBytes = 32;

// Work per parallel chunk, in multiply-adds: a step smaller than this stays on one
// thread, where waking another one would cost more than it saves.
constexpr int64_t kGateGrainWork = 1 << 17;

// A tile of kTile lanes of acc_t and the math on it. float: exp without libm calls (the
// step's float32 outputs stay within ~3 ulp of float64 over gate inputs in [-100, 100],
// as the composite's do); double: libm lane by lane (not performance critical).
template <typename acc_t>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int64_t kTile = kTileBytes / sizeof(float);
  using V = float __attribute__((vector_size(kTileBytes)));
  using I = int32_t __attribute__((vector_size(kTileBytes)));

  // exp(x): x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite), exp(r) by its Taylor series
  // to r^7 (truncation < 1e-8 relative), times 2^k put in the exponent bits. x is
  // clamped to [-87, 88] (no overflow; below, exp underflows to ~0); NaN stays NaN.
  DYNEXEC_LANE_FN static V exp(V x) {
    x = x < -87.0f ? V{} - 87.0f : x;
    x = x > 88.0f ? V{} + 88.0f : x;
    // t = 1.5 * 2^23 + round(x / ln2): k sits in the low mantissa bits of t
    const V t = x * 1.44269504f + 12582912.0f;
    const V k = t - 12582912.0f;
    const V r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
    V p = V{} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const I scale = ((I)t - 0x4B400000 + 127) << 23;  // the bits of 2^k
    return p * (V)scale;
  }
  DYNEXEC_LANE_FN static V sigmoid(V x) { return 1.0f / (1.0f + exp(-x)); }
  // |x| < 0.25: odd Taylor polynomial to x^9 (truncation < 1e-8 relative); otherwise
  // (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.61, where 1 - e loses no precision.
  DYNEXEC_LANE_FN static V tanh(V x) {
    const V a = x < 0.0f ? -x : x;
    const V x2 = x * x;
    const V small =
        x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f +
                                                                    x2 * (62.0f / 2835.0f)))));
    const V e = exp(-2.0f * a);
    const V large = (1.0f - e) / (1.0f + e);
    return a < 0.25f ? small : (x < 0.0f ? -large : large);
  }
};

template <>
struct Lanes<double> {
  static constexpr int64_t kTile = kTileBytes / sizeof(double);
  using V = double __attribute__((vector_size(kTileBytes)));
  DYNEXEC_LANE_FN static V sigmoid(V x) {
    for (int64_t l = 0; l < kTile; ++l) x[l] = 1.0 / (1.0 + std::exp(-x[l]));
    return x;
  }
  DYNEXEC_LANE_FN static V tanh(V x) {
    for (int64_t l = 0; l < kTile; ++l) x[l] = std::tanh(x[l]);
    return x;
  }
};

// out[o] = bias[o] + sum_i w[i * O + o] * in[i] for o < O (w row-major [I, O]). Blocks of
// kBlock outputs are accumulated in registers, so kBlock multiply-add chains run side by
// side instead of each waiting for the previous one.
template <typename acc_t, typename V, typename w_t, typename b_t>
DYNEXEC_LANE_FN void lanes_matvec(V* out, const V* in, const w_t* w, const b_t* bias, int64_t I,
                                  int64_t O) {
  constexpr int64_t kBlock = 8;
  for (int64_t o0 = 0; o0 < O; o0 += kBlock) {
    const int64_t nb = std::min(kBlock, O - o0);
    V acc[kBlock];
#pragma GCC unroll 8
    for (int64_t b = 0; b < kBlock; ++b) {
      acc[b] = V{} + (b < nb ? static_cast<acc_t>(bias[o0 + b]) : acc_t(0));
    }
    for (int64_t i = 0; i < I; ++i) {
      const V v = in[i];
      const w_t* wi = w + i * O + o0;
#pragma GCC unroll 8
      for (int64_t b = 0; b < kBlock; ++b) {
        if (b < nb) acc[b] += static_cast<acc_t>(wi[b]) * v;
      }
    }
#pragma GCC unroll 8
    for (int64_t b = 0; b < kBlock; ++b) {
      if (b < nb) out[o0 + b] = acc[b];
    }
  }
}

template <typename scalar_t, typename acc_t>
struct GateArgs {
  const scalar_t* pooled;   // [N, C]
  const scalar_t* embed_w;  // [C, E]
  const scalar_t* embed_b;  // [E]
  const acc_t* wt;          // [E + H, 4H]: [w_ih | w_hh] transposed
  const acc_t* bias;        // [4H]: b_ih + b_hh
  const scalar_t* proj_w;   // [H]
  acc_t proj_b;
  const scalar_t* hx;       // [N, H]
  const scalar_t* cx;       // [N, H]
  scalar_t* prob;           // [N]
  scalar_t* hx_new;         // [N, H]
  scalar_t* cx_new;         // [N, H]
  int64_t C, E, H;
};

// Vectors of scratch gate_rows needs: the pooled tile, [e, hx], the gates, c' and h'.
int64_t gate_scratch_vectors(int64_t C, int64_t E, int64_t H) {
  return C + (E + H) + 4 * H + 2 * H;
}

// Samples [begin, end) of one gate step, a tile of Lanes::kTile samples at a time. Lanes
// past the last sample of a tile hold zeros and are computed but never stored.
template <typename scalar_t, typename acc_t>
DYNEXEC_CPU_CLONES void gate_rows(const GateArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                  typename Lanes<acc_t>::V* scratch) {
  using L = Lanes<acc_t>;
  using V = typename L::V;
  constexpr int64_t T = L::kTile;
  const int64_t C = a.C, E = a.E, H = a.H, K = E + H, G = 4 * H;
  V* pt = scratch;  // [C]  pooled[:, c]
  V* x = pt + C;    // [K]  e, then hx
  V* g = x + K;     // [G]  gates
  V* cn = g + G;    // [H]  new cell state
  V* hn = cn + H;   // [H]  new hidden state
  for (int64_t n0 = begin; n0 < end; n0 += T) {
    const int64_t ns = std::min(T, end - n0);
    std::fill(pt, pt + C, V{});
    std::fill(x + E, x + K, V{});
    std::fill(cn, cn + H, V{});
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n = n0 + s;
      for (int64_t c = 0; c < C; ++c) pt[c][s] = static_cast<acc_t>(a.pooled[n * C + c]);
      for (int64_t h = 0; h < H; ++h) x[E + h][s] = static_cast<acc_t>(a.hx[n * H + h]);
      for (int64_t h = 0; h < H; ++h) cn[h][s] = static_cast<acc_t>(a.cx[n * H + h]);
    }
    // e = embed_b + pooled @ embed_w; gates = b_ih + b_hh + [e, hx] @ [w_ih | w_hh]^T
    lanes_matvec<acc_t>(x, pt, a.embed_w, a.embed_b, C, E);
    lanes_matvec<acc_t>(g, x, a.wt, a.bias, K, G);
    // c' = f c + i g, h' = o tanh(c'), prob = sigmoid(h' @ proj_w + proj_b)
    V prob = V{} + a.proj_b;
    for (int64_t h = 0; h < H; ++h) {
      const V i = L::sigmoid(g[im::gate_index(im::kGateI, h, H)]);
      const V f = L::sigmoid(g[im::gate_index(im::kGateF, h, H)]);
      const V gg = L::tanh(g[im::gate_index(im::kGateG, h, H)]);
      const V o = L::sigmoid(g[im::gate_index(im::kGateO, h, H)]);
      cn[h] = im::lstm_cell_state<V>(i, f, gg, cn[h]);
      hn[h] = im::lstm_hidden_state<V>(o, L::tanh(cn[h]));
      prob += static_cast<acc_t>(a.proj_w[h]) * hn[h];
    }
    prob = L::sigmoid(prob);
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n = n0 + s;
      a.prob[n] = static_cast<scalar_t>(prob[s]);
      for (int64_t h = 0; h < H; ++h) {
        a.cx_new[n * H + h] = static_cast<scalar_t>(cn[h][s]);
        a.hx_new[n * H + h] = static_cast<scalar_t>(hn[h][s]);
      }
    }
  }
}

// [w_ih | w_hh] transposed into wt [E + H, 4H] and b_ih + b_hh into bias [4H], in acc_t.
template <typename scalar_t, typename acc_t>
void transpose_lstm_weights(const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                            const at::Tensor& b_hh, int64_t E, int64_t H, std::vector<acc_t>& wt,
                            std::vector<acc_t>& bias) {
  const int64_t G = 4 * H, K = E + H;
  wt.assign(static_cast<size_t>(K * G), acc_t(0));
  bias.assign(static_cast<size_t>(G), acc_t(0));
  const scalar_t* wih = w_ih.const_data_ptr<scalar_t>();
  const scalar_t* whh = w_hh.const_data_ptr<scalar_t>();
  const scalar_t* bih = b_ih.const_data_ptr<scalar_t>();
  const scalar_t* bhh = b_hh.const_data_ptr<scalar_t>();
  for (int64_t j = 0; j < G; ++j) {
    for (int64_t k = 0; k < E; ++k) wt[k * G + j] = static_cast<acc_t>(wih[j * E + k]);
    for (int64_t k = 0; k < H; ++k) wt[(E + k) * G + j] = static_cast<acc_t>(whh[j * H + k]);
    bias[j] = static_cast<acc_t>(bih[j]) + static_cast<acc_t>(bhh[j]);
  }
}

// The N samples of one step, split over the intra-op threads when there is enough work.
template <typename scalar_t, typename acc_t>
void run_gate(const GateArgs<scalar_t, acc_t>& args, int64_t N) {
  const int64_t C = args.C, E = args.E, H = args.H;
  const int64_t work = C * E + (E + H) * 4 * H + 32 * H;  // (a sigmoid/tanh counts as ~6)
  const int64_t grain =
      std::max<int64_t>(Lanes<acc_t>::kTile, kGateGrainWork / std::max<int64_t>(1, work));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    // 64-byte aligned: the alignment a vector type gets depends on the clone's target
    // (16 bytes for SSE2, 32 for AVX2), so alignof cannot be trusted here.
    using V = typename Lanes<acc_t>::V;
    thread_local std::vector<acc_t> scratch;  // reused: no allocation per step
    scratch.resize(static_cast<size_t>((gate_scratch_vectors(C, E, H) + 2) * Lanes<acc_t>::kTile));
    void* p = scratch.data();
    size_t space = scratch.size() * sizeof(acc_t);
    gate_rows<scalar_t, acc_t>(args, begin, end,
                               static_cast<V*>(std::align(64, sizeof(V), p, space)));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent_gate_step_cpu(
    const at::Tensor& pooled_, const at::Tensor& embed_w_, const at::Tensor& embed_b_,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& b_ih_,
    const at::Tensor& b_hh_, const at::Tensor& proj_w_, const at::Tensor& proj_b_,
    const at::Tensor& hx_, const at::Tensor& cx_) {
  // No copy (nor dispatcher call) for the usual, contiguous arguments.
  GateStepCall g(pooled_, embed_w_, embed_b_, w_ih_, w_hh_, b_ih_, b_hh_, proj_w_, proj_b_, hx_,
                 cx_);
  const int64_t N = g.N, C = g.C, E = g.E, H = g.H;
  if (N == 0) return g.outputs();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled_.scalar_type(),
                                  "dynexec_recurrent_gate_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wt, bias;  // once per call (4H x (E + H))
    transpose_lstm_weights<scalar_t, acc_t>(*g.w_ih, *g.w_hh, *g.b_ih, *g.b_hh, E, H, wt, bias);
    GateArgs<scalar_t, acc_t> args{
        g.pooled->const_data_ptr<scalar_t>(), g.embed_w->const_data_ptr<scalar_t>(),
        g.embed_b->const_data_ptr<scalar_t>(), wt.data(), bias.data(),
        g.proj_w->const_data_ptr<scalar_t>(),
        static_cast<acc_t>(g.proj_b->const_data_ptr<scalar_t>()[0]),
        g.hx->const_data_ptr<scalar_t>(), g.cx->const_data_ptr<scalar_t>(),
        g.prob.data_ptr<scalar_t>(), g.hx_new.data_ptr<scalar_t>(), g.cx_new.data_ptr<scalar_t>(),
        C, E, H};
    run_gate<scalar_t, acc_t>(args, N);
  });
  return g.outputs();
}

}  // namespace

namespace cpu {

PreparedGate::PreparedGate(const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                           const at::Tensor& b_hh, const at::Tensor& proj_w, const at::Tensor& proj_b) {
  TORCH_CHECK(w_hh.dim() == 2 && w_ih.dim() == 2, "PreparedGate: expected w_ih [4H, E] and w_hh [4H, H], got ",
              "shapes ", w_ih.sizes(), " and ", w_hh.sizes());
  H_ = w_hh.size(1);
  E_ = w_ih.size(1);
  const std::pair<const char*, const at::Tensor*> args[] = {{"w_ih", &w_ih}, {"w_hh", &w_hh}, {"b_ih", &b_ih},
                                                            {"b_hh", &b_hh}, {"proj_w", &proj_w}, {"proj_b", &proj_b}};
  const std::vector<int64_t> shapes[] = {{4 * H_, E_}, {4 * H_, H_}, {4 * H_}, {4 * H_}, {H_, 1}, {1}};
  for (size_t i = 0; i < 6; ++i) {
    const at::Tensor& t = *args[i].second;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.sizes().equals(shapes[i]),
                "PreparedGate: expected ", args[i].first, " float32 on CPU with shape ", at::IntArrayRef(shapes[i]),
                ", got ", t.scalar_type(), " on ", t.device(), " with shape ", t.sizes());
  }
  transpose_lstm_weights<float, float>(w_ih.contiguous(), w_hh.contiguous(), b_ih.contiguous(), b_hh.contiguous(),
                                       E_, H_, wt_, bias_);
  proj_w_ = proj_w.contiguous();
  proj_b_ = proj_b.item<float>();
}

void PreparedGate::step(const at::Tensor& pooled, const at::Tensor& embed_w, const at::Tensor& embed_b,
                        at::Tensor& hx, at::Tensor& cx, at::Tensor& prob) const {
  const int64_t N = pooled.size(0), C = pooled.size(1);
  TORCH_CHECK(pooled.scalar_type() == at::kFloat && pooled.is_contiguous() && embed_w.sizes().equals({C, E_}) &&
                  hx.sizes().equals({N, H_}) && cx.sizes().equals({N, H_}) && prob.numel() == N &&
                  hx.is_contiguous() && cx.is_contiguous() && prob.is_contiguous(),
              "PreparedGate.step: expected float32 contiguous pooled [N, ", embed_w.size(0), "], hx / cx [N, ", H_,
              "] and prob [N], got pooled ", pooled.sizes(), ", hx ", hx.sizes(), ", cx ", cx.sizes(), ", prob ",
              prob.sizes());
  if (N == 0) return;
  // gate_rows reads a tile's hx / cx before it writes the tile's new state: in place is safe.
  GateArgs<float, float> args{pooled.const_data_ptr<float>(), embed_w.const_data_ptr<float>(),
                              embed_b.const_data_ptr<float>(), wt_.data(), bias_.data(),
                              proj_w_.const_data_ptr<float>(), proj_b_, hx.const_data_ptr<float>(),
                              cx.const_data_ptr<float>(), prob.data_ptr<float>(), hx.data_ptr<float>(),
                              cx.data_ptr<float>(), C, E_, H_};
  run_gate<float, float>(args, N);
}

}  // namespace cpu
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("recurrent_gate_step", &dynexec::recurrent_gate_step_cpu);
}
