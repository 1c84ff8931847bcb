// Fused BatchNorm(+ReLU) on the CPU, forward and backward, training and eval.
//
// Two layouts of the same passes:
//  * planes (C*S > 4096, e.g. ResNet's 56x56 maps): the input is viewed as [N, C, S] and
//    work is split over channels, so every reduction is a loop owned by one thread.
//  * rows (C*S <= 4096: the chapter's 14x14 ... 1x1 maps, whose planes are 1-196 values):
//    each image's [C*S] values are one contiguous row; every pass is a vectorised loop along
//    it with the per-channel constants spread into rows, reductions accumulate rows of sums
//    per block of 32 images, then per channel in double in block order.
// Either way the results do not depend on the thread count.
// Forward, training: one read for the statistics (sums of (x - shift) and its square,
//   shift = the channel's first value, which keeps the variance accurate when the mean is
//   large; blocks in float, totals in double), then one read + one write to normalise:
//   y = x * scale + shift_c with scale = weight * invstd, shift_c = bias - mean * scale,
//   clamped at 0 when relu.
// Forward, eval: the read + write only, with the running statistics.
// Backward: one read of (x, dy) for sum(dy') and sum(dy' * (x - mean)) where dy' is dy masked
//   by y > 0 (y recomputed from x with the forward's own arithmetic, so the mask is exactly
//   the forward's and y is never stored), then one element-wise pass for grad_input.
// Floors (memory-bound): training forward 3 tensor passes (read x twice, write y), backward 5
//   (read x and dy twice, write dx), eval 2; at the measured copy bandwidth (~40 GB/s for
//   read + write on this machine's two cores) [32,64,56,56] (25.7 MB) needs >= 1.9 / 3.2 /
//   1.3 ms, and torch's BN then ReLU moves 5 / 7 / 4 passes for the same work. Chapter-sized
//   tensors (0.1-3 MB) live in L2/L3, where the passes run faster than the copy figure.
// Why the loops look as they do:
//  * every loop carries `omp simd`: without it the compiler keeps a float sum's order and runs
//    one add per 4 cycles;
//  * the relu flag is a template parameter (kRelu), never tested inside a loop: GCC leaves such
//    a loop scalar;
//  * rows are walked 256 bytes at a time with the images inner, so a chunk's constants and sums
//    stay in registers;
//  * outputs of >= 16 MiB are written with non-temporal stores (float, AVX-512): a plain store
//    reads each line before writing it;
//  * tensors under 32K values per thread stay on one thread, and the output and input gradient
//    come from the CPU block cache (block_cache.cpp): a call's fixed cost (~7 us) is then
//    about that of the dispatcher.
// Measurements behind these choices: docs/performance-notes.md.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../batch_norm.h"
#include "../checks.h"
#include "../cuda_emu/emulated_ops.h"
#include "../cuda_emu/routing.h"
#include "block_cache.h"
#include "parallel.h"

namespace convkit {
namespace {

// Reductions sum blocks of this many values in acc_t (vectorised), the blocks in double:
// float rounding stays that of a 1024-term sum however large the channel.
constexpr int64_t kSumBlock = 1024;

// A per-channel tensor in the accumulation type, contiguous: itself when it already is (the
// usual case), without a trip through the dispatcher. At the chapter's sizes an op's fixed
// cost is a third of its time.
at::Tensor as_acc_contiguous(const at::Tensor& t, at::ScalarType acc_type) {
  if (t.scalar_type() == acc_type && t.is_contiguous()) return t;
  return t.to(acc_type).contiguous();
}

// Per-channel parameter in the accumulation type, or `fill` when the tensor is absent.
at::Tensor per_channel_or(const std::optional<at::Tensor>& t, int64_t channels,
                          at::ScalarType acc_type, double fill, const at::TensorOptions& options) {
  if (t.has_value() && t->defined()) return as_acc_contiguous(*t, acc_type);
  return at::full({channels}, fill, options.dtype(acc_type));
}

// dy' for one element: dy, zeroed where the fused ReLU did not pass the output (when kRelu).
// Forced inline: as a plain inline function GCC called it from the row path's loops and left
// them scalar (backward [64,8,14,14] 0.028 -> 0.049 ms).
template <bool kRelu, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline acc_t relu_masked_gradient(scalar_t x, scalar_t dy, acc_t scale,
                                                             acc_t shift) {
  const acc_t dy_value = static_cast<acc_t>(dy);
  return !kRelu || batch_norm_relu_passes(x, scale, shift) ? dy_value : acc_t(0);
}

// sum(dy') and sum(dy' * (x - mean)) over one block of a plane, dy' = dy masked by the ReLU
// (when kRelu). The mask is a compile-time choice and the loop a plain reduction: with the
// relu flag tested inside, GCC left this loop scalar (v3's plane backward ran at 16 GB/s).
template <bool kRelu, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> masked_gradient_sums(const scalar_t* __restrict x,
                                             const scalar_t* __restrict dy, int64_t len,
                                             acc_t scale, acc_t shift, acc_t mean) {
  acc_t sum_dy = acc_t(0), sum_dy_xmu = acc_t(0);
  #pragma omp simd reduction(+ : sum_dy, sum_dy_xmu)
  for (int64_t s = 0; s < len; ++s) {
    const acc_t g = relu_masked_gradient<kRelu>(x[s], dy[s], scale, shift);
    sum_dy += g;
    sum_dy_xmu += g * (static_cast<acc_t>(x[s]) - mean);
  }
  return {sum_dy, sum_dy_xmu};
}

// Outputs at least this large are written with non-temporal stores (float, AVX-512): they
// do not fit the caches next to the input anyway, and a plain store first reads each line
// it writes, a third pass over memory.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// y = x * scale + shift (clamped at 0 when kRelu) over one plane.
template <bool kRelu, typename scalar_t, typename acc_t>
void normalize_plane(const scalar_t* __restrict x, int64_t len, acc_t scale, acc_t shift,
                     scalar_t* __restrict y, bool stream) {
  int64_t s = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (stream) {
      // Plain stores up to the first 64-byte boundary, then whole aligned vectors.
      for (; s < len && (reinterpret_cast<uintptr_t>(y + s) & 63) != 0; ++s) {
        y[s] = batch_norm_output(x[s], scale, shift, kRelu);
      }
      const __m512 a = _mm512_set1_ps(scale);
      const __m512 b = _mm512_set1_ps(shift);
      for (; s + 16 <= len; s += 16) {
        __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + s), a, b);
        // max_ps returns its second operand when either is NaN: NaN stays NaN, as in
        // batch_norm_output.
        if (kRelu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
        _mm512_stream_ps(y + s, v);
      }
    }
  }
#endif
  #pragma omp simd
  for (int64_t i = s; i < len; ++i) y[i] = batch_norm_output(x[i], scale, shift, kRelu);
}

// The input gradient over one plane (see batch_norm_grad_input).
template <bool kRelu, typename scalar_t, typename acc_t>
void grad_input_plane(const scalar_t* __restrict x, const scalar_t* __restrict dy, int64_t len,
                      acc_t scale, acc_t shift, acc_t mean, acc_t mean_dy, acc_t proj,
                      bool training, scalar_t* __restrict dx) {
  #pragma omp simd
  for (int64_t s = 0; s < len; ++s) {
    const acc_t g = relu_masked_gradient<kRelu>(x[s], dy[s], scale, shift);
    const acc_t xmu = static_cast<acc_t>(x[s]) - mean;
    dx[s] = static_cast<scalar_t>(batch_norm_grad_input(g, xmu, mean_dy, proj, scale, training));
  }
}

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
int64_t block_grain(int64_t R) {
  const int64_t block_values = std::max<int64_t>(kImagesPerBlock * R, 1);
  return std::max<int64_t>(1, (kMinValuesPerThread + block_values - 1) / block_values);
}

bool use_row_path(int64_t C, int64_t S) { return C * S <= kMaxRowLength; }

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
// one load. v3 streamed every constant row per image: 7 loads and 2 stores per vector in
// the backward's reduction, which bound it at ~7 cycles per 16 values.
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

template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* x, int64_t N, int64_t C, int64_t S, acc_t* mean, acc_t* var) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  const int64_t count = N * S;
  // Shift by each channel's first value: keeps the variance accurate for large means.
  std::vector<acc_t> shift_c(C);
  for (int64_t c = 0; c < C; ++c) shift_c[c] = statistics_shift(static_cast<acc_t>(x[c * S]));
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
    mean[c] = static_cast<acc_t>(static_cast<double>(shift_c[c]) + mean_shifted);
    var[c] = static_cast<acc_t>(variance_from_moments(sum_sq[c] / double(count), mean_shifted));
  }
}

template <bool kRelu, typename scalar_t, typename acc_t>
void row_normalize(const scalar_t* x, int64_t N, int64_t C, int64_t S, const acc_t* scale_c,
                   const acc_t* shift_c, scalar_t* y) {
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
        for (int64_t j = 0; j < width; ++j) dst[j] = batch_norm_output(src[j], a[j], b[j], kRelu);
      }
    });
  });
}

// Backward on rows: per-channel sum(dy') and sum(dy' * (x - mean)) into sum_dy/sum_dy_xmu,
// then (when dx != nullptr) the element-wise pass.
template <bool kRelu, typename scalar_t, typename acc_t>
void row_backward(const scalar_t* x, const scalar_t* dy, int64_t N, int64_t C, int64_t S,
                  const acc_t* scale_c, const acc_t* shift_c, const acc_t* mean_c,
                  const acc_t* invstd_c, bool training, double* sum_dy, double* sum_dy_xmu,
                  scalar_t* dx) {
  constexpr int64_t W = kChunk<acc_t>;
  const int64_t R = C * S;
  const int64_t count = N * S;
  const std::vector<acc_t> scale = spread(scale_c, C, S);
  const std::vector<acc_t> shift = spread(shift_c, C, S);
  const std::vector<acc_t> mean = spread(mean_c, C, S);
  row_reduce<acc_t>(N, C, S, [&](int64_t first, int64_t end, acc_t* rows) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t sums[W] = {}, products[W] = {}, a[W], b[W], mu[W];
      load_chunk(a, scale, j0, width);
      load_chunk(b, shift, j0, width);
      load_chunk(mu, mean, j0, width);
      for (int64_t n = first; n < end; ++n) {
        const scalar_t* __restrict xs = x + n * R + j0;
        const scalar_t* __restrict dys = dy + n * R + j0;
        #pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const acc_t g = relu_masked_gradient<kRelu>(xs[j], dys[j], a[j], b[j]);
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
  if (dx == nullptr) return;
  std::vector<acc_t> mean_dy_c(C), proj_c(C);
  for (int64_t c = 0; c < C; ++c) {
    const ChannelGradient<acc_t> grad =
        channel_gradient(sum_dy[c], sum_dy_xmu[c], count, invstd_c[c], training);
    mean_dy_c[c] = grad.mean_dy;
    proj_c[c] = grad.proj;
  }
  const std::vector<acc_t> mean_dy = spread(mean_dy_c.data(), C, S);
  const std::vector<acc_t> proj = spread(proj_c.data(), C, S);
  for_each_block(N, R, [&](int64_t first, int64_t end) {
    for_each_chunk<acc_t>(R, [&](int64_t j0, auto width) {
      acc_t a[W], b[W], mu[W], mdy[W], pr[W];
      load_chunk(a, scale, j0, width);
      load_chunk(b, shift, j0, width);
      load_chunk(mu, mean, j0, width);
      load_chunk(mdy, mean_dy, j0, width);
      load_chunk(pr, proj, j0, width);
      for (int64_t n = first; n < end; ++n) {
        const scalar_t* __restrict xs = x + n * R + j0;
        const scalar_t* __restrict dys = dy + n * R + j0;
        scalar_t* __restrict dxs = dx + n * R + j0;
        #pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const acc_t g = relu_masked_gradient<kRelu>(xs[j], dys[j], a[j], b[j]);
          const acc_t xmu = static_cast<acc_t>(xs[j]) - mu[j];
          dxs[j] = static_cast<scalar_t>(
              batch_norm_grad_input(g, xmu, mdy[j], pr[j], a[j], training));
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  const char* op = "convkit::batch_norm_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const auto [N, C, S, count] = check_batch_norm_forward(op, input, weight, bias, running_mean,
                                                         running_var, training, eps);
  const at::Tensor x = input.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  at::Tensor output = cached_empty(x.sizes(), x.options());
  at::Tensor save_mean = at::empty({C}, acc_options);
  at::Tensor save_var = at::empty({C}, acc_options);
  const at::Tensor w = per_channel_or(weight, C, acc_type, 1.0, x.options());
  const at::Tensor b = per_channel_or(bias, C, acc_type, 0.0, x.options());

  if (!training) {
    // The running statistics as the saved ones (the backward's constants).
    const at::Tensor rm = as_acc_contiguous(*running_mean, acc_type);
    const at::Tensor rv = as_acc_contiguous(*running_var, acc_type);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "batch_norm_save_running", [&] {
      std::copy_n(rm.const_data_ptr<scalar_t>(), C, save_mean.mutable_data_ptr<scalar_t>());
      std::copy_n(rv.const_data_ptr<scalar_t>(), C, save_var.mutable_data_ptr<scalar_t>());
    });
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
    acc_t* mean_ptr = save_mean.mutable_data_ptr<acc_t>();
    acc_t* var_ptr = save_var.mutable_data_ptr<acc_t>();
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b.const_data_ptr<acc_t>();
    if (use_row_path(C, S)) {
      if (training) {
        if (count == 0) {
          std::fill(mean_ptr, mean_ptr + C, acc_t(0));
          std::fill(var_ptr, var_ptr + C, acc_t(0));
        } else {
          row_statistics(x_ptr, N, C, S, mean_ptr, var_ptr);
        }
      }
      std::vector<acc_t> scale(C), shift(C);
      for (int64_t c = 0; c < C; ++c) {
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        scale[c] = affine.scale;
        shift[c] = affine.shift;
      }
      if (relu) {
        row_normalize<true>(x_ptr, N, C, S, scale.data(), shift.data(), y_ptr);
      } else {
        row_normalize<false>(x_ptr, N, C, S, scale.data(), shift.data(), y_ptr);
      }
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(count, 1));
    const bool stream = output.nbytes() >= kStreamingBytes;
    parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
      // The non-temporal stores are visible to other threads once this thread's task ends.
      struct StoreFence {
        ~StoreFence() { _mm_sfence(); }
      } fence;
#endif
      for (int64_t c = begin; c < end; ++c) {
        if (training) {
          if (count == 0) {
            mean_ptr[c] = acc_t(0);
            var_ptr[c] = acc_t(0);
          } else {
            // Sums of (x - shift) and its square, shift = the channel's first value (keeps
            // the variance accurate when the mean is large): blocks of up to kSumBlock values
            // summed in acc_t by a vectorised reduction, the blocks in double.
            const acc_t shift_acc = statistics_shift(static_cast<acc_t>(x_ptr[c * S]));
            const double shift = static_cast<double>(shift_acc);
            double sum = 0.0, sum_sq = 0.0;
            for (int64_t n = 0; n < N; ++n) {
              const scalar_t* plane = x_ptr + (n * C + c) * S;
              for (int64_t s0 = 0; s0 < S; s0 += kSumBlock) {
                const int64_t len = std::min(kSumBlock, S - s0);
                acc_t block_sum = acc_t(0), block_sum_sq = acc_t(0);
                _Pragma("omp simd reduction(+ : block_sum, block_sum_sq)")
                for (int64_t s = s0; s < s0 + len; ++s) {
                  const acc_t d = static_cast<acc_t>(plane[s]) - shift_acc;
                  block_sum += d;
                  block_sum_sq += d * d;
                }
                sum += static_cast<double>(block_sum);
                sum_sq += static_cast<double>(block_sum_sq);
              }
            }
            const double mean_shifted = sum / double(count);
            const double var = variance_from_moments(sum_sq / double(count), mean_shifted);
            mean_ptr[c] = static_cast<acc_t>(shift + mean_shifted);
            var_ptr[c] = static_cast<acc_t>(var);
          }
        }
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        const acc_t scale = affine.scale;
        const acc_t shift = affine.shift;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* src = x_ptr + (n * C + c) * S;
          scalar_t* dst = y_ptr + (n * C + c) * S;
          if (relu) {
            normalize_plane<true>(src, S, scale, shift, dst, stream);
          } else {
            normalize_plane<false>(src, S, scale, shift, dst, stream);
          }
        }
      }
    });
  });
  return std::make_tuple(output.view(input.sizes()), save_mean, save_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, bool relu, std::array<bool, 3> output_mask) {
  const char* op = "convkit::batch_norm_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, save_mean, save_var);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = per_channel_or(weight, C, acc_type, 1.0, x.options());
  const at::Tensor b = per_channel_or(bias, C, acc_type, 0.0, x.options());
  const at::Tensor mean = as_acc_contiguous(save_mean, acc_type);
  const at::Tensor var = as_acc_contiguous(save_var, acc_type);

  at::Tensor grad_input =
      output_mask[0] ? cached_empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const at::ScalarType param_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  at::Tensor grad_weight_acc = at::empty({C}, x.options().dtype(acc_type));
  at::Tensor grad_bias_acc = at::empty({C}, x.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b.const_data_ptr<acc_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* var_ptr = var.const_data_ptr<acc_t>();
    acc_t* gw_ptr = grad_weight_acc.mutable_data_ptr<acc_t>();
    acc_t* gb_ptr = grad_bias_acc.mutable_data_ptr<acc_t>();
    if (use_row_path(C, S)) {
      std::vector<acc_t> scale(C), shift(C), invstd(C);
      for (int64_t c = 0; c < C; ++c) {
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        invstd[c] = affine.invstd;
        scale[c] = affine.scale;
        shift[c] = affine.shift;
      }
      std::vector<double> sum_dy(C), sum_dy_xmu(C);
      if (relu) {
        row_backward<true>(x_ptr, dy_ptr, N, C, S, scale.data(), shift.data(), mean_ptr,
                           invstd.data(), training, sum_dy.data(), sum_dy_xmu.data(), dx_ptr);
      } else {
        row_backward<false>(x_ptr, dy_ptr, N, C, S, scale.data(), shift.data(), mean_ptr,
                            invstd.data(), training, sum_dy.data(), sum_dy_xmu.data(), dx_ptr);
      }
      for (int64_t c = 0; c < C; ++c) {
        const ChannelGradient<acc_t> grad =
            channel_gradient(sum_dy[c], sum_dy_xmu[c], count, invstd[c], training);
        gw_ptr[c] = grad.grad_weight;
        gb_ptr[c] = grad.grad_bias;
      }
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(count, 1));
    parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        const acc_t scale = affine.scale;
        const acc_t shift = affine.shift;
        const acc_t mu = mean_ptr[c];
        // Reduction pass: sum(dy') and sum(dy' * (x - mean)). Blocks of each plane are
        // summed in acc_t by a vectorised loop, the blocks in double.
        double sum_dy = 0.0, sum_dy_xmu = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = x_ptr + (n * C + c) * S;
          const scalar_t* dys = dy_ptr + (n * C + c) * S;
          for (int64_t s0 = 0; s0 < S; s0 += kSumBlock) {
            const int64_t len = std::min(kSumBlock, S - s0);
            const auto [block_dy, block_dy_xmu] =
                relu ? masked_gradient_sums<true>(xs + s0, dys + s0, len, scale, shift, mu)
                     : masked_gradient_sums<false>(xs + s0, dys + s0, len, scale, shift, mu);
            sum_dy += static_cast<double>(block_dy);
            sum_dy_xmu += static_cast<double>(block_dy_xmu);
          }
        }
        const ChannelGradient<acc_t> grad =
            channel_gradient(sum_dy, sum_dy_xmu, count, affine.invstd, training);
        gw_ptr[c] = grad.grad_weight;
        gb_ptr[c] = grad.grad_bias;
        if (dx_ptr == nullptr) continue;
        // Element-wise pass. Training: the mean and variance depend on x, which adds the two
        // correction terms; eval: statistics are constants.
        const acc_t mean_dy = grad.mean_dy;
        const acc_t proj = grad.proj;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = x_ptr + (n * C + c) * S;
          const scalar_t* dys = dy_ptr + (n * C + c) * S;
          scalar_t* dxs = dx_ptr + (n * C + c) * S;
          if (relu) {
            grad_input_plane<true>(xs, dys, S, scale, shift, mu, mean_dy, proj, training, dxs);
          } else {
            grad_input_plane<false>(xs, dys, S, scale, shift, mu, mean_dy, proj, training, dxs);
          }
        }
      }
    });
  });

  at::Tensor grad_weight =
      output_mask[1] ? grad_weight_acc.to(param_type) : at::empty({0}, x.options());
  const at::ScalarType bias_type =
      bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
  at::Tensor grad_bias = output_mask[2] ? grad_bias_acc.to(bias_type) : at::empty({0}, x.options());
  if (output_mask[0]) grad_input = grad_input.view(input.sizes());
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

// running = (1 - momentum) * running + momentum * batch (the variance times `unbias`), in
// double, for batch statistics of type stat_t.
template <typename stat_t>
void update_running_statistics(const at::Tensor& running_mean, const at::Tensor& running_var,
                               const stat_t* batch_mean, const stat_t* batch_var, int64_t C,
                               double momentum, double unbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(),
                                  "batch_norm_update_mean_cpu", [&] {
    // Strided running statistics (a view) are updated in place, as torch does.
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    const int64_t step = running_mean.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      rm[c * step] = static_cast<scalar_t>(updated_running_stat(
          static_cast<double>(rm[c * step]), static_cast<double>(batch_mean[c]), momentum, 1.0));
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_var.scalar_type(),
                                  "batch_norm_update_var_cpu", [&] {
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    const int64_t step = running_var.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      rv[c * step] = static_cast<scalar_t>(updated_running_stat(
          static_cast<double>(rv[c * step]), static_cast<double>(batch_var[c]), momentum, unbias));
    }
  });
}

void batch_norm_update_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                 double momentum, int64_t count) {
  const char* op = "convkit::batch_norm_update_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  check_batch_norm_update_stats(op, running_mean, running_var, batch_mean, batch_var, count);
  const int64_t C = batch_mean.numel();
  if (count == 0) return;  // an empty batch leaves the running statistics as they are
  const double unbias = running_var_unbias(count);
  // The forward's statistics (contiguous float or double) are read in place: converting them
  // to double first took two allocations and more than half of this op's ~4 us.
  const at::ScalarType stat_type = batch_mean.scalar_type();
  if ((stat_type == at::kFloat || stat_type == at::kDouble) &&
      batch_var.scalar_type() == stat_type && batch_mean.is_contiguous() &&
      batch_var.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(stat_type, "batch_norm_update_stats_cpu", [&] {
      update_running_statistics(running_mean, running_var, batch_mean.const_data_ptr<scalar_t>(),
                                batch_var.const_data_ptr<scalar_t>(), C, momentum, unbias);
    });
    return;
  }
  const at::Tensor mean = batch_mean.to(at::kDouble).contiguous();
  const at::Tensor var = batch_var.to(at::kDouble).contiguous();
  update_running_statistics(running_mean, running_var, mean.const_data_ptr<double>(),
                            var.const_data_ptr<double>(), C, momentum, unbias);
}

}  // namespace

// While CUDA emulation is on in the calling thread, each op runs its CUDA code on the CPU
// instead (csrc/cuda_emu/routing.h).
TORCH_LIBRARY_IMPL(convkit, CPU, m) {
  m.impl("batch_norm_forward",
         &RoutedKernel<&batch_norm_forward_cpu, &emulated_cuda::batch_norm_forward>::call);
  m.impl("batch_norm_backward",
         &RoutedKernel<&batch_norm_backward_cpu, &emulated_cuda::batch_norm_backward>::call);
  m.impl("batch_norm_update_stats",
         &RoutedKernel<&batch_norm_update_stats_cpu, &emulated_cuda::batch_norm_update_stats>::call);
}

}  // namespace convkit
