// Batch norm's row layout on the CPU, for small maps (C*S <= kMaxRowLength): each image's
// values one contiguous row, every pass a vectorised loop along it (batch_norm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../batch_norm.h"
#include "../memory_format.h"
#include "batch_norm_planes.h"
#include "parallel.h"

namespace convkit::cpu_batch_norm {

// ---- The row path, for small images: C*S <= kMaxRowLength.
//
// With planes of 1-196 values (the chapter's 14x14 ... 1x1 feature maps) the per-channel
// loops above spend their time on loop bookkeeping, one short plane at a time. Here each
// image's [C*S] values are one contiguous row and every pass is a vectorised loop along it,
// with the per-channel constants spread into rows of C*S values. Reductions accumulate rows
// of sums per block of kImagesPerBlock images (in acc_t), then each channel's entries of
// all blocks in double, in block order: the same result on any number of threads.
constexpr int64_t kMaxRowLength = 4096;
constexpr int64_t kImagesPerBlock = 32;
// A thread is woken only for at least this many values: below it the fork and join cost more
// than they save (measured: eval [64,16,7,7] 9.6 us on one thread, 10.5 on two; [64,8,14,14]
// 14.5 and 12.0).
constexpr int64_t kMinValuesPerThread = 32768;

// Blocks of images per parallel task.
inline int64_t block_grain(int64_t R) {
  const int64_t block_values = std::max<int64_t>(kImagesPerBlock * R, 1);
  return std::max<int64_t>(1, (kMinValuesPerThread + block_values - 1) / block_values);
}

inline bool use_row_path(int64_t C, int64_t S) { return C * S <= kMaxRowLength; }

// How the ops walk an input [N, C, S] held in `format` (csrc/memory_format.h): contiguous
// memory is N images of C planes of S values, in the rows layout when C*S is small
// (use_row_path); channels-last memory is N*S images of C planes of one value, always in the
// rows layout (read and written in place).
struct RowView {
  at::MemoryFormat format;
  bool rows;       // the rows layout runs (else the planes layout, on [N, C, S])
  int64_t images;  // the rows layout's N
  int64_t plane;   // the rows layout's S
};

inline RowView row_view(const at::Tensor& input, int64_t N, int64_t C, int64_t S) {
  const at::MemoryFormat format = batch_norm_memory_format(input);
  const bool channels_last = is_channels_last_format(format);
  return {format, channels_last || use_row_path(C, S), channels_last ? N * S : N,
          channels_last ? 1 : S};
}

// row[c * S + s] = per_channel[c]
template <typename acc_t>
std::vector<acc_t> spread(const acc_t* per_channel, int64_t C, int64_t S) {
  std::vector<acc_t> row(C * S);
  for (int64_t c = 0; c < C; ++c) std::fill(row.begin() + c * S, row.begin() + (c + 1) * S, per_channel[c]);
  return row;
}

// Every pass walks a block's rows one chunk of kChunk columns at a time, the images inner:
// the chunk's constants (scale, shift, ...) and its sums sit in local arrays the compiler
// keeps in vector registers while the block's images stream past, so a vector of x costs
// one load (streaming every constant row per image instead costs 7 loads and 2 stores per
// vector in the backward's reduction, ~7 cycles per 16 values).
template <typename acc_t>
constexpr int64_t kChunk = 256 / static_cast<int64_t>(sizeof(acc_t));  // 4 AVX-512 vectors

// chunk(j0, width) for each chunk of a row of R values. Full chunks get their width as a
// compile-time constant (fixed trip counts: the local arrays become registers), the tail a
// runtime one.
template <typename acc_t, typename Chunk>
inline void for_each_chunk(int64_t R, Chunk&& chunk) {
  constexpr int64_t W = kChunk<acc_t>;
  int64_t j0 = 0;
  for (; j0 + W <= R; j0 += W) chunk(j0, std::integral_constant<int64_t, W>{});
  if (j0 < R) chunk(j0, R - j0);
}

// A chunk's slice of a per-column row, copied into a local array.
template <typename acc_t, typename Width>
inline void load_chunk(acc_t (&local)[kChunk<acc_t>], const std::vector<acc_t>& row, int64_t j0,
                       Width width) {
  for (int64_t j = 0; j < width; ++j) local[j] = row[j0 + j];
}

// Runs body(first_image, end_image, partial) for each block of images in parallel, with
// `partial` the block's two rows of sums (body writes every entry); returns the per-channel
// totals of both rows (in double, blocks summed in order).
template <typename acc_t, typename Body>
void row_reduce(int64_t N, int64_t C, int64_t S, Body&& body, double* total_a, double* total_b) {
  const int64_t R = C * S;
  const int64_t blocks = (N + kImagesPerBlock - 1) / kImagesPerBlock;
  std::vector<acc_t> partial(blocks * 2 * R);
  parallel_for(0, blocks, block_grain(R), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kImagesPerBlock;
      body(first, std::min(N, first + kImagesPerBlock), partial.data() + block * 2 * R);
    }
  });
  // Columns over the blocks, then each channel's S columns: both loops vectorise (v3's one
  // scalar chain of double adds took a third of a [64, 8, 14, 14] forward).
  std::vector<double> columns(2 * R, 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    const acc_t* __restrict rows = partial.data() + block * 2 * R;
    double* __restrict sums = columns.data();
    #pragma omp simd
    for (int64_t j = 0; j < 2 * R; ++j) sums[j] += static_cast<double>(rows[j]);
  }
  for (int64_t c = 0; c < C; ++c) {
    const double* __restrict col_a = columns.data() + c * S;
    const double* __restrict col_b = columns.data() + R + c * S;
    double a = 0.0, b = 0.0;
    #pragma omp simd reduction(+ : a, b)
    for (int64_t s = 0; s < S; ++s) {
      a += col_a[s];
      b += col_b[s];
    }
    total_a[c] = a;
    total_b[c] = b;
  }
}

// Element-wise passes run over the same blocks of images, in parallel: body(first, end).
template <typename Body>
void for_each_block(int64_t N, int64_t R, Body&& body) {
  const int64_t blocks = (N + kImagesPerBlock - 1) / kImagesPerBlock;
  parallel_for(0, blocks, block_grain(R), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kImagesPerBlock;
      body(first, std::min(N, first + kImagesPerBlock));
    }
  });
}

// mean[c] and the biased variance var[c] of each channel, summed in acc_t per block and in
// double across blocks, stored as stat_t (acc_t for the forward, double for batch_norm_stats).
template <typename scalar_t, typename acc_t, typename stat_t>
void row_statistics(const scalar_t* x, int64_t N, int64_t C, int64_t S, stat_t* mean,
                    stat_t* var) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  const int64_t count = N * S;
  // Shift by an estimate of each channel's mean, as channel_shift (nothing cancels in the
  // variance), from the first images' rows summed by a vectorised loop: the per-channel walk
  // over a few values of many images cost 1.3 us of a 10 us [64, 64, 2, 2] forward.
  const int64_t sampled = std::min<int64_t>(N, (kShiftSample + S - 1) / S);
  std::vector<double> columns(R, 0.0);
  for (int64_t n = 0; n < sampled; ++n) {
    const scalar_t* __restrict row = x + n * R;
    double* __restrict sums = columns.data();
    #pragma omp simd
    for (int64_t j = 0; j < R; ++j) sums[j] += static_cast<double>(row[j]);
  }
  std::vector<acc_t> shift_c(C);
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0.0;
    for (int64_t s = 0; s < S; ++s) sum += columns[c * S + s];
    shift_c[c] = statistics_shift(static_cast<acc_t>(sum / double(sampled * S)));
  }
  const std::vector<acc_t> shift = spread(shift_c.data(), C, S);
  std::vector<double> sum(C), sum_sq(C);
  row_reduce<acc_t>(N, C, S, [&](int64_t first, int64_t end, acc_t* rows) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t sums[W] = {}, squares[W] = {}, shift_local[W];
      load_chunk(shift_local, shift, j0, width);
      for (int64_t n = first; n < end; ++n) {
        const scalar_t* __restrict row = x + n * R + j0;
        #pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const acc_t d = static_cast<acc_t>(row[j]) - shift_local[j];
          sums[j] += d;
          squares[j] += d * d;
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        rows[j0 + j] = sums[j];
        rows[R + j0 + j] = squares[j];
      }
    });
  }, sum.data(), sum_sq.data());
  for (int64_t c = 0; c < C; ++c) {
    const double mean_shifted = sum[c] / double(count);
    mean[c] = static_cast<stat_t>(static_cast<double>(shift_c[c]) + mean_shifted);
    var[c] = static_cast<stat_t>(variance_from_moments(sum_sq[c] / double(count), mean_shifted));
  }
}

template <Activation kAct, typename scalar_t, typename acc_t>
void row_normalize(const scalar_t* x, int64_t N, int64_t C, int64_t S, const acc_t* scale_c,
                   const acc_t* shift_c, ActivationParams<acc_t> act, scalar_t* y) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  const std::vector<acc_t> scale = spread(scale_c, C, S);
  const std::vector<acc_t> shift = spread(shift_c, C, S);
  for_each_block(N, R, [&](int64_t first, int64_t end) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t a[W], b[W];
      load_chunk(a, scale, j0, width);
      load_chunk(b, shift, j0, width);
      for (int64_t n = first; n < end; ++n) {
        const scalar_t* __restrict src = x + n * R + j0;
        scalar_t* __restrict dst = y + n * R + j0;
        #pragma omp simd
        for (int64_t j = 0; j < width; ++j) dst[j] = batch_norm_output<kAct>(src[j], a[j], b[j], act);
      }
    });
  });
}

// The per-column rows of a channel's backward coefficients (scale, shift, mean of each
// channel spread over its S columns), built once per call and shared by both backward passes.
template <typename acc_t>
struct BackwardRows {
  std::vector<acc_t> scale, shift, mean;
  BackwardRows(const acc_t* scale_c, const acc_t* shift_c, const acc_t* mean_c, int64_t C,
               int64_t S)
      : scale(spread(scale_c, C, S)), shift(spread(shift_c, C, S)), mean(spread(mean_c, C, S)) {}
};

// Backward's reduction on rows: per-channel sum(dy') and sum(dy' * (x - mean)), in double.
template <Activation kAct, typename scalar_t, typename acc_t>
void row_gradient_sums(const scalar_t* x, const scalar_t* dy, int64_t N, int64_t C, int64_t S,
                       const BackwardRows<acc_t>& coefficients, ActivationParams<acc_t> act,
                       double* sum_dy, double* sum_dy_xmu) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  row_reduce<acc_t>(N, C, S, [&](int64_t first, int64_t end, acc_t* rows) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t sums[W] = {}, products[W] = {}, a[W], b[W], mu[W];
      load_chunk(a, coefficients.scale, j0, width);
      load_chunk(b, coefficients.shift, j0, width);
      load_chunk(mu, coefficients.mean, j0, width);
      for (int64_t n = first; n < end; ++n) {
        const scalar_t* __restrict xs = x + n * R + j0;
        const scalar_t* __restrict dys = dy + n * R + j0;
        #pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const acc_t g = activation_masked_gradient<kAct>(xs[j], dys[j], a[j], b[j], act);
          sums[j] += g;
          products[j] += g * (static_cast<acc_t>(xs[j]) - mu[j]);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        rows[j0 + j] = sums[j];
        rows[R + j0 + j] = products[j];
      }
    });
  }, sum_dy, sum_dy_xmu);
}

// Backward's element-wise pass on rows: dx from the per-channel terms of channel_gradient
// (mean_dy_c, proj_c) and the coefficients' rows.
template <Activation kAct, typename scalar_t, typename acc_t>
void row_grad_input(const scalar_t* x, const scalar_t* dy, int64_t N, int64_t C, int64_t S,
                    const BackwardRows<acc_t>& coefficients, ActivationParams<acc_t> act,
                    const acc_t* mean_dy_c, const acc_t* proj_c, bool training, scalar_t* dx) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  const std::vector<acc_t> mean_dy = spread(mean_dy_c, C, S);
  const std::vector<acc_t> proj = spread(proj_c, C, S);
  for_each_block(N, R, [&](int64_t first, int64_t end) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t a[W], b[W], mu[W], mdy[W], pr[W];
      load_chunk(a, coefficients.scale, j0, width);
      load_chunk(b, coefficients.shift, j0, width);
      load_chunk(mu, coefficients.mean, j0, width);
      load_chunk(mdy, mean_dy, j0, width);
      load_chunk(pr, proj, j0, width);
      // `training` out of the loop, as in grad_input_plane.
      auto pass = [&](auto is_training) {
        for (int64_t n = first; n < end; ++n) {
          const scalar_t* __restrict xs = x + n * R + j0;
          const scalar_t* __restrict dys = dy + n * R + j0;
          scalar_t* __restrict dxs = dx + n * R + j0;
          #pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const acc_t g = activation_masked_gradient<kAct>(xs[j], dys[j], a[j], b[j], act);
            const acc_t xmu = static_cast<acc_t>(xs[j]) - mu[j];
            dxs[j] = static_cast<scalar_t>(batch_norm_grad_input(
                g, xmu, mdy[j], pr[j], a[j], decltype(is_training)::value));
          }
        }
      };
      if (training) {
        pass(std::true_type{});
      } else {
        pass(std::false_type{});
      }
    });
  });
}

// Backward on rows: per-channel sum(dy') and sum(dy' * (x - mean)) into sum_dy/sum_dy_xmu,
// then (when dx != nullptr) the element-wise pass.
template <Activation kAct, typename scalar_t, typename acc_t>
void row_backward(const scalar_t* x, const scalar_t* dy, int64_t N, int64_t C, int64_t S,
                  const acc_t* scale_c, const acc_t* shift_c, ActivationParams<acc_t> act,
                  const acc_t* mean_c, const acc_t* invstd_c, bool training, double* sum_dy,
                  double* sum_dy_xmu, scalar_t* dx) {
  const BackwardRows<acc_t> coefficients(scale_c, shift_c, mean_c, C, S);
  row_gradient_sums<kAct>(x, dy, N, C, S, coefficients, act, sum_dy, sum_dy_xmu);
  if (dx == nullptr) return;
  const int64_t count = N * S;
  std::vector<acc_t> mean_dy_c(C), proj_c(C);
  for (int64_t c = 0; c < C; ++c) {
    const ChannelGradient<acc_t> grad =
        channel_gradient(sum_dy[c], sum_dy_xmu[c], count, invstd_c[c], training);
    mean_dy_c[c] = grad.mean_dy;
    proj_c[c] = grad.proj;
  }
  row_grad_input<kAct>(x, dy, N, C, S, coefficients, act, mean_dy_c.data(), proj_c.data(),
                       training, dx);
}

}  // namespace convkit::cpu_batch_norm
