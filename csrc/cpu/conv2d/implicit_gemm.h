// The implicit GEMM for few output channels (8-64, small maps: path.h), forward and weight
// gradient. With 8-32 output channels the image path's GEMM is a thin [O, K] x [K, n] product
// that a BLAS runs at half speed, after an im2col that costs as much again. Here the product
// reads the image directly: each output position's K inputs come from the image's plane copy
// through an offset table (the gather table spread over the channels), and the accumulators
// are output channels, so the weights are read as contiguous vectors of a block of channels
// and every input value is one broadcast. The forward keeps 128 / block positions x block
// channels of sums in registers; the weight gradient keeps 128 / block taps x block channels,
// streaming dY transposed to [L, O]. The input gradient reads that same copy of dY
// (transposed_input_grad.h) or goes through the image path's GEMM and gather.
// Floor: one 16-lane fp32 FMA per cycle per core; the AVX-512 kernels reach 184-206 GFLOP/s
// on two cores (docs/performance-notes.md), the rest is the plane copy and the re-layouts.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../../conv2d.h"
#include "../packed_gemm.h"
#include "path.h"
#include "relayout.h"
#include "simd.h"

namespace convkit::cpu_conv2d {

constexpr int kImplicitAccumulators = 128;  // sums kept in registers per step (8 zmm of float)

// Positions (forward) or taps (weight gradient) per step of the AVX-512 float kernels: 8 for
// blocks of 16-32 channels, 4 for 64 (four zmm of float, where 4 positions already give 16
// independent sums). The padded sizes are multiples of this and of the generic kernels'
// kImplicitAccumulators / block.
constexpr int64_t implicit_step(int64_t block) {
  return block == 64 ? 4 : std::max<int64_t>(kImplicitAccumulators / block, 8);
}

struct ImplicitGemmLayout {
  int64_t block;     // output channels per vector block: 8, 16 or 32
  int64_t padded_o;  // O rounded up to the block
  int64_t padded_l;  // L rounded up to kImplicitAccumulators / block positions
  int64_t padded_k;  // K rounded up to kImplicitAccumulators / block taps
  std::vector<int32_t> offsets;  // [padded_l, padded_k] into the plane copy; pads read a zero
};

inline ImplicitGemmLayout make_implicit_gemm_layout(const Conv2dGeometry& g, const GatherTable& table) {
  ImplicitGemmLayout d;
  const int64_t O = g.out_channels;
  d.block = O <= 8 ? 8 : (O <= 16 ? 16 : (O <= 32 ? 32 : 64));
  d.padded_o = (O + d.block - 1) / d.block * d.block;
  const int64_t step = implicit_step(d.block);
  const int64_t L = g.out_area();
  const int64_t K = g.column_rows();
  const int64_t kA = g.kernel_area();
  d.padded_l = (L + step - 1) / step * step;
  d.padded_k = (K + step - 1) / step * step;
  const int32_t zero = static_cast<int32_t>(g.in_area());  // plane 0's trailing zero
  d.offsets.assign(d.padded_l * d.padded_k, zero);
  // Row k = c * kA + r, walked as (c, r): no division per entry (it would be a quarter of a
  // small call's fixed cost).
  const int64_t C = g.in_channels;
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* taps = table.offsets.data() + l * kA;
    int32_t* row = d.offsets.data() + l * d.padded_k;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t plane = static_cast<int32_t>(c * table.plane_stride);
      for (int64_t r = 0; r < kA; ++r) row[c * kA + r] = plane + taps[r];
    }
  }
  return d;
}

// out_t[l, o] = sum_k planes[offsets[l, k]] * weight_t[k, o] for the padded [L, O] tile.
#if defined(__AVX512F__)
// The float kernels for blocks of 16, 32 and 64 channels (1, 2 or 4 zmm) with 8, 8 or 4
// positions per step (8-16 accumulators). Written with intrinsics because GCC folds the
// weight loads of the generic loop into every FMA (8 zmm loads for 8 FMAs with 4 positions of
// 32 channels, where a core loads one or two a cycle): a step loads its weights once.
// Positions l0 .. l0 + Positions - 1 of one block of 16 * Vectors channels.
template <int Vectors, int Positions>
inline void implicit_forward_step_avx512(const float* __restrict planes, const ImplicitGemmLayout& d,
                                         int64_t K, const float* __restrict weight_t, int64_t o0,
                                         int64_t l0, float* __restrict out_t) {
  __m512 acc[Positions][Vectors];
  for (int p = 0; p < Positions; ++p) {
    for (int v = 0; v < Vectors; ++v) acc[p][v] = _mm512_setzero_ps();
  }
  const int32_t* __restrict offsets = d.offsets.data() + l0 * d.padded_k;
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[Vectors];
    for (int v = 0; v < Vectors; ++v) {
      w[v] = _mm512_loadu_ps(weight_t + k * d.padded_o + o0 + 16 * v);
      keep_in_register(w[v]);
    }
    for (int p = 0; p < Positions; ++p) {
      const __m512 x = _mm512_set1_ps(planes[offsets[p * d.padded_k + k]]);
      for (int v = 0; v < Vectors; ++v) acc[p][v] = _mm512_fmadd_ps(x, w[v], acc[p][v]);
    }
  }
  for (int p = 0; p < Positions; ++p) {
    for (int v = 0; v < Vectors; ++v) {
      _mm512_storeu_ps(out_t + (l0 + p) * d.padded_o + o0 + 16 * v, acc[p][v]);
    }
  }
}

// Full steps, then the last L % Positions positions in a step of their own, instead of
// computing padded positions (the 8->16 layer: 49 positions, 56 computed).
template <int Vectors>
void implicit_forward_image_avx512(const float* __restrict planes, const ImplicitGemmLayout& d,
                                   int64_t K, int64_t L, const float* __restrict weight_t,
                                   float* __restrict out_t) {
  constexpr int Positions = implicit_step(16 * Vectors);
  const int64_t full = L / Positions * Positions;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += 16 * Vectors) {
    for (int64_t l0 = 0; l0 < full; l0 += Positions) {
      implicit_forward_step_avx512<Vectors, Positions>(planes, d, K, weight_t, o0, l0, out_t);
    }
    if (full < L) {
      with_positions(L - full, [&](auto positions) {
        implicit_forward_step_avx512<Vectors, decltype(positions)::value>(planes, d, K, weight_t,
                                                                        o0, full, out_t);
      });
    }
  }
}

template <int Vectors>
void implicit_weight_grad_image_avx512(const float* __restrict planes, int64_t plane_stride,
                                       int64_t images, const ImplicitGemmLayout& d, int64_t L,
                                       const float* __restrict dy_t, int64_t dy_stride,
                                       float* __restrict weight_grad_t) {
  constexpr int Taps = implicit_step(16 * Vectors);
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += 16 * Vectors) {
    for (int64_t k0 = 0; k0 < d.padded_k; k0 += Taps) {
      __m512 acc[Taps][Vectors];
      for (int t = 0; t < Taps; ++t) {
        for (int v = 0; v < Vectors; ++v) acc[t][v] = _mm512_setzero_ps();
      }
      for (int64_t image = 0; image < images; ++image) {
        const float* __restrict image_planes = planes + image * plane_stride;
        const float* __restrict image_dy = dy_t + image * dy_stride;
        for (int64_t l = 0; l < L; ++l) {
          __m512 dy[Vectors];
          for (int v = 0; v < Vectors; ++v) {
            dy[v] = _mm512_loadu_ps(image_dy + l * d.padded_o + o0 + 16 * v);
            keep_in_register(dy[v]);
          }
          const int32_t* __restrict offsets = d.offsets.data() + l * d.padded_k + k0;
          for (int t = 0; t < Taps; ++t) {
            const __m512 x = _mm512_set1_ps(image_planes[offsets[t]]);
            for (int v = 0; v < Vectors; ++v) acc[t][v] = _mm512_fmadd_ps(x, dy[v], acc[t][v]);
          }
        }
      }
      for (int t = 0; t < Taps; ++t) {
        for (int v = 0; v < Vectors; ++v) {
          float* total = weight_grad_t + (k0 + t) * d.padded_o + o0 + 16 * v;
          _mm512_storeu_ps(total, _mm512_add_ps(_mm512_loadu_ps(total), acc[t][v]));
        }
      }
    }
  }
}
#endif

template <typename acc_t, int Block>
void implicit_forward_image(const acc_t* __restrict planes, const ImplicitGemmLayout& d, int64_t K,
                            int64_t L, const acc_t* __restrict weight_t, acc_t* __restrict out_t) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && Block >= 16) {
    implicit_forward_image_avx512<Block / 16>(planes, d, K, L, weight_t, out_t);
    return;
  }
#endif
  // Generic (double, and float without AVX-512): the padded positions are computed too.
  constexpr int Positions = kImplicitAccumulators / Block;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += Block) {
    for (int64_t l0 = 0; l0 < d.padded_l; l0 += Positions) {
      acc_t acc[Positions][Block] = {};
      const int32_t* __restrict offsets = d.offsets.data() + l0 * d.padded_k;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* __restrict w = weight_t + k * d.padded_o + o0;
        for (int p = 0; p < Positions; ++p) {
          const acc_t v = planes[offsets[p * d.padded_k + k]];
#pragma omp simd
          for (int o = 0; o < Block; ++o) acc[p][o] += v * w[o];
        }
      }
      for (int p = 0; p < Positions; ++p) {
        for (int o = 0; o < Block; ++o) out_t[(l0 + p) * d.padded_o + o0 + o] = acc[p][o];
      }
    }
  }
}

// weight_grad_t[k, o] += sum over `images` images (plane copies plane_stride apart, dY rows
// [L, padded_o] dy_stride apart) and their real positions l of planes[offsets[l, k]] *
// dy_t[l, o]. Several images per call keep the sums in registers across them: a late layer
// has 4-16 positions per image, and storing the sums after each image cost as much as
// computing them.
template <typename acc_t, int Block>
void implicit_weight_grad_image(const acc_t* __restrict planes, int64_t plane_stride,
                                int64_t images, const ImplicitGemmLayout& d, int64_t L,
                                const acc_t* __restrict dy_t, int64_t dy_stride,
                                acc_t* __restrict weight_grad_t) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && Block >= 16) {
    implicit_weight_grad_image_avx512<Block / 16>(planes, plane_stride, images, d, L, dy_t,
                                                dy_stride, weight_grad_t);
    return;
  }
#endif
  constexpr int Taps = kImplicitAccumulators / Block;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += Block) {
    for (int64_t k0 = 0; k0 < d.padded_k; k0 += Taps) {
      acc_t acc[Taps][Block] = {};
      for (int64_t image = 0; image < images; ++image) {
        const acc_t* __restrict image_planes = planes + image * plane_stride;
        for (int64_t l = 0; l < L; ++l) {
          const acc_t* __restrict dy_row = dy_t + image * dy_stride + l * d.padded_o + o0;
          const int32_t* __restrict offsets = d.offsets.data() + l * d.padded_k + k0;
          for (int t = 0; t < Taps; ++t) {
            const acc_t v = image_planes[offsets[t]];
#pragma omp simd
            for (int o = 0; o < Block; ++o) acc[t][o] += v * dy_row[o];
          }
        }
      }
      for (int t = 0; t < Taps; ++t) {
        for (int o = 0; o < Block; ++o) weight_grad_t[(k0 + t) * d.padded_o + o0 + o] += acc[t][o];
      }
    }
  }
}

// The implicit GEMM's output of one image, out_t [L, padded_o], into its [O, L] planes with
// the bias added. In 16 x 16 blocks transposed in registers (float): read channel by channel
// it would touch a new cache line per value.
template <typename scalar_t, typename acc_t>
void store_output_image(const acc_t* __restrict out_t, int64_t O, int64_t L, int64_t padded_o,
                        const acc_t* __restrict bias, scalar_t* __restrict dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    using cpu::packed_gemm::lane_mask;
    using cpu::packed_gemm::transpose_16x16;
    for (int64_t o0 = 0; o0 < O; o0 += 16) {
      const int64_t channels = std::min<int64_t>(16, O - o0);
      const __mmask16 channel_mask = lane_mask(channels);
      for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int64_t positions = std::min<int64_t>(16, L - l0);
        const __mmask16 position_mask = lane_mask(positions);
        __m512 block[16];
        for (int64_t j = 0; j < 16; ++j) {
          block[j] = j < positions
                         ? _mm512_maskz_loadu_ps(channel_mask, out_t + (l0 + j) * padded_o + o0)
                         : _mm512_setzero_ps();
        }
        transpose_16x16(block);  // block[i]: channel o0 + i, positions l0.. in the lanes
        for (int64_t i = 0; i < channels; ++i) {
          const __m512 value = bias != nullptr
                                   ? _mm512_add_ps(block[i], _mm512_set1_ps(bias[o0 + i]))
                                   : block[i];
          _mm512_mask_storeu_ps(dst + (o0 + i) * L + l0, position_mask, value);
        }
      }
    }
    return;
  }
#endif
  for (int64_t o = 0; o < O; ++o) {
    const acc_t bias_value = bias != nullptr ? bias[o] : acc_t(0);
    scalar_t* __restrict plane = dst + o * L;
    for (int64_t l = 0; l < L; ++l) {
      plane[l] = static_cast<scalar_t>(out_t[l * padded_o + o] + bias_value);
    }
  }
}

}  // namespace convkit::cpu_conv2d
