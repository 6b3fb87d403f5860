// CPU kernels of dynexec::winograd_weights and dynexec::conv3x3_winograd (see winograd_cpu.h).
#include "winograd_cpu.h"

#include "work_sharing.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#define DYNEXEC_AVX2 __attribute__((target("avx2,fma")))
#define DYNEXEC_AVX512 __attribute__((target("avx512f,fma")))

namespace dynexec {
namespace cpu {
namespace {

constexpr int kTiles = 4;     // tiles per micro-kernel call: 4 x 2 accumulators, weights loaded once per 4 tiles
constexpr int kPositions = 16;  // a 4x4 transformed tile

#define DYNEXEC_AVX2_INLINE DYNEXEC_AVX2 inline __attribute__((always_inline))

// Where U[position p][input channel ic][output channel oc] is in U's blocked layout
// [16][K / 16][C][16] (winograd_cpu.h); one definition for the weights' writer and the
// tile products' reader.
inline int64_t u_index(int p, int64_t ic, int64_t oc, int64_t C, int64_t K) {
  return (p * K + oc / 16 * 16) * C + ic * 16 + oc % 16;
}

// Positions (r, 0..3) of V = B^T d B from row r of t = B^T d; B^T = [[1, 0, -1, 0],
// [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] (V: the first of 16 positions C floats apart).
DYNEXEC_AVX2_INLINE void store_transformed_row(float* V, int64_t C, int r, __m256 t0, __m256 t1, __m256 t2,
                                               __m256 t3) {
  _mm256_storeu_ps(V + (r * 4 + 0) * C, _mm256_sub_ps(t0, t2));
  _mm256_storeu_ps(V + (r * 4 + 1) * C, _mm256_add_ps(t1, t2));
  _mm256_storeu_ps(V + (r * 4 + 2) * C, _mm256_sub_ps(t2, t1));
  _mm256_storeu_ps(V + (r * 4 + 3) * C, _mm256_sub_ps(t1, t3));
}

// B^T d B for 8 channels of a 4x4 patch whose pixel (i, j) is at d + i * row + j * px.
// Row by row of t, reloading d from L1 rather than holding all 16 vectors: 16 live vectors
// would spill to the stack, which cost more than the reloads.
DYNEXEC_AVX2_INLINE void transform_patch8(const float* d, int64_t px, int64_t row, float* V, int64_t C) {
  const float *d0 = d, *d1 = d + row, *d2 = d + 2 * row, *d3 = d + 3 * row;
  store_transformed_row(V, C, 0, _mm256_sub_ps(_mm256_loadu_ps(d0), _mm256_loadu_ps(d2)),
                        _mm256_sub_ps(_mm256_loadu_ps(d0 + px), _mm256_loadu_ps(d2 + px)),
                        _mm256_sub_ps(_mm256_loadu_ps(d0 + 2 * px), _mm256_loadu_ps(d2 + 2 * px)),
                        _mm256_sub_ps(_mm256_loadu_ps(d0 + 3 * px), _mm256_loadu_ps(d2 + 3 * px)));
  {
    const __m256 a0 = _mm256_loadu_ps(d1), a1 = _mm256_loadu_ps(d1 + px);
    const __m256 a2 = _mm256_loadu_ps(d1 + 2 * px), a3 = _mm256_loadu_ps(d1 + 3 * px);
    const __m256 b0 = _mm256_loadu_ps(d2), b1 = _mm256_loadu_ps(d2 + px);
    const __m256 b2 = _mm256_loadu_ps(d2 + 2 * px), b3 = _mm256_loadu_ps(d2 + 3 * px);
    store_transformed_row(V, C, 1, _mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                          _mm256_add_ps(a3, b3));
    store_transformed_row(V, C, 2, _mm256_sub_ps(b0, a0), _mm256_sub_ps(b1, a1), _mm256_sub_ps(b2, a2),
                          _mm256_sub_ps(b3, a3));
  }
  store_transformed_row(V, C, 3, _mm256_sub_ps(_mm256_loadu_ps(d1), _mm256_loadu_ps(d3)),
                        _mm256_sub_ps(_mm256_loadu_ps(d1 + px), _mm256_loadu_ps(d3 + px)),
                        _mm256_sub_ps(_mm256_loadu_ps(d1 + 2 * px), _mm256_loadu_ps(d3 + 2 * px)),
                        _mm256_sub_ps(_mm256_loadu_ps(d1 + 3 * px), _mm256_loadu_ps(d3 + 3 * px)));
}

// V[p][C] = B^T d B for the 4x4 input patch at (y0, x0) (zero outside the image). Patches
// inside the image are read in place; the others are copied, zero-padded, 8 channels at a
// time into a 4x4x8 patch first.
DYNEXEC_AVX2_INLINE void input_tile(const float* x, int64_t H, int64_t W, int64_t C, int64_t y0, int64_t x0,
                                    float* V) {
  if (y0 >= 0 && x0 >= 0 && y0 + 4 <= H && x0 + 4 <= W) {
    const float* d = x + (y0 * W + x0) * C;
    for (int64_t c = 0; c < C; c += 8) transform_patch8(d + c, C, W * C, V + c, C);
    return;
  }
  bool row_in[4], col_in[4];
  for (int i = 0; i < 4; ++i) {
    row_in[i] = y0 + i >= 0 && y0 + i < H;
    col_in[i] = x0 + i >= 0 && x0 + i < W;
  }
  alignas(32) float patch[4][4][8];
  for (int64_t c = 0; c < C; c += 8) {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        _mm256_store_ps(patch[i][j], row_in[i] && col_in[j]
                                         ? _mm256_loadu_ps(x + ((y0 + i) * W + x0 + j) * C + c)
                                         : _mm256_setzero_ps());
      }
    }
    transform_patch8(&patch[0][0][0], 8, 32, V + c, C);
  }
}

// M[t][p][K] = V[t][p][C] @ U[p] for kTiles tiles: per position a [kTiles x C] x [C x K]
// product, 16 output channels at a time (8 accumulators), reading U in its memory order:
// one sequential stream (see the layout in winograd_cpu.h).
DYNEXEC_AVX2 void tile_products(const float* V, const float* U, int64_t C, int64_t K, float* M) {
  for (int p = 0; p < kPositions; ++p) {
    for (int64_t oc = 0; oc < K; oc += 16) {
      const float* Ub = U + u_index(p, 0, oc, C, K);  // [C][16] (oc: a multiple of 16)
      __m256 acc[kTiles][2];
      for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      for (int64_t ic = 0; ic < C; ++ic) {
        const float* u = Ub + ic * 16;
        const __m256 u0 = _mm256_loadu_ps(u), u1 = _mm256_loadu_ps(u + 8);
        for (int t = 0; t < kTiles; ++t) {
          const __m256 v = _mm256_broadcast_ss(V + (t * kPositions + p) * C + ic);
          acc[t][0] = _mm256_fmadd_ps(v, u0, acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(v, u1, acc[t][1]);
        }
      }
      for (int t = 0; t < kTiles; ++t) {
        _mm256_storeu_ps(M + (t * kPositions + p) * K + oc, acc[t][0]);
        _mm256_storeu_ps(M + (t * kPositions + p) * K + oc + 8, acc[t][1]);
      }
    }
  }
}

// One pass of tile_products_avx512: kBlocks (1 or 2) blocks of 16 output channels from oc,
// for kTiles tiles at position p, a register per (tile, block).
template <int kBlocks>
DYNEXEC_AVX512 inline __attribute__((always_inline)) void products_pass_avx512(const float* V, const float* U,
                                                                              int p, int64_t oc, int64_t C,
                                                                              int64_t K, float* M) {
  const float* Ub = U + u_index(p, 0, oc, C, K);  // block b: [C][16] at Ub + b * 16 * C
  __m512 acc[kTiles][kBlocks];
  for (int t = 0; t < kTiles; ++t) {
    for (int b = 0; b < kBlocks; ++b) acc[t][b] = _mm512_setzero_ps();
  }
  for (int64_t ic = 0; ic < C; ++ic) {
    __m512 u[kBlocks];
    for (int b = 0; b < kBlocks; ++b) u[b] = _mm512_loadu_ps(Ub + (b * C + ic) * 16);
    for (int t = 0; t < kTiles; ++t) {
      const __m512 v = _mm512_set1_ps(V[(t * kPositions + p) * C + ic]);
      for (int b = 0; b < kBlocks; ++b) acc[t][b] = _mm512_fmadd_ps(v, u[b], acc[t][b]);
    }
  }
  for (int t = 0; t < kTiles; ++t) {
    for (int b = 0; b < kBlocks; ++b) _mm512_storeu_ps(M + (t * kPositions + p) * K + oc + 16 * b, acc[t][b]);
  }
}

// tile_products with AVX-512: a register holds a block's 16 output channels, and a pass
// does two blocks (32 channels: 4 tiles x 2 accumulators, as above) while K allows, then
// one. Every output lane gets the same multiply-adds in the same order as in
// tile_products, so the two give bit-identical results; this one runs 4-12 % faster
// (2 of 32 output channels per weight load instead of 1 of 16 per two loads; measured
// on the project's AVX-512 host, single thread, warm data: 48-53 -> 50-57 GMAC/s).
DYNEXEC_AVX512 void tile_products_avx512(const float* V, const float* U, int64_t C, int64_t K, float* M) {
  for (int p = 0; p < kPositions; ++p) {
    int64_t oc = 0;
    for (; oc + 32 <= K; oc += 32) products_pass_avx512<2>(V, U, p, oc, C, K, M);
    if (oc < K) products_pass_avx512<1>(V, U, p, oc, C, K, M);  // K % 32 == 16: the last block alone
  }
}

using TileProducts = void (*)(const float* V, const float* U, int64_t C, int64_t K, float* M);

// The tile products for this CPU, chosen once: AVX-512 when it has it, unless the
// environment variable DYNEXEC_WINOGRAD_ISA says otherwise ("avx2": force the AVX2 code,
// e.g. to compare the two; "avx512": require it; "auto" or unset: the default). A bad
// setting is a clear error wherever the choice is used.
struct ProductsChoice {
  TileProducts fn = nullptr;
  const char* isa = "";
  std::string error;
};

const ProductsChoice& products_choice() {
  static const ProductsChoice choice = [] {
    ProductsChoice c;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    const char* env = std::getenv("DYNEXEC_WINOGRAD_ISA");
    const std::string want = env ? env : "auto";
    if (want == "avx2" || (want == "auto" && !avx512)) {
      c.fn = &tile_products;
      c.isa = "avx2";
    } else if (want == "avx512" || want == "auto") {
      c.fn = &tile_products_avx512;
      c.isa = "avx512";
      if (!avx512) c.error = "DYNEXEC_WINOGRAD_ISA=avx512, but this CPU has no AVX-512";
    } else {
      c.error = "DYNEXEC_WINOGRAD_ISA: expected auto, avx2 or avx512, got '" + want + "'";
    }
    return c;
  }();
  TORCH_CHECK(choice.error.empty(), "dynexec: ", choice.error);
  return choice;
}

// One output pixel's 8 channels: y (+ what is there) (then ReLU), stored; returns what was
// stored. max(0, v) is torch's ReLU exactly: maxps returns its second operand for NaN and
// for 0 vs -0.0, so NaN and -0.0 are kept.
template <bool kAccumulate, bool kRelu>
DYNEXEC_AVX2_INLINE __m256 store_pixel(float* o, __m256 y) {
  const __m256 v = kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(o), y) : y;
  const __m256 stored = kRelu ? _mm256_max_ps(_mm256_setzero_ps(), v) : v;
  _mm256_storeu_ps(o, stored);
  return stored;
}

// The 2x2 output tile at (y0, x0) = A^T m A + bias (+ what is there) (then ReLU), clipped
// to the image; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. With sums, sums[oc] += the tile's
// output pixels (in-image ones, in row-major order) as stored.
template <bool kAccumulate, bool kRelu>
DYNEXEC_AVX2_INLINE void output_tile(const float* M, const float* bias, int64_t H, int64_t W, int64_t K,
                                     int64_t y0, int64_t x0, float* out, float* sums) {
  const bool full = y0 + 1 < H && x0 + 1 < W;  // all 4 pixels in the image (the common case)
  for (int64_t oc = 0; oc < K; oc += 8) {
    __m256 s[2][4];
    for (int j = 0; j < 4; ++j) {
      const __m256 m0 = _mm256_loadu_ps(M + (0 * 4 + j) * K + oc), m1 = _mm256_loadu_ps(M + (1 * 4 + j) * K + oc);
      const __m256 m2 = _mm256_loadu_ps(M + (2 * 4 + j) * K + oc), m3 = _mm256_loadu_ps(M + (3 * 4 + j) * K + oc);
      s[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
      s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
    }
    const __m256 b = _mm256_loadu_ps(bias + oc);
    __m256 y[2][2];
    for (int i = 0; i < 2; ++i) {
      y[i][0] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]), b);
      y[i][1] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), b);
    }
    float* o = out + (y0 * W + x0) * K + oc;
    __m256 tile_sum = _mm256_setzero_ps();
    if (full) {
      tile_sum = _mm256_add_ps(tile_sum, store_pixel<kAccumulate, kRelu>(o, y[0][0]));
      tile_sum = _mm256_add_ps(tile_sum, store_pixel<kAccumulate, kRelu>(o + K, y[0][1]));
      tile_sum = _mm256_add_ps(tile_sum, store_pixel<kAccumulate, kRelu>(o + W * K, y[1][0]));
      tile_sum = _mm256_add_ps(tile_sum, store_pixel<kAccumulate, kRelu>(o + W * K + K, y[1][1]));
    } else {
      for (int i = 0; i < 2 && y0 + i < H; ++i) {
        for (int j = 0; j < 2 && x0 + j < W; ++j) {
          tile_sum = _mm256_add_ps(tile_sum, store_pixel<kAccumulate, kRelu>(o + (i * W + j) * K, y[i][j]));
        }
      }
    }
    if (sums) _mm256_storeu_ps(sums + oc, _mm256_add_ps(_mm256_loadu_ps(sums + oc), tile_sum));
  }
}

// `floats` floats of `buffer` starting at a 64-byte boundary.
inline float* aligned_buffer(std::vector<float>& buffer, int64_t floats) {
  buffer.resize(floats + 16);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// Work units lo..hi of winograd_conv3x3_nhwc_f32 (unit = img * groups + group) on this thread.
template <bool kAccumulate, bool kRelu>
DYNEXEC_AVX2 void run_tile_groups(TileProducts products, const float* x, int64_t H, int64_t W, int64_t C, int64_t K,
                                   const float* U, const float* bias, float* out, float* group_sums, int64_t groups,
                                   int64_t lo, int64_t hi) {
  // Per-thread buffers, reused (no allocation per call once grown), 64-byte aligned so that
  // no vector store into them splits a cache line.
  thread_local std::vector<float> V_buffer, M_buffer;
  float* const V = aligned_buffer(V_buffer, kTiles * kPositions * C);
  float* const M = aligned_buffer(M_buffer, kTiles * kPositions * K);
  const int64_t tiles_w = (W + 1) / 2, tiles = ((H + 1) / 2) * tiles_w;
  for (int64_t unit = lo; unit < hi; ++unit) {
    const int64_t img = unit / groups, t0 = (unit % groups) * kTiles;
    const float* xi = x + img * H * W * C;
    float* oi = out + img * H * W * K;
    const int64_t count = std::min<int64_t>(kTiles, tiles - t0);
    const int64_t ty0 = t0 / tiles_w, tx0 = t0 % tiles_w;
    for (int64_t t = 0, ty = ty0, tx = tx0; t < count; ++t) {
      input_tile(xi, H, W, C, 2 * ty - 1, 2 * tx - 1, V + t * kPositions * C);
      if (++tx == tiles_w) tx = 0, ++ty;
    }
    // the last group of an image may be short: its unused tiles compute zeros
    std::fill(V + count * kPositions * C, V + kTiles * kPositions * C, 0.0f);
    products(V, U, C, K, M);
    float* sums = group_sums ? group_sums + unit * K : nullptr;
    if (sums) std::fill(sums, sums + K, 0.0f);
    for (int64_t t = 0, ty = ty0, tx = tx0; t < count; ++t) {
      output_tile<kAccumulate, kRelu>(M + t * kPositions * K, bias, H, W, K, 2 * ty, 2 * tx, oi, sums);
      if (++tx == tiles_w) tx = 0, ++ty;
    }
  }
}

}  // namespace

bool winograd_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

std::string winograd_isa() { return winograd_supported() ? products_choice().isa : ""; }

namespace {

void fill_transformed_weights(const float* weight, int64_t C, int64_t K, float* U) {
  // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]; U = G g G^T
  static const float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  for (int64_t oc = 0; oc < K; ++oc) {
    for (int64_t ic = 0; ic < C; ++ic) {
      const float* g = weight + (oc * C + ic) * 9;
      float t[4][3];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[j] + G[i][1] * g[3 + j] + G[i][2] * g[6 + j];
      }
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          U[u_index(i * 4 + j, ic, oc, C, K)] = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
        }
      }
    }
  }
}

}  // namespace

at::Tensor transformed_weights(const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor U = at::empty({16, K / 16, C, 16}, weight.options());
  fill_transformed_weights(weight.const_data_ptr<float>(), C, K, U.data_ptr<float>());
  return U;
}

int64_t winograd_tile_groups(int64_t H, int64_t W) {
  const int64_t tiles = ((H + 1) / 2) * ((W + 1) / 2);
  return (tiles + kTiles - 1) / kTiles;
}

void winograd_group_means(const float* group_sums, int64_t n, int64_t H, int64_t W, int64_t K, float* pooled,
                          const int64_t* rows) {
  const int64_t groups = winograd_tile_groups(H, W);
  for (int64_t r = 0; r < n; ++r) {
    float* p = pooled + (rows ? rows[r] : r) * K;
    const float* g = group_sums + r * groups * K;
    std::copy(g, g + K, p);
    for (int64_t u = 1; u < groups; ++u) {
      for (int64_t k = 0; k < K; ++k) p[k] += g[u * K + k];
    }
    for (int64_t k = 0; k < K; ++k) p[k] = p[k] / static_cast<float>(H * W);
  }
}

void winograd_conv3x3_nhwc_f32(const float* x, int64_t n, int64_t H, int64_t W, int64_t C, int64_t K,
                               const float* U, const float* bias, bool accumulate, bool relu, float* out,
                               float* group_sums) {
  // Work units: groups of kTiles consecutive tiles of one image (row-major tile order).
  const int64_t groups = winograd_tile_groups(H, W);
  if (n <= 0 || groups == 0) return;
  const TileProducts products = products_choice().fn;
  const auto run = accumulate ? (relu ? &run_tile_groups<true, true> : &run_tile_groups<true, false>)
                              : (relu ? &run_tile_groups<false, true> : &run_tile_groups<false, false>);
  const std::function<void(int64_t, int64_t)> units = [&](int64_t lo, int64_t hi) {
    run(products, x, H, W, C, K, U, bias, out, group_sums, groups, lo, hi);
  };
  // Chunks of ~5 us: fewer units the more channels a unit has.
  const int64_t chunk = std::max<int64_t>(1, 2048 / (C * K));
  if (has_help_desk()) {
    // A BlockLoop shard's worker: idle workers may take chunks.
    run_units(n * groups, chunk, units);
  } else {
    // Inside another parallel region this runs inline on the calling thread. (A fixed
    // grain of 16 units would run a 64-channel 8x8 convolution on up to 4 images on one
    // thread.)
    at::parallel_for(0, n * groups, chunk, units);
  }
}

}  // namespace cpu

namespace {

void check_supported(const char* op) {
  TORCH_CHECK(cpu::winograd_supported(), "dynexec::", op, ": needs a CPU with AVX2 and FMA; this one has not");
}

at::Tensor winograd_weights_cpu(const at::Tensor& weight_) {
  check_supported("winograd_weights");
  TORCH_CHECK(weight_.scalar_type() == at::kFloat && weight_.dim() == 4 && weight_.size(2) == 3 &&
                  weight_.size(3) == 3 && cpu::winograd_channels_ok(weight_.size(1), weight_.size(0)),
              "dynexec::winograd_weights: expected a float32 weight [K, C, 3, 3] with C a multiple of 8 and K a "
              "multiple of 16, got ", weight_.scalar_type(), " with shape ", weight_.sizes());
  return cpu::transformed_weights(weight_.contiguous());
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_, const at::Tensor& U_, const at::Tensor& bias_) {
  check_supported("conv3x3_winograd");
  TORCH_CHECK(U_.scalar_type() == at::kFloat && U_.dim() == 4 && U_.size(0) == 16 && U_.size(3) == 16 &&
                  cpu::winograd_channels_ok(U_.size(2), U_.size(1) * 16),
              "dynexec::conv3x3_winograd: expected transformed weights [16, K / 16, C, 16] from winograd_weights, "
              "got ", U_.scalar_type(), " with shape ", U_.sizes());
  const int64_t C = U_.size(2), K = U_.size(1) * 16;
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.dim() == 4 && x_.size(1) == C,
              "dynexec::conv3x3_winograd: expected a float32 input [N, ", C, ", H, W], got ", x_.scalar_type(),
              " with shape ", x_.sizes());
  TORCH_CHECK(bias_.scalar_type() == at::kFloat && bias_.dim() == 1 && bias_.size(0) == K,
              "dynexec::conv3x3_winograd: expected a float32 bias [", K, "], got ", bias_.scalar_type(),
              " with shape ", bias_.sizes());
  const at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor U = U_.contiguous(), bias = bias_.contiguous();
  const int64_t n = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({n, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  cpu::winograd_conv3x3_nhwc_f32(xp, n, H, W, C, K, U.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                 /*accumulate=*/false, /*relu=*/false, op);
  return out;
}

}  // namespace
}  // namespace dynexec

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("winograd_weights", &dynexec::winograd_weights_cpu);
  m.impl("conv3x3_winograd", &dynexec::conv3x3_winograd_cpu);
}
