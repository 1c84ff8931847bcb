// Synchronised batch norm's CUDA kernels beyond those of batch_norm_kernels.cuh (the launch
// plan is in sync_batch_norm_ops.h). Per-channel work, one thread per channel (C values: no
// pass over the tensor), in double as the single-process finalize kernels.
//   batch_norm_stats            partial_stats_kernel -> finalize_stats_kernel (as the forward)
//   batch_norm_combine_stats    combine_stats_kernel
//   batch_norm_backward_reduce  coefficients_kernel -> backward_partial_kernel ->
//                               backward_sums_kernel
//   batch_norm_backward_elemt   coefficients_kernel -> gradient_terms_kernel ->
//                               grad_input_kernel (training)
#pragma once

#include <cstdint>

#include "../batch_norm.h"
#include "batch_norm_kernels.cuh"
#include "common.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

// mean[c], var[c] of all processes' statistics (mean_in, var_in [W, C]; count [W]).
template <typename stat_t>
__global__ void combine_stats_kernel(const stat_t* __restrict__ mean_in,
                                     const stat_t* __restrict__ var_in,
                                     const int64_t* __restrict__ count, int64_t processes,
                                     int64_t C, stat_t* __restrict__ mean,
                                     stat_t* __restrict__ var) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const CombinedStatistics combined =
        combine_statistics(mean_in + c, var_in + c, count, processes, C);
    mean[c] = static_cast<stat_t>(combined.mean);
    var[c] = static_cast<stat_t>(combined.var);
  }
}

// Per channel: the two backward sums of its `slices` partial sums, merged in double, and this
// process's grad_weight and grad_bias from them.
template <typename acc_t>
__global__ void backward_sums_kernel(const GradSums<acc_t>* __restrict__ partial, int64_t C,
                                     int64_t slices, const acc_t* __restrict__ var, double eps,
                                     int64_t count, double* __restrict__ sum_dy,
                                     double* __restrict__ sum_dy_xmu,
                                     acc_t* __restrict__ grad_weight,
                                     acc_t* __restrict__ grad_bias) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const GradSums<double> sums = merged_gradient_sums(partial, c, slices);
    const acc_t invstd = inverse_sqrt(var[c] + static_cast<acc_t>(eps));
    const ChannelGradient<acc_t> grad =
        channel_gradient(sums.dy, sums.dy_xmu, count, invstd, true);
    sum_dy[c] = sums.dy;
    sum_dy_xmu[c] = sums.dy_xmu;
    grad_weight[c] = grad.grad_weight;
    grad_bias[c] = grad.grad_bias;
  }
}

// Per channel: grad_input's terms (mean_dy, proj) from the sums over all processes and their
// count.
template <typename acc_t>
__global__ void gradient_terms_kernel(const double* __restrict__ sum_dy,
                                      const double* __restrict__ sum_dy_xmu,
                                      const acc_t* __restrict__ var, double eps, int64_t count,
                                      int64_t C, acc_t* __restrict__ mean_dy,
                                      acc_t* __restrict__ proj) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const acc_t invstd = inverse_sqrt(var[c] + static_cast<acc_t>(eps));
    const ChannelGradient<acc_t> grad =
        channel_gradient(sum_dy[c], sum_dy_xmu[c], count, invstd, true);
    mean_dy[c] = grad.mean_dy;
    proj[c] = grad.proj;
  }
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
