// The host side of fused BatchNorm(+activation) on CUDA: argument checks, the launch plan of the
// kernels of batch_norm_kernels.cuh, and the per-channel buffers between them. Compiled by nvcc
// into the CUDA kernels of the ops (batch_norm.cu) and by the host compiler into their emulated
// twins (csrc/cuda_emu/emulated_ops.cpp). No host synchronisation: everything is queued on the
// current stream.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "../batch_norm.h"
#include "../checks.h"
#include "../memory_format.h"
#include "batch_norm_kernels.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

// How the per-channel reductions are laid out (see batch_norm_kernels.cuh): tpc threads per
// channel, kThreads / tpc channels per block, `slices` blocks per channel along gridDim.y.
struct ChannelReductionPlan {
  int threads_per_channel;
  int64_t slices;
  int64_t per_slice;  // values of a channel per slice
  dim3 grid;
};

inline ChannelReductionPlan plan_channel_reduction(int64_t C, int64_t count) {
  const int64_t threads_wanted = (count + kElementsPerThread - 1) / kElementsPerThread;
  int tpc = 1;
  while (tpc < kThreads && tpc < threads_wanted) tpc *= 2;
  const int64_t per_block = kThreads * kElementsPerThread;
  const int64_t slices =
      tpc < kThreads ? 1 : std::min<int64_t>(kMaxSlices, (count + per_block - 1) / per_block);
  const int64_t channels_per_block = kThreads / tpc;
  const int64_t blocks = (C + channels_per_block - 1) / channels_per_block;
  TORCH_CHECK(blocks <= 2147483647, "convkit::batch_norm on CUDA: ", C,
              " channels need more than 2^31 - 1 blocks");
  return {tpc, slices, (count + slices - 1) / slices,
          dim3(static_cast<unsigned int>(blocks), static_cast<unsigned int>(slices))};
}

inline at::Tensor acc_or_empty(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  if (t.has_value() && t->defined()) return t->to(acc_type).contiguous();
  return at::Tensor();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// A buffer of `n` values of a kernel's own struct type, on x's device.
template <typename T>
at::Tensor struct_buffer(int64_t n, const at::Tensor& x) {
  return empty_device({n * static_cast<int64_t>(sizeof(T))}, x.options().dtype(at::kByte));
}

template <typename scalar_t, typename acc_t>
void launch_apply(const at::Tensor& x, const acc_t* scale, const acc_t* shift, int64_t C,
                  int64_t S, const ActivationSpec& spec, at::Tensor& y) {
  const int64_t total = x.numel();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
  constexpr int kVec = 4;
  const bool aligned = reinterpret_cast<uintptr_t>(x_ptr) % (sizeof(scalar_t) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(y_ptr) % (sizeof(scalar_t) * kVec) == 0;
  if (S % kVec == 0 && aligned) {
    launch<apply_kernel<scalar_t, acc_t, kVec>>(blocks_for(total / kVec), kThreads, 0, x_ptr,
                                                scale, shift, C, S, total, spec.kind,
                                                spec.params<acc_t>(), y_ptr);
  } else {
    launch<apply_kernel<scalar_t, acc_t, 1>>(blocks_for(total), kThreads, 0, x_ptr, scale, shift,
                                             C, S, total, spec.kind, spec.params<acc_t>(),
                                             y_ptr);
  }
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps,
    c10::string_view activation, double alpha, double beta) {
  const char* op = "convkit::batch_norm_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] = check_batch_norm_forward(op, input, weight, bias, running_mean,
                                                         running_var, training, eps);
  const DeviceGuard device_guard(input.device());

  const at::Tensor x = input.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  at::Tensor output = empty_device(x.sizes(), x.options());
  at::Tensor save_mean = empty_device({C}, acc_options);
  at::Tensor save_var = empty_device({C}, acc_options);
  at::Tensor coefficients = empty_device({2, C}, acc_options);  // scale, shift
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  if (!training) {
    save_mean.copy_(*running_mean);
    save_var.copy_(*running_var);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
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
      launch<finalize_stats_kernel<scalar_t, acc_t>>(
          blocks_for(C), kThreads, 0, static_cast<const Welford<acc_t>*>(partial_ptr),
          x.const_data_ptr<scalar_t>(), S, count, C, plan.slices,
          save_mean.mutable_data_ptr<acc_t>(), save_var.mutable_data_ptr<acc_t>());
    }
    acc_t* scale = coefficients.mutable_data_ptr<acc_t>();
    acc_t* shift = scale + C;
    launch<coefficients_kernel<acc_t>>(blocks_for(C), kThreads, 0,
                                       save_mean.const_data_ptr<acc_t>(),
                                       save_var.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
                                       data_or_null<acc_t>(b), eps, C, scale, shift);
    if (x.numel() > 0) {
      launch_apply<scalar_t, acc_t>(x, static_cast<const acc_t*>(scale),
                                    static_cast<const acc_t*>(shift), C, S, spec, output);
    }
  });
  // The kernels walk contiguous [N, C, S] memory: a channels-last input's output is converted
  // back to its format (csrc/memory_format.h).
  return std::make_tuple(restride_to(output.view(input.sizes()), batch_norm_memory_format(input)),
                         save_mean, save_var);
}

// The backward's reduction pass: every channel's scale and shift into `scale`, `shift`
// (coefficients_kernel), then the two sums of each (channel, slice) (backward_partial_kernel).
// Returns the partial sums (GradSums<acc_t> [C * slices]) and the slices of a channel.
template <typename scalar_t, typename acc_t>
std::pair<at::Tensor, int64_t> launch_gradient_partials(
    const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& w, const at::Tensor& b, double eps, const ActivationSpec& spec, int64_t N,
    int64_t C, int64_t S, acc_t* scale, acc_t* shift) {
  launch<coefficients_kernel<acc_t>>(blocks_for(C), kThreads, 0, mean.const_data_ptr<acc_t>(),
                                     var.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
                                     data_or_null<acc_t>(b), eps, C, scale, shift);
  const int64_t count = N * S;
  const ChannelReductionPlan plan = plan_channel_reduction(C, count);
  at::Tensor partial = struct_buffer<GradSums<acc_t>>(C * plan.slices, x);
  auto* partial_ptr = reinterpret_cast<GradSums<acc_t>*>(partial.mutable_data_ptr());
  if (count > 0) {
    launch<backward_partial_kernel<scalar_t, acc_t>>(
        plan.grid, kThreads, 0, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), static_cast<const acc_t*>(scale),
        static_cast<const acc_t*>(shift), spec.kind, spec.params<acc_t>(), N, C, S,
        plan.threads_per_channel,
        plan.per_slice, partial_ptr);
  } else {
    partial.zero_();
  }
  return {partial, plan.slices};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta,
    std::array<bool, 3> output_mask) {
  const char* op = "convkit::batch_norm_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, save_mean, save_var);
  const DeviceGuard device_guard(input.device());

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  const at::Tensor mean = save_mean.to(acc_type).contiguous();
  const at::Tensor var = save_var.to(acc_type).contiguous();
  // Rows: scale, shift, grad_weight, grad_bias, mean_dy, proj.
  at::Tensor per_channel = empty_device({6, C}, acc_options);
  at::Tensor grad_input =
      output_mask[0] ? empty_device(x.sizes(), x.options()) : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_channel.mutable_data_ptr<acc_t>();
    acc_t* scale = rows;
    acc_t* shift = rows + C;
    acc_t* grad_weight = rows + 2 * C;
    acc_t* grad_bias = rows + 3 * C;
    acc_t* mean_dy = rows + 4 * C;
    acc_t* proj = rows + 5 * C;
    const auto [partial, slices] = launch_gradient_partials<scalar_t, acc_t>(
        x, dy, mean, var, w, b, eps, spec, N, C, S, scale, shift);
    launch<backward_finalize_kernel<acc_t>>(blocks_for(C), kThreads, 0,
                                            reinterpret_cast<const GradSums<acc_t>*>(
                                                partial.const_data_ptr()),
                                            C, slices, var.const_data_ptr<acc_t>(), eps,
                                            training, count, grad_weight, grad_bias, mean_dy, proj);
    if (output_mask[0] && x.numel() > 0) {
      launch<grad_input_kernel<scalar_t, acc_t>>(
          blocks_for(x.numel()), kThreads, 0, x.const_data_ptr<scalar_t>(),
          dy.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          static_cast<const acc_t*>(scale), static_cast<const acc_t*>(shift),
          static_cast<const acc_t*>(mean_dy), static_cast<const acc_t*>(proj), spec.kind,
          spec.params<acc_t>(), training, C, S, x.numel(), grad_input.mutable_data_ptr<scalar_t>());
    }
  });

  const at::ScalarType weight_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType bias_type =
      bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
  at::Tensor grad_weight =
      output_mask[1] ? per_channel[2].to(weight_type, /*non_blocking=*/false, /*copy=*/true)
                     : at::empty({0}, x.options());
  at::Tensor grad_bias = output_mask[2]
                             ? per_channel[3].to(bias_type, /*non_blocking=*/false, /*copy=*/true)
                             : at::empty({0}, x.options());
  if (output_mask[0]) {
    grad_input = restride_to(grad_input.view(input.sizes()), batch_norm_memory_format(input));
  }
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

inline void batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                    const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                    double momentum, int64_t count) {
  const char* op = "convkit::batch_norm_update_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  check_batch_norm_update_stats(op, running_mean, running_var, batch_mean, batch_var, count);
  const int64_t C = batch_mean.numel();
  if (count == 0 || C == 0) return;
  const DeviceGuard device_guard(running_mean.device());
  const at::Tensor mean = batch_mean.to(at::kDouble).contiguous();
  const at::Tensor var = batch_var.to(at::kDouble).contiguous();
  const double unbias = running_var_unbias(count);
  const std::array<std::tuple<const at::Tensor*, const at::Tensor*, double>, 2> updates{
      std::make_tuple(&running_mean, &mean, 1.0), std::make_tuple(&running_var, &var, unbias)};
  for (const auto& [running, batch, factor] : updates) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running->scalar_type(),
                                    "batch_norm_update_stats_cuda", [&] {
      launch<update_stat_kernel<scalar_t>>(blocks_for(C), kThreads, 0,
                                           running->mutable_data_ptr<scalar_t>(), running->stride(0),
                                           batch->const_data_ptr<double>(), momentum, factor, C);
    });
  }
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
