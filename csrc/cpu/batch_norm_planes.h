// Batch norm's per-plane loops on the CPU (the planes layout of batch_norm.cpp: [N, C, S]
// with work split over channels): the gradient sums through the activation, the normalisation
// with optional non-temporal stores, and the input gradient of one plane. Each loop is a plain
// vectorised loop; the activation is a template parameter, never a flag tested inside a loop.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../batch_norm.h"

namespace convkit::cpu_batch_norm {

// The widest vector register of the instruction set these kernels are compiled for, in bytes.
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif

// Reductions sum blocks of this many values in acc_t (vectorised), the blocks in double: each
// float lane sums 32 values of a block, so float rounding is that of a 32-term sum whatever
// the vector width and however large the channel.
constexpr int64_t kSumBlock = 32 * kVectorBytes / static_cast<int64_t>(sizeof(float));

// sum(dy') and sum(dy' * (x - mean)) over one block of a plane, dy' = dy * f'(z). The
// activation is a compile-time choice and the loop a plain reduction: with a flag tested
// inside, GCC left this loop scalar (the plane backward then ran at 16 GB/s).
template <Activation kAct, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> masked_gradient_sums(const scalar_t* __restrict x,
                                             const scalar_t* __restrict dy, int64_t len,
                                             acc_t scale, acc_t shift, acc_t mean,
                                             ActivationParams<acc_t> act) {
  acc_t sum_dy = acc_t(0), sum_dy_xmu = acc_t(0);
  #pragma omp simd reduction(+ : sum_dy, sum_dy_xmu)
  for (int64_t s = 0; s < len; ++s) {
    const acc_t g = activation_masked_gradient<kAct>(x[s], dy[s], scale, shift, act);
    sum_dy += g;
    sum_dy_xmu += g * (static_cast<acc_t>(x[s]) - mean);
  }
  return {sum_dy, sum_dy_xmu};
}

// The value channel c's statistics are taken about (x [N, C, S], N * S > 0): the mean of its
// first kShiftSample values, image after image, which lies within a fraction of a std of the
// channel's mean. The variance then comes from E[d^2] - E[d]^2 of d = x - shift with nothing
// to cancel. The channel's first value alone can lie several std off (post-ReLU6 activations
// of MobileNetV2: 4-5), and the float block sums then cost 3e-6 of the variance, 10x torch's
// error. A non-finite sample gives 0 (statistics_shift).
constexpr int64_t kShiftSample = 32;

template <typename scalar_t, typename acc_t>
acc_t channel_shift(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t c) {
  double sum = 0.0;
  int64_t taken = 0;
  for (int64_t n = 0; n < N && taken < kShiftSample; ++n) {
    const scalar_t* plane = x + (n * C + c) * S;
    const int64_t take = std::min(S, kShiftSample - taken);
    for (int64_t s = 0; s < take; ++s) sum += static_cast<double>(plane[s]);
    taken += take;
  }
  return statistics_shift(static_cast<acc_t>(sum / double(taken)));
}

// Channel c's mean and biased variance over its N planes of S values of x [N, C, S] (count =
// N * S > 0), in double: sums of (x - shift) and its square, shift = channel_shift (keeps the
// variance accurate when the mean is large), in blocks of up to kSumBlock values
// summed in acc_t by a vectorised reduction, the blocks in double.
template <typename scalar_t, typename acc_t>
std::pair<double, double> plane_statistics(const scalar_t* x, int64_t N, int64_t C, int64_t S,
                                           int64_t c) {
  const acc_t shift_acc = channel_shift<scalar_t, acc_t>(x, N, C, S, c);
  const double shift = static_cast<double>(shift_acc);
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* plane = x + (n * C + c) * S;
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
  const double count = double(N) * double(S);
  const double mean_shifted = sum / count;
  return {shift + mean_shifted, variance_from_moments(sum_sq / count, mean_shifted)};
}

// Channel c's sum(dy') and sum(dy' * (x - mean)) over its N planes, in double (blocks of each
// plane summed in acc_t by masked_gradient_sums).
template <Activation kAct, typename scalar_t, typename acc_t>
std::pair<double, double> plane_gradient_sums(const scalar_t* x, const scalar_t* dy, int64_t N,
                                              int64_t C, int64_t S, int64_t c, acc_t scale,
                                              acc_t shift, acc_t mean,
                                              ActivationParams<acc_t> act) {
  double sum_dy = 0.0, sum_dy_xmu = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* xs = x + (n * C + c) * S;
    const scalar_t* dys = dy + (n * C + c) * S;
    for (int64_t s0 = 0; s0 < S; s0 += kSumBlock) {
      const int64_t len = std::min(kSumBlock, S - s0);
      const auto [block_dy, block_dy_xmu] =
          masked_gradient_sums<kAct>(xs + s0, dys + s0, len, scale, shift, mean, act);
      sum_dy += static_cast<double>(block_dy);
      sum_dy_xmu += static_cast<double>(block_dy_xmu);
    }
  }
  return {sum_dy, sum_dy_xmu};
}

// Outputs at least this large are written with non-temporal stores (float, AVX-512): they
// do not fit the caches next to the input anyway, and a plain store first reads each line
// it writes, a third pass over memory.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// Held by each parallel task that may call normalize_plane with `stream`: its non-temporal
// stores are visible to other threads once the task ends (a no-op without AVX-512, which has
// no streaming path).
struct StreamingStoreFence {
#if defined(__AVX512F__)
  ~StreamingStoreFence() { _mm_sfence(); }
#endif
};

// y = f(x * scale + shift) over one plane. The streaming stores are written for no activation
// and ReLU; the others are compute-heavier and use plain stores.
template <Activation kAct, typename scalar_t, typename acc_t>
void normalize_plane(const scalar_t* __restrict x, int64_t len, acc_t scale, acc_t shift,
                     ActivationParams<acc_t> act, scalar_t* __restrict y, bool stream) {
  int64_t s = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> &&
                (kAct == Activation::none || kAct == Activation::relu)) {
    if (stream) {
      // Plain stores up to the first 64-byte boundary, then whole aligned vectors.
      for (; s < len && (reinterpret_cast<uintptr_t>(y + s) & 63) != 0; ++s) {
        y[s] = batch_norm_output<kAct>(x[s], scale, shift, act);
      }
      const __m512 a = _mm512_set1_ps(scale);
      const __m512 b = _mm512_set1_ps(shift);
      for (; s + 16 <= len; s += 16) {
        __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(x + s), a, b);
        // max_ps returns its second operand when either is NaN: NaN stays NaN, as in
        // batch_norm_output.
        if constexpr (kAct == Activation::relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
        _mm512_stream_ps(y + s, v);
      }
    }
  }
#endif
  #pragma omp simd
  for (int64_t i = s; i < len; ++i) y[i] = batch_norm_output<kAct>(x[i], scale, shift, act);
}

// The input gradient over one plane (see batch_norm_grad_input). `training` is taken out of
// the loop: tested inside, it left SiLU's loop scalar (4 ns an element, 20x the others).
template <Activation kAct, typename scalar_t, typename acc_t>
void grad_input_plane(const scalar_t* __restrict x, const scalar_t* __restrict dy, int64_t len,
                      acc_t scale, acc_t shift, ActivationParams<acc_t> act, acc_t mean,
                      acc_t mean_dy, acc_t proj, bool training, scalar_t* __restrict dx) {
  auto pass = [&](auto is_training) {
    #pragma omp simd
    for (int64_t s = 0; s < len; ++s) {
      const acc_t g = activation_masked_gradient<kAct>(x[s], dy[s], scale, shift, act);
      const acc_t xmu = static_cast<acc_t>(x[s]) - mean;
      dx[s] = static_cast<scalar_t>(
          batch_norm_grad_input(g, xmu, mean_dy, proj, scale, decltype(is_training)::value));
    }
  };
  if (training) {
    pass(std::true_type{});
  } else {
    pass(std::false_type{});
  }
}

}  // namespace convkit::cpu_batch_norm
