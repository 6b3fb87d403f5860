// CPU kernels of dynexec::winograd_weights and dynexec::conv3x3_winograd (see winograd_cpu.h).
#include "winograd_cpu.h"

#include "work_sharing.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <functional>
#include <vector>

#define DYNEXEC_AVX2 __attribute__((target("avx2,fma")))

namespace dynexec {
namespace cpu {
namespace {

constexpr int kTiles = 4;     // tiles per micro-kernel call: 4 x 2 accumulators, weights loaded once per 4 tiles
constexpr int kPositions = 16;  // a 4x4 transformed tile

// V[p][C] = B^T d B for the 4x4 input patch at (y0, x0) (zero outside the image);
// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
DYNEXEC_AVX2 void input_tile(const float* x, int64_t H, int64_t W, int64_t C, int64_t y0, int64_t x0, float* V) {
  const bool inside = y0 >= 0 && x0 >= 0 && y0 + 4 <= H && x0 + 4 <= W;
  for (int64_t c = 0; c < C; c += 8) {
    __m256 d[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = y0 + i, xx = x0 + j;
        d[i][j] = inside || (y >= 0 && y < H && xx >= 0 && xx < W) ? _mm256_loadu_ps(x + (y * W + xx) * C + c)
                                                                    : _mm256_setzero_ps();
      }
    }
    __m256 t[4][4];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
      t[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
      t[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
      t[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(V + (i * 4 + 0) * C + c, _mm256_sub_ps(t[i][0], t[i][2]));
      _mm256_storeu_ps(V + (i * 4 + 1) * C + c, _mm256_add_ps(t[i][1], t[i][2]));
      _mm256_storeu_ps(V + (i * 4 + 2) * C + c, _mm256_sub_ps(t[i][2], t[i][1]));
      _mm256_storeu_ps(V + (i * 4 + 3) * C + c, _mm256_sub_ps(t[i][1], t[i][3]));
    }
  }
}

// M[t][p][K] = V[t][p][C] @ U[p][C][K] for kTiles tiles: per position a [kTiles x C] x [C x K]
// product, 16 output channels at a time (8 accumulators).
DYNEXEC_AVX2 void tile_products(const float* V, const float* U, int64_t C, int64_t K, float* M) {
  for (int p = 0; p < kPositions; ++p) {
    const float* Up = U + p * C * K;
    for (int64_t oc = 0; oc < K; oc += 16) {
      __m256 acc[kTiles][2];
      for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      for (int64_t ic = 0; ic < C; ++ic) {
        const __m256 u0 = _mm256_loadu_ps(Up + ic * K + oc), u1 = _mm256_loadu_ps(Up + ic * K + oc + 8);
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

// The 2x2 output tile at (y0, x0) = A^T m A + bias (+ what is there) (then ReLU), clipped
// to the image; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. max(0, v) is torch's ReLU exactly:
// maxps returns its second operand for NaN and for 0 vs -0.0, so NaN and -0.0 are kept.
// With sums, sums[oc] += the tile's output pixels (in-image ones, in row-major order) as
// stored.
DYNEXEC_AVX2 void output_tile(const float* M, const float* bias, int64_t H, int64_t W, int64_t K, int64_t y0,
                              int64_t x0, bool accumulate, bool relu, float* out, float* sums) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t oc = 0; oc < K; oc += 8) {
    __m256 s[2][4];
    for (int j = 0; j < 4; ++j) {
      const __m256 m0 = _mm256_loadu_ps(M + (0 * 4 + j) * K + oc), m1 = _mm256_loadu_ps(M + (1 * 4 + j) * K + oc);
      const __m256 m2 = _mm256_loadu_ps(M + (2 * 4 + j) * K + oc), m3 = _mm256_loadu_ps(M + (3 * 4 + j) * K + oc);
      s[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
      s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
    }
    const __m256 b = _mm256_loadu_ps(bias + oc);
    __m256 tile_sum = zero;
    for (int i = 0; i < 2 && y0 + i < H; ++i) {
      const __m256 y[2] = {_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]), b),
                           _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), b)};
      for (int j = 0; j < 2 && x0 + j < W; ++j) {
        float* o = out + ((y0 + i) * W + x0 + j) * K + oc;
        const __m256 v = accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), y[j]) : y[j];
        const __m256 stored = relu ? _mm256_max_ps(zero, v) : v;
        _mm256_storeu_ps(o, stored);
        tile_sum = _mm256_add_ps(tile_sum, stored);
      }
    }
    if (sums) _mm256_storeu_ps(sums + oc, _mm256_add_ps(_mm256_loadu_ps(sums + oc), tile_sum));
  }
}

}  // namespace

bool winograd_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void winograd_weights_f32(const float* weight, int64_t C, int64_t K, float* U) {
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
          U[((i * 4 + j) * C + ic) * K + oc] = t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2];
        }
      }
    }
  }
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
  const int64_t tiles_w = (W + 1) / 2, tiles = ((H + 1) / 2) * tiles_w;
  const int64_t groups = winograd_tile_groups(H, W);
  if (n <= 0 || groups == 0) return;
  const std::function<void(int64_t, int64_t)> units = [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> V, M;  // reused: no allocation per call once grown
    V.resize(kTiles * kPositions * C);
    M.resize(kTiles * kPositions * K);
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t img = unit / groups, t0 = (unit % groups) * kTiles;
      const float* xi = x + img * H * W * C;
      float* oi = out + img * H * W * K;
      const int64_t count = std::min<int64_t>(kTiles, tiles - t0);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t ty = (t0 + t) / tiles_w, tx = (t0 + t) % tiles_w;
        input_tile(xi, H, W, C, 2 * ty - 1, 2 * tx - 1, V.data() + t * kPositions * C);
      }
      // the last group of an image may be short: its unused tiles compute zeros
      std::fill(V.begin() + count * kPositions * C, V.begin() + kTiles * kPositions * C, 0.0f);
      tile_products(V.data(), U, C, K, M.data());
      float* sums = group_sums ? group_sums + unit * K : nullptr;  // (unit = img * groups + group)
      if (sums) std::fill(sums, sums + K, 0.0f);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t ty = (t0 + t) / tiles_w, tx = (t0 + t) % tiles_w;
        output_tile(M.data() + t * kPositions * K, bias, H, W, K, 2 * ty, 2 * tx, accumulate, relu, oi, sums);
      }
    }
  };
  if (has_help_desk()) {
    // A BlockLoop shard's worker: idle workers may take chunks of ~5 us (fewer units the
    // more channels a unit has).
    run_units(n * groups, std::max<int64_t>(1, 2048 / (C * K)), units);
  } else {
    // Inside another parallel region this runs inline on the calling thread.
    at::parallel_for(0, n * groups, /*grain_size=*/16, units);
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
  const at::Tensor weight = weight_.contiguous();
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor U = at::empty({16, C, K}, weight.options());
  cpu::winograd_weights_f32(weight.const_data_ptr<float>(), C, K, U.data_ptr<float>());
  return U;
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_, const at::Tensor& U_, const at::Tensor& bias_) {
  check_supported("conv3x3_winograd");
  TORCH_CHECK(U_.scalar_type() == at::kFloat && U_.dim() == 3 && U_.size(0) == 16 &&
                  cpu::winograd_channels_ok(U_.size(1), U_.size(2)),
              "dynexec::conv3x3_winograd: expected transformed weights [16, C, K] from winograd_weights, got ",
              U_.scalar_type(), " with shape ", U_.sizes());
  const int64_t C = U_.size(1), K = U_.size(2);
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
