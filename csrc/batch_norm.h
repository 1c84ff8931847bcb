// Per-element batch-norm arithmetic shared by the CPU and CUDA kernels, so that both compute
// the same values and, above all, the same ReLU mask in forward and backward.
#pragma once

#include "conv2d.h"  // CONVKIT_HOST_DEVICE

namespace convkit {

// Non-finite values follow torch's relu(batch_norm(x)): a NaN anywhere in a channel's batch
// (training), in its parameters or in its running statistics makes its outputs NaN, and the
// ReLU passes NaN on (torch.relu(nan) is nan); a ±inf makes the batch mean ±inf and the
// variance NaN. Gradients follow torch's too: the ReLU passes the gradient unless y <= 0.

// y = x * scale + shift with scale = weight * invstd and shift = bias - mean * scale,
// clamped at 0 when relu (NaN stays NaN); computed in acc_t, rounded once to scalar_t. The
// backward recomputes it to get the ReLU mask bit-identical to the forward's without storing y.
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline scalar_t batch_norm_output(scalar_t x, acc_t scale, acc_t shift,
                                                      bool relu) {
  acc_t y = static_cast<acc_t>(x) * scale + shift;
  if (relu && y < acc_t(0)) y = acc_t(0);
  return static_cast<scalar_t>(y);
}

// Whether the fused ReLU passes the gradient at x: unless its output is <= 0, as torch's
// threshold_backward decides (so a NaN output passes its gradient on).
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline bool batch_norm_relu_passes(scalar_t x, acc_t scale, acc_t shift) {
  return !(static_cast<acc_t>(batch_norm_output(x, scale, shift, true)) <= acc_t(0));
}

// The input gradient of one element: dy' (dy masked by the ReLU) minus, in training, its
// projection on the batch statistics. In eval the statistics are constants and the gradient
// is dy' * scale alone: (x - mean) times a zero coefficient would make it NaN at a non-finite x.
template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t batch_norm_grad_input(acc_t dy_masked, acc_t x_minus_mean,
                                                       acc_t mean_dy, acc_t proj, acc_t scale,
                                                       bool training) {
  return training ? (dy_masked - mean_dy - x_minus_mean * proj) * scale : dy_masked * scale;
}

// The value the statistics pass subtracts from a channel's values before summing them and
// their squares: its first value keeps the variance accurate when the mean is large; a
// non-finite one is replaced by 0, since x - inf would be NaN for every finite x.
template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t statistics_shift(acc_t first) {
  return first - first == acc_t(0) ? first : acc_t(0);
}

// The biased variance from the shifted moments E[d^2] and E[d]: rounding can leave it slightly
// negative, then 0; NaN (a NaN or inf in the batch) stays NaN.
CONVKIT_HOST_DEVICE inline double variance_from_moments(double mean_square, double mean) {
  const double var = mean_square - mean * mean;
  return var < 0.0 ? 0.0 : var;
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
