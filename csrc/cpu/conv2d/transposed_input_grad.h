// The transposed implicit GEMM: the input gradient of implicit-GEMM layers with 9-32 input
// channels (path.h), no column matrix.
//
// dX[c, ih, iw] sums W[o, c, kh, kw] * dY[o, oh, ow] over the output channels o and the taps
// (kh, kw) whose window reaches (ih, iw) from some output position (oh, ow). Which taps can
// reach an input position depends only on its phase (ih mod stride_h, iw mod stride_w): the
// phases of a 3x3 stride-2 layer take 1, 2, 2 and 4 of its 9 taps. The positions of one
// phase thus share one list of taps, so one sequence of weight vectors, and are computed
// like the implicit GEMM's forward with the roles of the channels swapped: 16 input channels
// in the lanes, dY read from the weight gradient's [L, padded_o] copy of it (plus a zero row,
// which taps falling outside dY read), one broadcast of dY per (tap, o, position). A step
// takes 8 positions of one phase from a chunk of images, so that a phase's few positions per
// image (16->32: 9-16) do not each leave a short step; the sums go to [positions, padded_c]
// rows, transposed into the planes at the end.
// Why not for <= 8 input channels: in 8 lanes this kernel, and the variants measured beside it
// (positions in the lanes; two output-channel parities per 16 lanes), were no faster than the
// image path's GEMM and gather (docs/performance-notes.md).
// Invariant: every offset of the layout fits int32 (transposed_input_grad_fits).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../../conv2d.h"
#include "path.h"
#include "relayout.h"
#include "simd.h"

namespace convkit::cpu_conv2d {

// Positions per step.
constexpr int64_t kTransposedStep = 8;
// Images per chunk: up to kTransposedChunkImages (path.h), fewer for images with more than
// kTransposedChunkPositions / 8 positions (the chunk's sums and dY copy stay within L2).
constexpr int64_t kTransposedChunkPositions = 2048;

inline int64_t transposed_chunk_images(const Conv2dGeometry& g, int64_t images_per_tile) {
  return std::clamp<int64_t>(kTransposedChunkPositions / std::max<int64_t>(g.in_area(), 1), 1,
                             std::min(kTransposedChunkImages, images_per_tile));
}

struct TransposedPhase {
  int64_t positions = 0;          // the phase's positions in one image
  std::vector<int32_t> tap_rows;  // [T]: r = kh * kW + kw of the T taps reaching it (maybe none)
  std::vector<int32_t> sources;   // [chunk * positions, T]: offsets of dY rows in a chunk's copy
  std::vector<int32_t> outputs;   // [chunk * positions]: rows of the chunk's sums (image * area + e)
};

constexpr int64_t kTransposedLanes = 16;

struct TransposedLayout {
  int64_t padded_c;  // C rounded up to kTransposedLanes
  std::vector<TransposedPhase> phases;
};

// Positions are listed image by image within each phase, so a chunk of fewer images (the last
// of a tile) uses a prefix of each list. The chunk's dY copy has rows of padded_o channels,
// each image's L rows and a zero row dy_stride apart.
inline TransposedLayout make_transposed_layout(const Conv2dGeometry& g, int64_t padded_o,
                                               int64_t dy_stride, int64_t chunk) {
  TransposedLayout t;
  t.padded_c = (g.in_channels + kTransposedLanes - 1) / kTransposedLanes * kTransposedLanes;
  const int64_t zero_row = g.out_area() * padded_o;
  for (int64_t py = 0; py < g.stride_h; ++py) {
    for (int64_t px = 0; px < g.stride_w; ++px) {
      TransposedPhase phase;
      // Tap (kh, kw) reaches the phase when ih + pad - kh * dilation is a multiple of the
      // stride for ih = py (and so for every ih of the phase); likewise along the width.
      std::vector<std::pair<int64_t, int64_t>> taps;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        if ((py + g.pad_h - kh * g.dilation_h) % g.stride_h != 0) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          if ((px + g.pad_w - kw * g.dilation_w) % g.stride_w != 0) continue;
          taps.emplace_back(kh, kw);
          phase.tap_rows.push_back(static_cast<int32_t>(kh * g.kernel_w + kw));
        }
      }
      const int64_t rows = py < g.in_h ? (g.in_h - py + g.stride_h - 1) / g.stride_h : 0;
      const int64_t cols = px < g.in_w ? (g.in_w - px + g.stride_w - 1) / g.stride_w : 0;
      phase.positions = rows * cols;
      if (phase.positions == 0) continue;
      phase.sources.reserve(chunk * phase.positions * static_cast<int64_t>(taps.size()));
      phase.outputs.reserve(chunk * phase.positions);
      for (int64_t image = 0; image < chunk; ++image) {
        for (int64_t ih = py; ih < g.in_h; ih += g.stride_h) {
          for (int64_t iw = px; iw < g.in_w; iw += g.stride_w) {
            phase.outputs.push_back(static_cast<int32_t>(image * g.in_area() + ih * g.in_w + iw));
            for (const auto& [kh, kw] : taps) {
              // Exact divisions: the phase was chosen so that the numerators are multiples.
              const int64_t oh = (ih + g.pad_h - kh * g.dilation_h) / g.stride_h;
              const int64_t ow = (iw + g.pad_w - kw * g.dilation_w) / g.stride_w;
              const bool inside = ih + g.pad_h - kh * g.dilation_h >= 0 && oh < g.out_h &&
                                  iw + g.pad_w - kw * g.dilation_w >= 0 && ow < g.out_w;
              const int64_t row = inside ? (oh * g.out_w + ow) * padded_o : zero_row;
              phase.sources.push_back(static_cast<int32_t>(image * dy_stride + row));
            }
          }
        }
      }
      t.phases.push_back(std::move(phase));
    }
  }
  return t;
}

// weight [O, C * kA] -> [kA, O, padded_c]: for each tap and output channel, the input
// channels' weights as vectors (zeros in the padded lanes).
template <typename acc_t>
std::vector<acc_t> weight_for_transposed(const acc_t* weight, const Conv2dGeometry& g,
                                         int64_t padded_c) {
  const int64_t O = g.out_channels;
  const int64_t C = g.in_channels;
  const int64_t kA = g.kernel_area();
  std::vector<acc_t> laid(kA * O * padded_c, acc_t(0));
  for (int64_t o = 0; o < O; ++o) {
    // Row o is a [C, kA] matrix; its transpose goes to entries (r, o, c).
    transpose_matrix<false>(weight + o * C * kA, kA, C, kA, laid.data() + o * padded_c,
                            O * padded_c);
  }
  return laid;
}

// sums[outputs[p], c0 .. c0 + 16) = sum over the phase's taps t and o < O of
// dy_t[sources[p, t] + o] * weight[tap_rows[t], o, c0 ..] for Positions positions p.
// Not inlined: inlined into its caller, GCC runs out of general registers for the 8 dY
// pointers and keeps them in xmm registers, one move per FMA (a third slower).
template <typename acc_t, int Positions>
__attribute__((noinline)) void transposed_step(
    const acc_t* __restrict dy_t, const int32_t* __restrict sources, int64_t taps,
    const int32_t* __restrict tap_rows, int64_t O, const acc_t* __restrict weight,
    int64_t padded_c, int64_t c0, const int32_t* __restrict outputs, acc_t* __restrict sums) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Each weight vector is held in a register for the step's positions (as in the implicit
    // GEMM's forward: GCC otherwise folds its load into every FMA); the dY values are the FMAs'
    // broadcast operands.
    __m512 acc[Positions];
    for (int p = 0; p < Positions; ++p) acc[p] = _mm512_setzero_ps();
    for (int64_t t = 0; t < taps; ++t) {
      const float* src[Positions];
      for (int p = 0; p < Positions; ++p) src[p] = dy_t + sources[p * taps + t];
      const float* w = weight + tap_rows[t] * O * padded_c + c0;
      for (int64_t o = 0; o < O; ++o) {
        __m512 w_o = _mm512_loadu_ps(w + o * padded_c);
        keep_in_register(w_o);
        for (int p = 0; p < Positions; ++p) {
          acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(src[p][o]), w_o, acc[p]);
        }
      }
    }
    for (int p = 0; p < Positions; ++p) _mm512_storeu_ps(sums + outputs[p] * padded_c + c0, acc[p]);
    return;
  }
#endif
  acc_t acc[Positions][kTransposedLanes] = {};
  for (int64_t t = 0; t < taps; ++t) {
    const acc_t* w = weight + tap_rows[t] * O * padded_c + c0;
    for (int p = 0; p < Positions; ++p) {
      const acc_t* src = dy_t + sources[p * taps + t];
      for (int64_t o = 0; o < O; ++o) {
        const acc_t v = src[o];
        const acc_t* __restrict w_o = w + o * padded_c;
#pragma omp simd
        for (int l = 0; l < kTransposedLanes; ++l) acc[p][l] += v * w_o[l];
      }
    }
  }
  for (int p = 0; p < Positions; ++p) {
    std::copy_n(acc[p], kTransposedLanes, sums + outputs[p] * padded_c + c0);
  }
}

// The input gradient's sums for a chunk of `images` images whose dY rows are in dy_t (laid out
// as make_transposed_layout was told): sums [images * area, padded_c].
template <typename acc_t>
void transposed_input_grad_chunk(const TransposedLayout& t, int64_t images,
                                 const acc_t* dy_t, int64_t O, const acc_t* weight,
                                 acc_t* sums) {
  for (const TransposedPhase& phase : t.phases) {
    const int64_t n = images * phase.positions;
    const int64_t taps = static_cast<int64_t>(phase.tap_rows.size());
    const int32_t* sources = phase.sources.data();
    const int32_t* outputs = phase.outputs.data();
    for (int64_t c0 = 0; c0 < t.padded_c; c0 += kTransposedLanes) {
      int64_t q = 0;
      for (; q + kTransposedStep <= n; q += kTransposedStep) {
        transposed_step<acc_t, kTransposedStep>(dy_t, sources + q * taps, taps,
                                                phase.tap_rows.data(), O, weight, t.padded_c,
                                                c0, outputs + q, sums);
      }
      if (q < n) {
        with_positions(n - q, [&](auto positions) {
          transposed_step<acc_t, decltype(positions)::value>(
              dy_t, sources + q * taps, taps, phase.tap_rows.data(), O, weight,
              t.padded_c, c0, outputs + q, sums);
        });
      }
    }
  }
}

}  // namespace convkit::cpu_conv2d
