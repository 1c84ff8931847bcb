// Synchronised batch norm's building blocks on the CPU (convkit.nn.SyncBatchNorm runs the
// collectives between them, in Python):
//   batch_norm_stats           this process's per-channel mean and biased variance, in float64
//                              for any input: the statistics pass of batch_norm_forward (same
//                              loops), kept in double until the statistics of all processes
//                              are combined (a float32 mean rounds by |mean| * 6e-8);
//   batch_norm_combine_stats   the statistics of all processes merged (combine_statistics in
//                              csrc/batch_norm.h); the normalisation itself is then
//                              batch_norm_forward's eval pass with the combined statistics;
//   batch_norm_backward_reduce this process's sum(dy') and sum(dy' * (x - mean)) in double (dy'
//                              = dy * f'(z), z recomputed from x), and its grad_weight, grad_bias;
//   batch_norm_backward_elemt  grad_input from the sums over all processes and their count.
// Each reads its tensors once (the element-wise pass reads x and dy, writes dx); the work is
// split over threads as in batch_norm.cpp (rows for small maps, channels otherwise), so the
// results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../batch_norm.h"
#include "../checks.h"
#include "../cpu_kernel_table.h"
#include "batch_norm_planes.h"
#include "batch_norm_rows.h"
#include "batch_norm_tensors.h"
#include "block_cache.h"
#include "parallel.h"

namespace convkit {
namespace {

using namespace cpu_batch_norm;

// Tasks of channels with at least this many values in all (the planes layout's grain).
int64_t channel_grain(int64_t count) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(count, 1));
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input) {
  const char* op = "convkit::batch_norm_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_batch_norm_input(op, input);
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t S = N == 0 ? 0 : input.numel() / (N * C);
  const RowView view = row_view(input, N, C, S);
  const at::Tensor x = input.contiguous(view.format);
  if (N * S == 0) {
    const at::Tensor zeros = at::zeros({C}, x.options().dtype(at::kDouble));
    return std::make_tuple(zeros, zeros.clone());
  }
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    double* mean_ptr = mean.mutable_data_ptr<double>();
    double* var_ptr = var.mutable_data_ptr<double>();
    if (view.rows) {
      row_statistics<scalar_t, acc_t>(x_ptr, view.images, C, view.plane, mean_ptr, var_ptr);
      return;
    }
    parallel_for(0, C, channel_grain(N * S), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto [m, v] = plane_statistics<scalar_t, acc_t>(x_ptr, N, C, S, c);
        mean_ptr[c] = m;
        var_ptr[c] = v;
      }
    });
  });
  return std::make_tuple(mean, var);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_combine_stats_cpu(const at::Tensor& mean,
                                                                const at::Tensor& var,
                                                                at::IntArrayRef count) {
  const char* op = "convkit::batch_norm_combine_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_batch_norm_combine_stats(op, mean, var, count);
  const int64_t W = mean.size(0);
  const int64_t C = mean.size(1);
  const at::Tensor m = mean.contiguous();
  const at::Tensor v = var.contiguous();
  at::Tensor combined_mean = at::empty({C}, m.options());
  at::Tensor combined_var = at::empty({C}, m.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(),
                                  "batch_norm_combine_stats_cpu", [&] {
    const scalar_t* mean_ptr = m.const_data_ptr<scalar_t>();
    const scalar_t* var_ptr = v.const_data_ptr<scalar_t>();
    scalar_t* out_mean = combined_mean.mutable_data_ptr<scalar_t>();
    scalar_t* out_var = combined_var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const CombinedStatistics combined =
          combine_statistics(mean_ptr + c, var_ptr + c, count.data(), W, C);
      out_mean[c] = static_cast<scalar_t>(combined.mean);
      out_var[c] = static_cast<scalar_t>(combined.var);
    }
  });
  return std::make_tuple(combined_mean, combined_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double alpha,
    double beta) {
  const char* op = "convkit::batch_norm_backward_reduce";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, mean, var);
  const RowView view = row_view(input, N, C, S);
  const at::Tensor x = input.contiguous(view.format);
  const at::Tensor dy = grad_output.contiguous(view.format);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = per_channel_or(weight, C, acc_type, 1.0, x.options());
  const at::Tensor b = per_channel_or(bias, C, acc_type, 0.0, x.options());
  const at::Tensor mu = as_acc_contiguous(mean, acc_type);
  const at::Tensor sigma2 = as_acc_contiguous(var, acc_type);
  at::Tensor sum_dy = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor sum_dy_xmu = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor grad_weight_acc = at::empty({C}, x.options().dtype(acc_type));
  at::Tensor grad_bias_acc = at::empty({C}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActivationParams<acc_t> act = spec.params<acc_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mu.const_data_ptr<acc_t>();
    double* sum_dy_ptr = sum_dy.mutable_data_ptr<double>();
    double* sum_dy_xmu_ptr = sum_dy_xmu.mutable_data_ptr<double>();
    const auto [invstd, scale, shift] =
        affine_rows(mean_ptr, sigma2.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                    b.const_data_ptr<acc_t>(), C, eps);
    if (count > 0 && view.rows) {
      const BackwardRows<acc_t> rows(scale.data(), shift.data(), mean_ptr, C, view.plane);
      dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
        row_gradient_sums<kAct>(x_ptr, dy_ptr, view.images, C, view.plane, rows, act,
                                sum_dy_ptr, sum_dy_xmu_ptr);
      });
    } else if (count > 0) {
      dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
        parallel_for(0, C, channel_grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const auto [a, p] = plane_gradient_sums<kAct>(x_ptr, dy_ptr, N, C, S, c, scale[c],
                                                          shift[c], mean_ptr[c], act);
            sum_dy_ptr[c] = a;
            sum_dy_xmu_ptr[c] = p;
          }
        });
      });
    }
    acc_t* gw_ptr = grad_weight_acc.mutable_data_ptr<acc_t>();
    acc_t* gb_ptr = grad_bias_acc.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const ChannelGradient<acc_t> grad =
          channel_gradient(sum_dy_ptr[c], sum_dy_xmu_ptr[c], count, invstd[c], true);
      gw_ptr[c] = grad.grad_weight;
      gb_ptr[c] = grad.grad_bias;
    }
  });
  const at::ScalarType weight_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType bias_type =
      bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
  return std::make_tuple(sum_dy, sum_dy_xmu, grad_weight_acc.to(weight_type),
                         grad_bias_acc.to(bias_type));
}

at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& mean, const at::Tensor& var,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                         int64_t count, double eps,
                                         c10::string_view activation, double alpha, double beta) {
  const char* op = "convkit::batch_norm_backward_elemt";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, local_count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, mean, var);
  check_batch_norm_backward_elemt(op, input, sum_dy, sum_dy_xmu, count, local_count);
  const RowView view = row_view(input, N, C, S);
  const at::Tensor x = input.contiguous(view.format);
  const at::Tensor dy = grad_output.contiguous(view.format);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = per_channel_or(weight, C, acc_type, 1.0, x.options());
  const at::Tensor b = per_channel_or(bias, C, acc_type, 0.0, x.options());
  const at::Tensor mu = as_acc_contiguous(mean, acc_type);
  const at::Tensor sigma2 = as_acc_contiguous(var, acc_type);
  const at::Tensor total_dy = sum_dy.contiguous();
  const at::Tensor total_dy_xmu = sum_dy_xmu.contiguous();
  at::Tensor grad_input = empty_in_format(x.sizes(), x.options(), view.format, cached_empty);
  if (local_count == 0) return grad_input.view(input.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActivationParams<acc_t> act = spec.params<acc_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = grad_input.mutable_data_ptr<scalar_t>();
    const acc_t* mean_ptr = mu.const_data_ptr<acc_t>();
    const auto [invstd, scale, shift] =
        affine_rows(mean_ptr, sigma2.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                    b.const_data_ptr<acc_t>(), C, eps);
    std::vector<acc_t> mean_dy(C), proj(C);
    for (int64_t c = 0; c < C; ++c) {
      const ChannelGradient<acc_t> grad =
          channel_gradient(total_dy.const_data_ptr<double>()[c],
                           total_dy_xmu.const_data_ptr<double>()[c], count, invstd[c], true);
      mean_dy[c] = grad.mean_dy;
      proj[c] = grad.proj;
    }
    if (view.rows) {
      const BackwardRows<acc_t> rows(scale.data(), shift.data(), mean_ptr, C, view.plane);
      dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
        row_grad_input<kAct>(x_ptr, dy_ptr, view.images, C, view.plane, rows, act, mean_dy.data(),
                             proj.data(), true, dx_ptr);
      });
      return;
    }
    dispatch_activation(spec.kind, [&](auto kind) {
      constexpr Activation kAct = decltype(kind)::value;
      parallel_for(0, C, channel_grain(local_count), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t offset = (n * C + c) * S;
            grad_input_plane<kAct>(x_ptr + offset, dy_ptr + offset, S, scale[c], shift[c], act,
                                   mean_ptr[c], mean_dy[c], proj[c], true, dx_ptr + offset);
          }
        }
      });
    });
  });
  return grad_input.view(input.sizes());
}

}  // namespace

// convkit._C registers these for the CPU dispatch key (cpu_kernels.cpp).
void add_sync_batch_norm_kernels(CpuKernelTable& table) {
  table.batch_norm_stats = &batch_norm_stats_cpu;
  table.batch_norm_combine_stats = &batch_norm_combine_stats_cpu;
  table.batch_norm_backward_reduce = &batch_norm_backward_reduce_cpu;
  table.batch_norm_backward_elemt = &batch_norm_backward_elemt_cpu;
}

}  // namespace convkit
