// Re-layouts shared by the image family of CPU conv paths (images, implicit_gemm,
// transposed_implicit_gemm, shared_tiles): the gather table that writes an image's column
// matrix transposed, the gather-form sum that is its transpose, 16 x 16 block transposes of
// weights and gradients, and the per-plane output/dY copies of a tile of whole images.
//
// The gather: each image's column matrix is written transposed, [L, K] (position-major),
// through a small table built once per call: entry l * kA + r (kA = kH*kW, r = kh*kW + kw)
// holds the offset in a channel plane of the value that column entry (c*kA + r, l) copies,
// the same for every channel. The image is first copied plane by plane into a buffer with one
// zero after each plane, and padding entries point at that zero: the gather has no branch
// and no per-row bookkeeping (late layers have rows of 1-4 elements, where that bookkeeping
// costs more than the copy). The GEMMs read the [count*L, K] tile as a transposed operand.
// Invariant: every offset is below C * (H*W + 1) < 2^31 (image_family_fits).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../../conv2d.h"
#include "../gemm.h"
#include "../packed_gemm.h"

namespace convkit::cpu_conv2d {

struct GatherTable {
  std::vector<int32_t> offsets;  // [L, kA]
  int64_t plane_stride;          // H*W + 1: a plane and its zero
};

inline GatherTable make_gather_table(const Conv2dGeometry& g) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  GatherTable table{std::vector<int32_t>(L * kA), g.in_area() + 1};
  // Entry (l, r) is what im2col_source_offset gives for row r of channel 0 (the in-plane
  // offset, the same for every channel), walked by coordinates: the per-entry divisions of
  // that helper were a tenth of a small call (8->16 at N=2: ~2 us of ~18).
  const int32_t padding = static_cast<int32_t>(g.in_area());
  int32_t* entry = table.offsets.data();
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
          const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
          *entry++ = inside ? static_cast<int32_t>(ih * g.in_w + iw) : padding;
        }
      }
    }
  }
  return table;
}

// Copies an image's planes into `planes` (plane stride H*W + 1), each followed by a zero.
template <typename scalar_t, typename acc_t>
void copy_planes(const scalar_t* image, const Conv2dGeometry& g, acc_t* planes) {
  const int64_t area = g.in_area();
  for (int64_t c = 0; c < g.in_channels; ++c) {
    const scalar_t* src = image + c * area;
    acc_t* dst = planes + c * (area + 1);
    for (int64_t e = 0; e < area; ++e) dst[e] = static_cast<acc_t>(src[e]);
    dst[area] = acc_t(0);
  }
}

// columns_t [L, K] of one image from its copied planes.
template <typename acc_t>
void gather_image_columns(const acc_t* __restrict planes, const Conv2dGeometry& g,
                          const GatherTable& table, acc_t* __restrict columns_t) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  const int64_t C = g.in_channels;
  const int32_t* __restrict offsets = table.offsets.data();
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* __restrict row = offsets + l * kA;
    acc_t* __restrict dst = columns_t + l * C * kA;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* __restrict plane = planes + c * table.plane_stride;
      for (int64_t r = 0; r < kA; ++r) dst[c * kA + r] = plane[row[r]];
    }
  }
}

// The transpose of gather_image_columns, in gather form: each input element sums the
// column-gradient entries that were copied from it. The input-gradient GEMM multiplies by
// the weight with each row reordered tap-major (weight_rows_tap_major: entry r * Cg + c), so
// the column gradient holds a tap's Cg channels contiguously: every term is a run of Cg
// values, summed as vectors. For every element of a plane the table lists the start of its
// terms' runs in an image's [L, K] columns (l * K + r * Cg, group 0), in (l, r) order;
// padding entries are in no list. The sums go to a [area, Cg] buffer, then transposed into
// the planes. Gathering (rather than scattering with a read-modify-write per column entry)
// keeps overlapping taps out of the store buffer's dependency chains, and each element adds
// its terms in a fixed order from zero: deterministic.
struct ColumnSources {
  std::vector<int64_t> starts;   // [area + 1]: element e's terms are [starts[e], starts[e + 1])
  std::vector<int64_t> entries;  // run starts in an image's columns (group 0)
};

inline ColumnSources make_column_sources(const Conv2dGeometry& g, const GatherTable& table) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  const int64_t K = g.column_rows();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t area = g.in_area();
  ColumnSources sources{std::vector<int64_t>(area + 1, 0), {}};
  for (int64_t i = 0; i < L * kA; ++i) {
    const int64_t offset = table.offsets[i];
    if (offset < area) ++sources.starts[offset + 1];
  }
  for (int64_t e = 0; e < area; ++e) sources.starts[e + 1] += sources.starts[e];
  sources.entries.resize(sources.starts[area]);
  std::vector<int64_t> next(sources.starts.begin(), sources.starts.end() - 1);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t r = 0; r < kA; ++r) {
      const int64_t offset = table.offsets[l * kA + r];
      if (offset < area) sources.entries[next[offset]++] = l * K + r * channels_per_group;
    }
  }
  return sources;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] (or += when kAdd) for a [rows, cols] matrix, in
// 16 x 16 blocks. Element by element, one of the two sides strides by a whole row per value:
// with the 32->64 layer's 288-tap rows (1152 bytes, 256 for its 64 padded channels) every
// such access missed L1, and the weight's re-layout plus the gradient's way back were a third
// of a small call (the 32->64 forward at N=2: ~7 of ~20 us).
template <bool kAdd, typename acc_t>
void transpose_matrix(const acc_t* __restrict src, int64_t ld_src, int64_t rows, int64_t cols,
                      acc_t* __restrict dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 16;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    using cpu::packed_gemm::lane_mask;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t block_rows = std::min(kBlock, rows - r0);
      const __mmask16 row_mask = lane_mask(block_rows);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t block_cols = std::min(kBlock, cols - c0);
        const __mmask16 col_mask = lane_mask(block_cols);
        __m512 block[kBlock];
        for (int64_t i = 0; i < kBlock; ++i) {
          block[i] = i < block_rows
                         ? _mm512_maskz_loadu_ps(col_mask, src + (r0 + i) * ld_src + c0)
                         : _mm512_setzero_ps();
        }
        cpu::packed_gemm::transpose_16x16(block);
        for (int64_t j = 0; j < block_cols; ++j) {
          float* out = dst + (c0 + j) * ld_dst + r0;
          __m512 value = block[j];
          if constexpr (kAdd) value = _mm512_add_ps(_mm512_maskz_loadu_ps(row_mask, out), value);
          _mm512_mask_storeu_ps(out, row_mask, value);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          if constexpr (kAdd) {
            dst[c * ld_dst + r] += src[r * ld_src + c];
          } else {
            dst[c * ld_dst + r] = src[r * ld_src + c];
          }
        }
      }
    }
  }
}

// weight [O, Kg] (row entry c * kA + r) -> the same rows tap-major (entry r * Cg + c).
template <typename acc_t>
std::vector<acc_t> weight_rows_tap_major(const acc_t* weight, const Conv2dGeometry& g) {
  const int64_t kA = g.kernel_area();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t Kg = channels_per_group * kA;
  std::vector<acc_t> rows(g.out_channels * Kg);
  // Each row is a [Cg, kA] matrix transposed.
  for (int64_t o = 0; o < g.out_channels; ++o) {
    transpose_matrix<false>(weight + o * Kg, kA, channels_per_group, kA, rows.data() + o * Kg,
                            channels_per_group);
  }
  return rows;
}

#if defined(__AVX512F__)
// The first `elements` lanes of `value` to dst, rounded to scalar_t.
template <typename scalar_t>
inline void store_element_lanes(scalar_t* dst, __m512 value, int64_t elements) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_mask_storeu_ps(dst, cpu::packed_gemm::lane_mask(elements), value);
  } else {
    alignas(64) float values[16];
    _mm512_store_ps(values, value);
    for (int64_t i = 0; i < elements; ++i) dst[i] = static_cast<scalar_t>(values[i]);
  }
}
#endif

// One image's input gradient from its [L, K] column gradient (tap-major within each group);
// `buffer` holds area * Cg values (used by the generic version).
template <typename scalar_t, typename acc_t>
void sum_image_columns(const acc_t* __restrict columns_t, const Conv2dGeometry& g,
                       const ColumnSources& sources, acc_t* __restrict buffer,
                       scalar_t* __restrict grad_image) {
  const int64_t area = g.in_area();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t Kg = g.column_rows() / g.groups;
  const int64_t* __restrict starts = sources.starts.data();
  const int64_t* __restrict entries = sources.entries.data();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 16 elements x up to 16 channels of sums at a time, transposed in registers, so both
    // the runs (channels) and the planes (elements) are read and written as vectors.
    using cpu::packed_gemm::lane_mask;
#if defined(__AVX512VL__)
    if (channels_per_group <= 8) {
      // Up to 8 channels: two elements per register (e0 + i in the low half, e0 + 8 + i in the
      // high one), so the transpose is two 8 x 8 ones side by side, 24 shuffles per 16
      // elements where the 16 x 16 one of half-empty registers took 64. The 8->16 layer's
      // input gradient (8 channels) had spent a third of its time in this pass.
      const __mmask8 channel_mask = static_cast<__mmask8>((1u << channels_per_group) - 1u);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const float* __restrict group_columns = columns_t + grp * Kg;
        auto element_sum = [&](int64_t e) {
          __m256 sum = _mm256_setzero_ps();
          if (e < area) {
            for (int64_t j = starts[e]; j < starts[e + 1]; ++j) {
              const float* run = group_columns + entries[j];
              sum = _mm256_add_ps(sum, _mm256_maskz_loadu_ps(channel_mask, run));
            }
          }
          return sum;
        };
        for (int64_t e0 = 0; e0 < area; e0 += 16) {
          const int64_t elements = std::min<int64_t>(16, area - e0);
          __m512 block[8];
          for (int64_t i = 0; i < 8; ++i) {
            block[i] = _mm512_insertf32x8(_mm512_castps256_ps512(element_sum(e0 + i)),
                                          element_sum(e0 + 8 + i), 1);
          }
          cpu::packed_gemm::transpose_8x8_halves(block);
          for (int64_t c = 0; c < channels_per_group; ++c) {
            store_element_lanes(grad_image + (grp * channels_per_group + c) * area + e0,
                                block[c], elements);
          }
        }
      }
      return;
    }
#endif
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const float* __restrict group_columns = columns_t + grp * Kg;
      for (int64_t c0 = 0; c0 < channels_per_group; c0 += 16) {
        const int64_t channels = std::min<int64_t>(16, channels_per_group - c0);
        const __mmask16 channel_mask = lane_mask(channels);
        for (int64_t e0 = 0; e0 < area; e0 += 16) {
          const int64_t elements = std::min<int64_t>(16, area - e0);
          __m512 block[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 sum = _mm512_setzero_ps();
            if (i < elements) {
              for (int64_t j = starts[e0 + i]; j < starts[e0 + i + 1]; ++j) {
                const float* run = group_columns + entries[j] + c0;
                sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(channel_mask, run));
              }
            }
            block[i] = sum;
          }
          cpu::packed_gemm::transpose_16x16(block);
          for (int64_t c = 0; c < channels; ++c) {
            store_element_lanes(grad_image + (grp * channels_per_group + c0 + c) * area + e0,
                                block[c], elements);
          }
        }
      }
    }
    return;
  }
#endif
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const acc_t* __restrict group_columns = columns_t + grp * Kg;
    for (int64_t e = 0; e < area; ++e) {
      acc_t* __restrict sums = buffer + e * channels_per_group;
      std::fill(sums, sums + channels_per_group, acc_t(0));
      for (int64_t j = starts[e]; j < starts[e + 1]; ++j) {
        const acc_t* __restrict run = group_columns + entries[j];
        for (int64_t c = 0; c < channels_per_group; ++c) sums[c] += run[c];
      }
    }
    for (int64_t c = 0; c < channels_per_group; ++c) {
      scalar_t* __restrict dst = grad_image + (grp * channels_per_group + c) * area;
      for (int64_t e = 0; e < area; ++e) {
        dst[e] = static_cast<scalar_t>(buffer[e * channels_per_group + c]);
      }
    }
  }
}

// What the image path's input gradient needs beside the gather table: each input element's
// column sources and the weight with its rows tap-major (both empty without an input
// gradient).
template <typename acc_t>
struct InputGradientPlan {
  ColumnSources sources;
  std::vector<acc_t> weight_tap_major;
};

template <typename acc_t>
InputGradientPlan<acc_t> make_input_gradient_plan(const Conv2dGeometry& g,
                                                  const GatherTable& table,
                                                  const at::Tensor& weight_acc,
                                                  bool need_input_grad) {
  if (!need_input_grad) return {};
  return {make_column_sources(g, table),
          weight_rows_tap_major(weight_acc.const_data_ptr<acc_t>(), g)};
}

// The image path's GEMMs on one tile of n columns ([n, K] columns, dY as [O, n]), per group:
// the weight gradient, weight_grad [O, Kg] += dY @ columns ...
template <typename acc_t>
void add_tile_weight_gradient(const Conv2dGeometry& g, int64_t n, const acc_t* dy_tile,
                              const acc_t* columns_t, acc_t* weight_grad) {
  const int64_t K = g.column_rows();
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = K / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    cpu::gemm<acc_t>(false, false, Og, Kg, n, acc_t(1), dy_tile + grp * Og * n, n,
                     columns_t + grp * Kg, K, acc_t(1), weight_grad + grp * Og * Kg, Kg);
  }
}

// ... and the column gradient, columns = dY^T @ W (W's rows tap-major, for sum_image_columns).
template <typename acc_t>
void tile_column_gradient(const Conv2dGeometry& g, int64_t n, const acc_t* dy_tile,
                          const acc_t* weight_tap_major, acc_t* columns_t) {
  const int64_t K = g.column_rows();
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = K / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    cpu::gemm<acc_t>(true, false, n, Kg, Og, acc_t(1), dy_tile + grp * Og * n, n,
                     weight_tap_major + grp * Og * Kg, Kg, acc_t(0), columns_t + grp * Kg, K);
  }
}

// weight [O, K] -> [K, channels] (tap-major, as the rows and implicit GEMM paths read it),
// zeros in the padded channels.
template <typename acc_t>
std::vector<acc_t> weight_by_tap(const acc_t* weight, int64_t O, int64_t K, int64_t channels) {
  std::vector<acc_t> weight_t(K * channels, acc_t(0));
  transpose_matrix<false>(weight, K, O, K, weight_t.data(), channels);
  return weight_t;
}

// total[o, k] += part[k, o] for o < O: a tap-major weight-gradient accumulator (rows, implicit GEMM)
// added into the [O, K] gradient.
template <typename acc_t>
void add_tap_major(const acc_t* part, int64_t O, int64_t K, int64_t channels, acc_t* total) {
  transpose_matrix<true>(part, channels, K, O, total, K);
}

// dY of one image, [O, L] -> [L, padded_o] for the implicit GEMM's weight gradient (zeros in
// the padded channels), and each channel's sum over the image into channel_sums[0, O): the
// bias gradient, from the values this copy reads anyway. In 16 x 16 blocks transposed in
// registers (float): one scalar store per value, 64 bytes apart, had taken a sixth of the
// 8->16 layer's weight gradient.
template <typename scalar_t, typename acc_t>
void transpose_dy_image(const scalar_t* __restrict dy_image, int64_t O, int64_t L,
                        int64_t padded_o, acc_t* __restrict dy_t, double* __restrict channel_sums) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // 16 channels at a time: the packed GEMM's transposing pack (lines = channels, depth =
    // positions; the padded channels' lanes come out zero), then the channels' sums from the
    // rows just written, still in L1.
    using cpu::packed_gemm::lane_mask;
    for (int64_t o0 = 0; o0 < padded_o; o0 += 16) {
      const int64_t channels = std::clamp<int64_t>(O - o0, 0, 16);
      cpu::packed_gemm::pack_lanes_transposed(dy_image + o0 * L, L, L, channels, padded_o,
                                              std::min<int64_t>(16, padded_o - o0), dy_t + o0);
      if (channel_sums == nullptr || channels == 0) continue;
      const __mmask16 channel_mask = lane_mask(channels);
      __m512 sums = _mm512_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(channel_mask, dy_t + l * padded_o + o0));
      }
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, sums);
      for (int64_t i = 0; i < channels; ++i) channel_sums[o0 + i] = static_cast<double>(lanes[i]);
    }
    return;
  }
#endif
  std::fill(dy_t, dy_t + L * padded_o, acc_t(0));
  for (int64_t o = 0; o < O; ++o) {
    const scalar_t* __restrict src = dy_image + o * L;
    acc_t sum = acc_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const acc_t value = static_cast<acc_t>(src[l]);
      dy_t[l * padded_o + o] = value;
      sum += value;
    }
    if (channel_sums != nullptr) channel_sums[o] = static_cast<double>(sum);
  }
}

}  // namespace convkit::cpu_conv2d
