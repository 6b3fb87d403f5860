// Winograd F(2x2, 3x3) convolution for float32 NHWC activations on x86 CPUs with AVX2 and
// FMA: 3x3 kernel, stride 1, padding 1 (the residual branches of CIFAR ResNets).
//
// Why: a direct 3x3 convolution (oneDNN's brgconv) does 9 * C * K multiply-adds per output
// pixel; F(2x2, 3x3) computes a 2x2 output tile from a 4x4 input tile with 16 * C * K
// multiply-adds in the transformed domain (2.25x fewer) plus the tile transforms, whose
// cost grows with C + K rather than C * K, so it pays most at 32 and 64 channels (at 16 a
// SkipNet-110 stage takes about 1.2x the time of a 32-channel stage with the same FLOPs;
// `python benchmarks/kernels.py --device cpu --sections winograd` times it against
// oneDNN's brgconv per geometry). Against a float64
// convolution it stays within 1e-5 (tests/test_winograd.py); measured, its error was no
// larger than F.conv2d's in float32 on the same data.
//
// Layout of the transformed weights U: [16][K / 16][C][16] (position p = 4 * i + j of the
// 4x4 tile, block of 16 output channels, input channel, output channel in the block), built
// once by transformed_weights. The tile products read it in this order, one sequential
// stream that the hardware prefetchers follow: a call's first tile group finds U in L3 (a
// network's transformed weights do not fit L2), and with [16][C][K] (two blocks of 16
// output channels interleaved per input channel) a 64-channel convolution on 4-16 images
// took 30-34 us longer per call with cold weights than with warm ones, 12-17 us with this
// layout (single thread).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace dynexec {
namespace cpu {

// True when this CPU runs the kernels below (AVX2 and FMA).
bool winograd_supported();

// The instruction set of the tile products: "avx512" or "avx2" (both give bit-identical
// results; the environment variable DYNEXEC_WINOGRAD_ISA=auto|avx2|avx512, read once,
// overrides the choice), "" without winograd_supported(). A bad DYNEXEC_WINOGRAD_ISA is an
// error here and in every kernel call.
std::string winograd_isa();

// The channel counts the kernels take: C input channels a multiple of 8 (one AVX2 vector per
// step of the input transform), K output channels a multiple of 16 (two per accumulator pair).
inline bool winograd_channels_ok(int64_t C, int64_t K) { return C > 0 && K > 0 && C % 8 == 0 && K % 16 == 0; }

// U [16, K / 16, C, 16] from a contiguous float32 weight [K, C, 3, 3] with
// winograd_channels_ok(C, K) (checked by the callers).
at::Tensor transformed_weights(const at::Tensor& weight);

// out[n] = conv3x3(x[n]) + bias (+ out[n] when accumulate) for n images of H x W x C
// (NHWC-dense) into H x W x K, then ReLU when relu (torch's: NaN and -0.0 kept);
// C % 8 == 0 and K % 16 == 0 (checked by the callers).
// Parallel over groups of tiles with ATen's intra-op threads; inside a BlockLoop shard's
// worker, on that thread and on idle workers that help it (work_sharing.h); inline inside
// any other parallel region.
// With group_sums ([n, winograd_tile_groups(H, W), K]), also the sums of the stored output
// per group of tiles (the kernel's unit of work), for a spatial mean in one fixed order
// whichever threads run the groups: winograd_group_means.
void winograd_conv3x3_nhwc_f32(const float* x, int64_t n, int64_t H, int64_t W, int64_t C, int64_t K,
                               const float* U, const float* bias, bool accumulate, bool relu, float* out,
                               float* group_sums = nullptr);

// The number of tile groups of an H x W output (group_sums' middle dimension).
int64_t winograd_tile_groups(int64_t H, int64_t W);

// pooled[rows ? rows[r] : r, k] = (the sum of group_sums[r, :, k] in group order) / (H * W)
// for r < n: the means of the output the kernel stored (pooled: rows of K floats).
void winograd_group_means(const float* group_sums, int64_t n, int64_t H, int64_t W, int64_t K, float* pooled,
                          const int64_t* rows = nullptr);

}  // namespace cpu
}  // namespace dynexec
