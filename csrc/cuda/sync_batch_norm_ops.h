// The host side of synchronised batch norm's ops on CUDA (see csrc/cpu/sync_batch_norm.cpp for
// what each computes): argument checks, launches of the kernels of batch_norm_kernels.cuh and
// sync_batch_norm_kernels.cuh, and their per-channel buffers. Compiled by nvcc into
// sync_batch_norm.cu and by the host compiler into the emulated twins
// (csrc/cuda_emu/emulated_sync_batch_norm.cpp). Queued on the current stream; the only host to
// device copy is the combine's W counts.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../batch_norm.h"
#include "../checks.h"
#include "batch_norm_ops.h"
#include "sync_batch_norm_kernels.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

inline std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  const char* op = "convkit::batch_norm_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_batch_norm_input(op, input);
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t S = N == 0 ? 0 : input.numel() / (N * C);
  const int64_t count = N * S;
  const DeviceGuard device_guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor mean = empty_device({C}, x.options().dtype(at::kDouble));
  at::Tensor var = empty_device({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelReductionPlan plan = plan_channel_reduction(C, count);
    at::Tensor partial = struct_buffer<Welford<acc_t>>(C * plan.slices, x);
    auto* partial_ptr = reinterpret_cast<Welford<acc_t>*>(partial.mutable_data_ptr());
    if (count > 0) {
      launch<partial_stats_kernel<scalar_t, acc_t>>(plan.grid, kThreads, 0,
                                                    x.const_data_ptr<scalar_t>(), N, C, S,
                                                    plan.threads_per_channel, plan.per_slice,
                                                    partial_ptr);
    } else {
      partial.zero_();
    }
    launch<finalize_stats_kernel<scalar_t, acc_t, double>>(
        blocks_for(C), kThreads, 0, static_cast<const Welford<acc_t>*>(partial_ptr),
        x.const_data_ptr<scalar_t>(), S, count, C, plan.slices, mean.mutable_data_ptr<double>(),
        var.mutable_data_ptr<double>());
  });
  return std::make_tuple(mean, var);
}

inline std::tuple<at::Tensor, at::Tensor> batch_norm_combine_stats(const at::Tensor& mean,
                                                                   const at::Tensor& var,
                                                                   at::IntArrayRef count) {
  const char* op = "convkit::batch_norm_combine_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_batch_norm_combine_stats(op, mean, var, count);
  const int64_t W = mean.size(0);
  const int64_t C = mean.size(1);
  const DeviceGuard device_guard(mean.device());
  const at::Tensor m = mean.contiguous();
  const at::Tensor v = var.contiguous();
  at::Tensor host_count = at::empty({W}, m.options().device(at::kCPU).dtype(at::kLong));
  std::copy(count.begin(), count.end(), host_count.mutable_data_ptr<int64_t>());
  const at::Tensor device_count = host_count.to(m.device());
  at::Tensor combined_mean = empty_device({C}, m.options());
  at::Tensor combined_var = empty_device({C}, m.options());
  if (C == 0) return std::make_tuple(combined_mean, combined_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(),
                                  "batch_norm_combine_stats_cuda", [&] {
    launch<combine_stats_kernel<scalar_t>>(
        blocks_for(C), kThreads, 0, m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        device_count.const_data_ptr<int64_t>(), W, C, combined_mean.mutable_data_ptr<scalar_t>(),
        combined_var.mutable_data_ptr<scalar_t>());
  });
  return std::make_tuple(combined_mean, combined_var);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double alpha,
    double beta) {
  const char* op = "convkit::batch_norm_backward_reduce";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, mean, var);
  const DeviceGuard device_guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  const at::Tensor mu = mean.to(acc_type).contiguous();
  const at::Tensor sigma2 = var.to(acc_type).contiguous();
  // Rows: scale, shift, grad_weight, grad_bias.
  at::Tensor per_channel = empty_device({4, C}, acc_options);
  at::Tensor sum_dy = empty_device({C}, x.options().dtype(at::kDouble));
  at::Tensor sum_dy_xmu = empty_device({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* scale = per_channel.mutable_data_ptr<acc_t>();
    acc_t* shift = scale + C;
    const auto [partial, slices] = launch_gradient_partials<scalar_t, acc_t>(
        x, dy, mu, sigma2, w, b, eps, spec, N, C, S, scale, shift);
    launch<backward_sums_kernel<acc_t>>(blocks_for(C), kThreads, 0,
                                        reinterpret_cast<const GradSums<acc_t>*>(
                                            partial.const_data_ptr()),
                                        C, slices, sigma2.const_data_ptr<acc_t>(), eps, count,
                                        sum_dy.mutable_data_ptr<double>(),
                                        sum_dy_xmu.mutable_data_ptr<double>(), scale + 2 * C,
                                        scale + 3 * C);
  });
  const at::ScalarType weight_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType bias_type =
      bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
  return std::make_tuple(sum_dy, sum_dy_xmu,
                         per_channel[2].to(weight_type, /*non_blocking=*/false, /*copy=*/true),
                         per_channel[3].to(bias_type, /*non_blocking=*/false, /*copy=*/true));
}

inline at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& var,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const at::Tensor& sum_dy,
                                            const at::Tensor& sum_dy_xmu, int64_t count,
                                            double eps, c10::string_view activation,
                                            double alpha, double beta) {
  const char* op = "convkit::batch_norm_backward_elemt";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, local_count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, mean, var);
  check_batch_norm_backward_elemt(op, input, sum_dy, sum_dy_xmu, count, local_count);
  const DeviceGuard device_guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  const at::Tensor mu = mean.to(acc_type).contiguous();
  const at::Tensor sigma2 = var.to(acc_type).contiguous();
  const at::Tensor total_dy = sum_dy.contiguous();
  const at::Tensor total_dy_xmu = sum_dy_xmu.contiguous();
  at::Tensor per_channel = empty_device({4, C}, x.options().dtype(acc_type));  // scale, shift,
                                                                             // mean_dy, proj
  at::Tensor grad_input = empty_device(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* scale = per_channel.mutable_data_ptr<acc_t>();
    acc_t* shift = scale + C;
    acc_t* mean_dy = scale + 2 * C;
    acc_t* proj = scale + 3 * C;
    launch<coefficients_kernel<acc_t>>(blocks_for(C), kThreads, 0, mu.const_data_ptr<acc_t>(),
                                       sigma2.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
                                       data_or_null<acc_t>(b), eps, C, scale, shift);
    launch<gradient_terms_kernel<acc_t>>(blocks_for(C), kThreads, 0,
                                         total_dy.const_data_ptr<double>(),
                                         total_dy_xmu.const_data_ptr<double>(),
                                         sigma2.const_data_ptr<acc_t>(), eps, count, C, mean_dy,
                                         proj);
    if (x.numel() > 0) {
      launch<grad_input_kernel<scalar_t, acc_t>>(
          blocks_for(x.numel()), kThreads, 0, x.const_data_ptr<scalar_t>(),
          dy.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
          static_cast<const acc_t*>(scale), static_cast<const acc_t*>(shift),
          static_cast<const acc_t*>(mean_dy), static_cast<const acc_t*>(proj), spec.kind,
          spec.params<acc_t>(), /*training=*/true, C, S, x.numel(), grad_input.mutable_data_ptr<scalar_t>());
    }
  });
  return restride_to(grad_input.view(input.sizes()), batch_norm_memory_format(input));
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
