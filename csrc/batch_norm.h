// Per-element batch-norm arithmetic shared by the CPU and CUDA kernels, so that both compute
// the same values and, above all, the same ReLU mask in forward and backward.
#pragma once

#include "conv2d.h"  // CONVKIT_HOST_DEVICE

namespace convkit {

// y = x * scale + shift with scale = weight * invstd and shift = bias - mean * scale,
// clamped at 0 when relu; computed in acc_t, rounded once to scalar_t. The backward
// recomputes it to get the ReLU mask (y > 0) bit-identical to the forward's without storing y.
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline scalar_t batch_norm_output(scalar_t x, acc_t scale, acc_t shift,
                                                      bool relu) {
  acc_t y = static_cast<acc_t>(x) * scale + shift;
  if (relu && !(y > acc_t(0))) y = acc_t(0);
  return static_cast<scalar_t>(y);
}

template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline bool batch_norm_relu_passes(scalar_t x, acc_t scale, acc_t shift) {
  return static_cast<acc_t>(batch_norm_output(x, scale, shift, true)) > acc_t(0);
}

// The input gradient of one element: dy' (dy masked by the ReLU) minus its projection on the
// batch statistics (training only: in eval mean_dy and proj are 0).
template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t batch_norm_grad_input(acc_t dy_masked, acc_t x_minus_mean,
                                                       acc_t mean_dy, acc_t proj, acc_t scale) {
  return (dy_masked - mean_dy - x_minus_mean * proj) * scale;
}

// The running variance takes the batch variance unbiased: count / (count - 1), 1 for count 1.
CONVKIT_HOST_DEVICE inline double running_var_unbias(int64_t count) {
  return count > 1 ? double(count) / double(count - 1) : 1.0;
}

// One running statistic's update, in double: the batch value (times `factor`, the unbias for
// the variance and 1 for the mean) weighted by momentum.
CONVKIT_HOST_DEVICE inline double updated_running_stat(double running, double batch,
                                                       double momentum, double factor) {
  return (1.0 - momentum) * running + momentum * batch * factor;
}

}  // namespace convkit
