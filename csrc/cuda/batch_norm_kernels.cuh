// Fused BatchNorm(+activation)'s CUDA kernels (device code only; the launch plan is in
// batch_norm_ops.h). The input is viewed as [N, C, S] (contiguous), count = N * S values per
// channel.
//
// Per-channel reductions (forward statistics, backward sums) share one layout, the
// ChannelReductionPlan: a block of kThreads threads serves `kThreads / tpc` channels with `tpc`
// threads each (tpc a power of 2, sized so that each thread reads about kElementsPerThread
// values), and a channel with many values is cut into `slices` blocks along blockIdx.y. Each
// group of tpc threads reduces its values with warp shuffles (width tpc up to 32) and, when it
// spans several warps, through shared memory; one partial result per (channel, slice) goes to
// global memory and a one-thread-per-channel kernel merges the slices in a fixed order
// (deterministic, no atomics). Channels are on gridDim.x, so any C fits.
//   forward, training  partial_stats_kernel (Welford count/mean/M2 per thread of the finite
//                      values about the channel's first value, merged with Chan's formula,
//                      int64 counts exact at any size; the non-finite values summed apart, so
//                      that a channel with an inf gets the mean ±inf and the variance NaN, and
//                      one with a NaN NaN, as torch's batch norm on the CPU gives)
//                      -> finalize_stats_kernel
//                      -> coefficients_kernel (scale, shift) -> apply_kernel (y = f(x * scale +
//                      shift), f the fused activation, one kind per launch), vectorised by 4
//                      when S % 4 == 0 and x, y are aligned.
//   forward, eval      coefficients_kernel from the running statistics -> apply_kernel.
//   backward           backward_partial_kernel: sum(dy') and sum(dy' * (x - mean)), dy' = dy *
//                      f'(z), z recomputed from x -> backward_finalize_kernel ->
//                      grad_input_kernel.
// Memory passes: forward 1 read (statistics) + 1 read and 1 write; backward 2 reads of (x, dy) +
// 1 write. Accumulation in float (double for float64).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../batch_norm.h"
#include "common.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

constexpr int64_t kElementsPerThread = 16;
constexpr int64_t kMaxSlices = 1024;


// Statistics of a set of values: Welford's count, mean and M2 of its finite values, and the sum
// of its non-finite ones (0 when there are none; ±inf or NaN otherwise).
template <typename acc_t>
struct Welford {
  int64_t count;
  acc_t mean;
  acc_t m2;
  acc_t nonfinite;
};

template <typename acc_t>
__device__ inline void welford_add(Welford<acc_t>& w, acc_t v) {
  if (v - v != acc_t(0)) {  // NaN or ±inf
    w.nonfinite += v;
    return;
  }
  w.count += 1;
  const acc_t delta = v - w.mean;
  w.mean += delta / static_cast<acc_t>(w.count);
  w.m2 += delta * (v - w.mean);
}

template <typename acc_t>
__device__ inline Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  const int64_t count = a.count + b.count;
  const acc_t nonfinite = a.nonfinite + b.nonfinite;
  if (count == 0) return {0, acc_t(0), acc_t(0), nonfinite};
  const acc_t delta = b.mean - a.mean;
  const acc_t fraction = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  return {count, a.mean + delta * fraction,
          a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * fraction, nonfinite};
}

template <typename acc_t>
__device__ inline Welford<acc_t> shuffle_down(Welford<acc_t> w, int offset, int width) {
  return {__shfl_down_sync(0xffffffffu, w.count, offset, width),
          __shfl_down_sync(0xffffffffu, w.mean, offset, width),
          __shfl_down_sync(0xffffffffu, w.m2, offset, width),
          __shfl_down_sync(0xffffffffu, w.nonfinite, offset, width)};
}

// The two sums of the backward pass: sum(dy') and sum(dy' * (x - mean)).
template <typename acc_t>
struct GradSums {
  acc_t dy;
  acc_t dy_xmu;
};

template <typename acc_t>
__device__ inline GradSums<acc_t> sums_merge(GradSums<acc_t> a, GradSums<acc_t> b) {
  return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
}

template <typename acc_t>
__device__ inline GradSums<acc_t> shuffle_down(GradSums<acc_t> s, int offset, int width) {
  return {__shfl_down_sync(0xffffffffu, s.dy, offset, width),
          __shfl_down_sync(0xffffffffu, s.dy_xmu, offset, width)};
}

// The channel a thread serves in a ChannelReductionPlan launch (may be >= C: the thread then
// only takes part in the collectives), and its rank among the channel's tpc threads.
__device__ inline int64_t plan_channel(int threads_per_channel) {
  return int64_t(blockIdx.x) * (kThreads / threads_per_channel) + threadIdx.x / threads_per_channel;
}

// Reduces `value` over each group of `tpc` consecutive threads of the block (every thread of
// the block calls it). The group's result is in its first thread (rank 0); with tpc > 32 every
// thread of the group has it.
template <typename T, typename Merge>
__device__ inline T channel_group_reduce(T value, int tpc, SharedArray<T, kWarps>& scratch,
                                         Merge merge) {
  const int width = tpc < 32 ? tpc : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value = merge(value, shuffle_down(value, offset, width));
  }
  if (tpc <= 32) return value;
  // The group spans tpc / 32 warps, whose lane 0 now holds the warp's part.
  const int warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (threadIdx.x % 32 == 0) scratch[warp] = value;
  __syncthreads();
  const int warps_per_group = tpc / 32;
  const int first = warp - warp % warps_per_group;
  T total = scratch[first];
  for (int w = 1; w < warps_per_group; ++w) total = merge(total, static_cast<T>(scratch[first + w]));
  return total;
}

// The value channel c's statistics are taken about: the mean of its first kShiftSample values,
// image after image (statistics_shift: 0 if non-finite), as the CPU kernels. Welford's mean
// in float rounds by |mean| * 6e-8 at every update, which for a large mean showed in the
// variance (|mean| = 5000 std: 2e-3 relative); about the shift the values are of the order of
// the std. The first value alone would be as bad when it lies far from the mean. Every thread
// of the channel reads the same few values (one transaction per warp). Needs N * S > 0.
constexpr int64_t kShiftSample = 32;

template <typename scalar_t, typename acc_t>
__device__ inline acc_t channel_shift(const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                      int64_t S, int64_t c) {
  acc_t sum = acc_t(0);
  int64_t taken = 0;
  for (int64_t n = 0; n < N && taken < kShiftSample; ++n) {
    const int64_t take = S < kShiftSample - taken ? S : kShiftSample - taken;
    for (int64_t s = 0; s < take; ++s) sum += static_cast<acc_t>(x[(n * C + c) * S + s]);
    taken += take;
  }
  return statistics_shift(sum / static_cast<acc_t>(taken));
}

// partial[c * slices + slice] = Welford statistics of channel c's values in the slice, taken
// about channel_shift.
template <typename scalar_t, typename acc_t>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                     int64_t S, int threads_per_channel, int64_t per_slice,
                                     Welford<acc_t>* __restrict__ partial) {
  __shared__ SharedArray<Welford<acc_t>, kWarps> scratch;
  const int64_t c = plan_channel(threads_per_channel);
  const int rank = threadIdx.x % threads_per_channel;
  const int64_t begin = int64_t(blockIdx.y) * per_slice;
  const int64_t end = begin + per_slice < N * S ? begin + per_slice : N * S;
  Welford<acc_t> w{0, acc_t(0), acc_t(0), acc_t(0)};
  if (c < C) {
    const acc_t shift = channel_shift<scalar_t, acc_t>(x, N, C, S, c);
    for (int64_t j = begin + rank; j < end; j += threads_per_channel) {
      const int64_t n = j / S;
      welford_add(w, static_cast<acc_t>(x[(n * C + c) * S + (j - n * S)]) - shift);
    }
  }
  w = channel_group_reduce(w, threads_per_channel, scratch,
                           [](Welford<acc_t> a, Welford<acc_t> b) { return welford_merge(a, b); });
  if (c < C && rank == 0) partial[c * gridDim.y + blockIdx.y] = w;
}

// mean[c] and the biased variance var[c] from the channel's `slices` partial statistics. The
// slices are merged one after another, so in double: in float, the error of up to 1024
// sequential merges (~sqrt(slices) ulps) would show in the variance of large batches. A
// non-finite value in the channel makes the mean their sum (±inf, or NaN) and the variance NaN.
// The partial statistics are about channel_shift (read again from x when count > 0), added
// back in double. Stored as stat_t: acc_t for the forward, double for batch_norm_stats.
template <typename scalar_t, typename acc_t, typename stat_t = acc_t>
__global__ void finalize_stats_kernel(const Welford<acc_t>* __restrict__ partial,
                                      const scalar_t* __restrict__ x, int64_t S, int64_t count,
                                      int64_t C, int64_t slices, stat_t* __restrict__ mean,
                                      stat_t* __restrict__ var) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    Welford<double> w{0, 0.0, 0.0, 0.0};
    for (int64_t p = 0; p < slices; ++p) {
      const Welford<acc_t> part = partial[c * slices + p];
      w = welford_merge(w, Welford<double>{part.count, double(part.mean), double(part.m2),
                                           double(part.nonfinite)});
    }
    const bool finite = w.nonfinite == 0.0;
    const double shift =
        count > 0 ? static_cast<double>(channel_shift<scalar_t, acc_t>(x, count / S, C, S, c))
                  : 0.0;
    mean[c] = static_cast<stat_t>(finite ? shift + w.mean : w.nonfinite);
    var[c] = static_cast<stat_t>(!finite ? w.nonfinite - w.nonfinite  // NaN
                                        : w.count > 0 ? w.m2 / static_cast<double>(w.count) : 0.0);
  }
}

// scale = weight * invstd, shift = bias - mean * scale (weight 1 and bias 0 when absent).
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                    double eps, int64_t C, acc_t* __restrict__ scale,
                                    acc_t* __restrict__ shift) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const ChannelAffine<acc_t> affine =
        channel_affine(mean[c], var[c], weight != nullptr ? weight[c] : acc_t(1),
                       bias != nullptr ? bias[c] : acc_t(0), eps);
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vector {
  scalar_t values[kVec];
};

// y = batch_norm_output(x): kVec consecutive elements per thread (all in one channel, as
// S % kVec == 0 whenever kVec > 1).
template <typename scalar_t, typename acc_t, int kVec>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ shift, int64_t C, int64_t S, int64_t total,
                             Activation kind, ActivationParams<acc_t> act,
                             scalar_t* __restrict__ y) {
  using V = Vector<scalar_t, kVec>;
  const int64_t vectors = total / kVec;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < vectors;
       v += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (v * kVec / S) % C;
    const acc_t sc = scale[c];
    const acc_t sh = shift[c];
    const V in = load_aligned(reinterpret_cast<const V*>(x) + v);
    V out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) out.values[k] = batch_norm_output(in.values[k], sc, sh, kind, act);
    store_aligned(reinterpret_cast<V*>(y) + v, out);
  }
}

// partial[c * slices + slice] = the two backward sums of channel c's values in the slice.
template <typename scalar_t, typename acc_t>
__global__ void backward_partial_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ dy,
                                        const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ scale,
                                        const acc_t* __restrict__ shift, Activation kind,
                                        ActivationParams<acc_t> act, int64_t N, int64_t C,
                                        int64_t S, int threads_per_channel,
                                        int64_t per_slice, GradSums<acc_t>* __restrict__ partial) {
  __shared__ SharedArray<GradSums<acc_t>, kWarps> scratch;
  const int64_t c = plan_channel(threads_per_channel);
  const int rank = threadIdx.x % threads_per_channel;
  const int64_t begin = int64_t(blockIdx.y) * per_slice;
  const int64_t end = begin + per_slice < N * S ? begin + per_slice : N * S;
  GradSums<acc_t> sums{acc_t(0), acc_t(0)};
  if (c < C) {
    const acc_t mu = mean[c];
    const acc_t sc = scale[c];
    const acc_t sh = shift[c];
    for (int64_t j = begin + rank; j < end; j += threads_per_channel) {
      const int64_t n = j / S;
      const int64_t index = (n * C + c) * S + (j - n * S);
      const scalar_t xv = x[index];
      const acc_t g = activation_masked_gradient(xv, dy[index], sc, sh, kind, act);
      sums.dy += g;
      sums.dy_xmu += g * (static_cast<acc_t>(xv) - mu);
    }
  }
  sums = channel_group_reduce(sums, threads_per_channel, scratch,
                              [](GradSums<acc_t> a, GradSums<acc_t> b) { return sums_merge(a, b); });
  if (c < C && rank == 0) partial[c * gridDim.y + blockIdx.y] = sums;
}

// Channel c's two backward sums: its `slices` partial sums merged in double, as
// finalize_stats_kernel merges its slices.
template <typename acc_t>
__device__ inline GradSums<double> merged_gradient_sums(const GradSums<acc_t>* __restrict__ partial,
                                                        int64_t c, int64_t slices) {
  GradSums<double> sums{0.0, 0.0};
  for (int64_t p = 0; p < slices; ++p) {
    sums.dy += static_cast<double>(partial[c * slices + p].dy);
    sums.dy_xmu += static_cast<double>(partial[c * slices + p].dy_xmu);
  }
  return sums;
}

// Per channel: grad_weight, grad_bias, and the coefficients of grad_input (mean_dy, proj).
template <typename acc_t>
__global__ void backward_finalize_kernel(const GradSums<acc_t>* __restrict__ partial, int64_t C,
                                         int64_t slices, const acc_t* __restrict__ var,
                                         double eps, bool training, int64_t count,
                                         acc_t* __restrict__ grad_weight,
                                         acc_t* __restrict__ grad_bias,
                                         acc_t* __restrict__ mean_dy, acc_t* __restrict__ proj) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const GradSums<double> sums = merged_gradient_sums(partial, c, slices);
    const acc_t invstd = inverse_sqrt(var[c] + static_cast<acc_t>(eps));
    const ChannelGradient<acc_t> grad =
        channel_gradient(sums.dy, sums.dy_xmu, count, invstd, training);
    grad_weight[c] = grad.grad_weight;
    grad_bias[c] = grad.grad_bias;
    mean_dy[c] = grad.mean_dy;
    proj[c] = grad.proj;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift,
                                  const acc_t* __restrict__ mean_dy,
                                  const acc_t* __restrict__ proj, Activation kind,
                                  ActivationParams<acc_t> act, bool training,
                                  int64_t C, int64_t S, int64_t total,
                                  scalar_t* __restrict__ dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / S) % C;
    const scalar_t xv = x[i];
    const acc_t g = activation_masked_gradient(xv, dy[i], scale[c], shift[c], kind, act);
    dx[i] = static_cast<scalar_t>(batch_norm_grad_input(
        g, static_cast<acc_t>(xv) - mean[c], mean_dy[c], proj[c], scale[c], training));
  }
}

// running[c * step] = (1 - momentum) * running + momentum * factor * batch[c] (factor: 1 for
// the mean, count / (count - 1) for the variance); step: the running statistic's stride.
template <typename running_t>
__global__ void update_stat_kernel(running_t* __restrict__ running, int64_t step,
                                   const double* __restrict__ batch, double momentum,
                                   double factor, int64_t C) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    running[c * step] = static_cast<running_t>(updated_running_stat(
        static_cast<double>(running[c * step]), batch[c], momentum, factor));
  }
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
