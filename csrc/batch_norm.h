// Per-element batch-norm arithmetic shared by the CPU and CUDA kernels, so that both compute
// the same values and, above all, the same activation derivative in forward and backward.
#pragma once

#include <cmath>
#include <cstdint>

#include "activation.h"
#include "conv2d.h"  // CONVKIT_HOST_DEVICE

namespace convkit {

// Non-finite values follow torch's activation(batch_norm(x)): a NaN anywhere in a channel's
// batch (training), in its parameters or in its running statistics makes its outputs NaN, and
// the activation passes NaN on (csrc/activation.h); a ±inf makes the batch mean ±inf and the
// variance NaN. Gradients follow torch's activations' backward rules (activation.h).

// y = f(z), z = x * scale + shift with scale = weight * invstd and shift = bias - mean * scale,
// f the fused activation (activation.h), computed in acc_t and rounded to scalar_t. The
// backward recomputes z from x with the same arithmetic, so f'(z) is the forward's own, y is
// never stored, and the parameters need not be saved.
template <Activation kAct, typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline scalar_t batch_norm_output(scalar_t x, acc_t scale, acc_t shift,
                                                      ActivationParams<acc_t> act) {
  return static_cast<scalar_t>(activate<kAct>(normalized_value(x, scale, shift), act));
}

// dy' = dy * f'(z) at the element x (dy itself without an activation): the gradient that
// reaches the normalisation.
template <Activation kAct, typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE acc_t activation_masked_gradient(
    scalar_t x, scalar_t dy, acc_t scale, acc_t shift, ActivationParams<acc_t> act) {
  if constexpr (kAct == Activation::none) {
    return static_cast<acc_t>(dy);
  } else {
    return activation_gradient<kAct>(normalized_value(x, scale, shift), static_cast<acc_t>(dy),
                                     act);
  }
}

// The same two for a kind known at run time (CUDA kernels: uniform across the launch).
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline scalar_t batch_norm_output(scalar_t x, acc_t scale, acc_t shift,
                                                      Activation kind,
                                                      ActivationParams<acc_t> act) {
  return static_cast<scalar_t>(activate_runtime(kind, normalized_value(x, scale, shift), act));
}

template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t activation_masked_gradient(scalar_t x, scalar_t dy, acc_t scale,
                                                            acc_t shift, Activation kind,
                                                            ActivationParams<acc_t> act) {
  if (kind == Activation::none) return static_cast<acc_t>(dy);
  return activation_gradient_runtime(kind, normalized_value(x, scale, shift),
                                     static_cast<acc_t>(dy), act);
}

// 1 / sqrt(v), correctly rounded square root then division, the same on host and device.
CONVKIT_HOST_DEVICE inline float inverse_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return 1.0f / sqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}
CONVKIT_HOST_DEVICE inline double inverse_sqrt(double v) {
#if defined(__CUDA_ARCH__)
  return 1.0 / ::sqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// A channel's normalisation as the affine map of batch_norm_output: invstd = 1 / sqrt(var +
// eps), scale = weight * invstd, shift = bias - mean * scale (weight 1 and bias 0 when the
// layer has none). Every kernel, forward and backward, CPU and CUDA, takes its coefficients
// from here, so the backward's recomputed z, and so f'(z), is the forward's bit for bit.
template <typename acc_t>
struct ChannelAffine {
  acc_t invstd;
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
CONVKIT_HOST_DEVICE inline ChannelAffine<acc_t> channel_affine(acc_t mean, acc_t var, acc_t weight,
                                                               acc_t bias, double eps) {
  ChannelAffine<acc_t> affine;
  affine.invstd = inverse_sqrt(var + static_cast<acc_t>(eps));
  affine.scale = weight * affine.invstd;
  affine.shift = bias - mean * affine.scale;
  return affine;
}

// A channel's backward results from its two sums over `count` values, sum(dy') and
// sum(dy' * (x - mean)) (dy' = dy * f'(z)), taken in double: grad_weight =
// sum_dy_xmu * invstd, grad_bias = sum_dy, and batch_norm_grad_input's terms mean_dy =
// sum_dy / count and proj = sum_dy_xmu / count * invstd^2 in training (0 in eval, where the
// statistics are constants, and for an empty batch).
template <typename acc_t>
struct ChannelGradient {
  acc_t grad_weight;
  acc_t grad_bias;
  acc_t mean_dy;
  acc_t proj;
};

template <typename acc_t>
CONVKIT_HOST_DEVICE inline ChannelGradient<acc_t> channel_gradient(double sum_dy,
                                                                   double sum_dy_xmu,
                                                                   int64_t count, acc_t invstd,
                                                                   bool training) {
  ChannelGradient<acc_t> grad;
  grad.grad_weight = static_cast<acc_t>(sum_dy_xmu * static_cast<double>(invstd));
  grad.grad_bias = static_cast<acc_t>(sum_dy);
  const bool batch_statistics = training && count > 0;
  grad.mean_dy = batch_statistics ? static_cast<acc_t>(sum_dy / double(count)) : acc_t(0);
  grad.proj = batch_statistics ? static_cast<acc_t>(sum_dy_xmu / double(count)) * invstd * invstd
                               : acc_t(0);
  return grad;
}

// The input gradient of one element: dy' (dy through the activation) minus, in training, its
// projection on the batch statistics. In eval the statistics are constants and the gradient
// is dy' * scale alone: (x - mean) times a zero coefficient would make it NaN at a non-finite x.
template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t batch_norm_grad_input(acc_t dy_masked, acc_t x_minus_mean,
                                                       acc_t mean_dy, acc_t proj, acc_t scale,
                                                       bool training) {
  return training ? (dy_masked - mean_dy - x_minus_mean * proj) * scale : dy_masked * scale;
}

// The value the statistics pass subtracts from a channel's values before summing them and
// their squares, from an estimate of the channel's mean (the CPU: the mean of its first
// values; CUDA: its first value, Welford's mean tracking the rest): it keeps the variance
// accurate when the mean is large. A non-finite one is replaced by 0, since x - inf would be
// NaN for every finite x.
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

// The statistics of one channel over several processes (synchronised batch norm) from each
// one's count, mean and biased variance, by the two-pass form of Chan's merge, in double:
// mean = sum(n_r * mean_r) / n, var = sum(n_r * (var_r + (mean_r - mean)^2)) / n. Every term
// is a product of non-negative factors, so nothing cancels (sum(x) and sum(x^2) would lose
// the variance in rounding when |mean| >> std). A process with no values contributes nothing,
// whatever its statistics; none at all gives 0 and 0. A NaN, or a ±inf mean, in a process
// with values makes the mean NaN or ±inf and the variance NaN, as one batch would.
// mean_r = mean[r * step], var_r = var[r * step], n_r = count[r].
struct CombinedStatistics {
  double mean;
  double var;
};

template <typename stat_t>
CONVKIT_HOST_DEVICE inline CombinedStatistics combine_statistics(const stat_t* mean,
                                                                 const stat_t* var,
                                                                 const int64_t* count,
                                                                 int64_t processes, int64_t step) {
  int64_t total = 0;
  double weighted_mean = 0.0;
  for (int64_t r = 0; r < processes; ++r) {
    if (count[r] == 0) continue;
    total += count[r];
    weighted_mean += double(count[r]) * static_cast<double>(mean[r * step]);
  }
  if (total == 0) return {0.0, 0.0};
  const double combined_mean = weighted_mean / double(total);
  double m2 = 0.0;
  for (int64_t r = 0; r < processes; ++r) {
    if (count[r] == 0) continue;
    const double deviation = static_cast<double>(mean[r * step]) - combined_mean;
    m2 += double(count[r]) * (static_cast<double>(var[r * step]) + deviation * deviation);
  }
  return {combined_mean, m2 / double(total)};
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
