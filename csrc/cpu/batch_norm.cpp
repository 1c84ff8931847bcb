// Fused BatchNorm(+activation) on the CPU, forward and backward, training and eval.
//
// Two layouts of the same passes:
//  * planes (C*S > 4096, e.g. ResNet's 56x56 maps): the input is viewed as [N, C, S] and
//    work is split over channels, so every reduction is a loop owned by one thread.
//  * rows (C*S <= 4096: the chapter's 14x14 ... 1x1 maps, whose planes are 1-196 values):
//    each image's [C*S] values are one contiguous row; every pass is a vectorised loop along
//    it with the per-channel constants spread into rows, reductions accumulate rows of sums
//    per block of 32 images, then per channel in double in block order.
// Either way the results do not depend on the thread count. A channels-last input (NHWC
// memory, csrc/memory_format.h) is the rows layout with planes of one value: N*S rows of C
// channels, read and written in place, whatever C*S is. The loops of each layout are in
// batch_norm_planes.h and batch_norm_rows.h; this file holds the ops.
// Forward, training: one read for the statistics (sums of (x - shift) and its square,
//   shift = the mean of the channel's first 32 values (channel_shift), which keeps the
//   variance accurate whatever the mean; blocks in float, totals in double), then one read +
//   one write to normalise:
//   y = f(x * scale + shift_c) with scale = weight * invstd, shift_c = bias - mean * scale,
//   f the fused activation (csrc/activation.h).
// Forward, eval: the read + write only, with the running statistics.
// Backward: one read of (x, dy) for sum(dy') and sum(dy' * (x - mean)) where dy' = dy * f'(z)
//   (z recomputed from x with the forward's own arithmetic, so f'(z) is exactly the forward's
//   and y is never stored), then one element-wise pass for grad_input.
// Floors (memory-bound): training forward 3 tensor passes (read x twice, write y), backward 5
//   (read x and dy twice, write dx), eval 2; at the measured copy bandwidth (~40 GB/s for
//   read + write on this machine's two cores) [32,64,56,56] (25.7 MB) needs >= 1.9 / 3.2 /
//   1.3 ms, and torch's BN then ReLU moves 5 / 7 / 4 passes for the same work. Chapter-sized
//   tensors (0.1-3 MB) live in L2/L3, where the passes run faster than the copy figure.
// Why the loops look as they do:
//  * every loop carries `omp simd`: without it the compiler keeps a float sum's order and runs
//    one add per 4 cycles;
//  * the activation is a template parameter (kAct, picked by dispatch_activation), never tested
//    inside a loop: GCC leaves such a loop scalar;
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
#include "../cpu_kernel_table.h"
#include "batch_norm_planes.h"
#include "batch_norm_rows.h"
#include "batch_norm_tensors.h"
#include "block_cache.h"
#include "parallel.h"

namespace convkit {
namespace {

using namespace cpu_batch_norm;




std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps,
    c10::string_view activation, double alpha, double beta) {
  const char* op = "convkit::batch_norm_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] = check_batch_norm_forward(op, input, weight, bias, running_mean,
                                                         running_var, training, eps);
  const RowView view = row_view(input, N, C, S);
  const at::Tensor x = input.contiguous(view.format);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  at::Tensor output = empty_in_format(x.sizes(), x.options(), view.format, cached_empty);
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
    const ActivationParams<acc_t> act = spec.params<acc_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
    acc_t* mean_ptr = save_mean.mutable_data_ptr<acc_t>();
    acc_t* var_ptr = save_var.mutable_data_ptr<acc_t>();
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b.const_data_ptr<acc_t>();
    if (view.rows) {
      if (training) {
        if (count == 0) {
          std::fill(mean_ptr, mean_ptr + C, acc_t(0));
          std::fill(var_ptr, var_ptr + C, acc_t(0));
        } else {
          row_statistics<scalar_t, acc_t>(x_ptr, view.images, C, view.plane, mean_ptr,
                                          var_ptr);
        }
      }
      const AffineRows<acc_t> affine = affine_rows(mean_ptr, var_ptr, w_ptr, b_ptr, C, eps);
      dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
        row_normalize<kAct>(x_ptr, view.images, C, view.plane, affine.scale.data(),
                            affine.shift.data(), act, y_ptr);
      });
      return;
    }
    const bool stream = output.nbytes() >= kStreamingBytes;
    if (!training) {
      // Nothing to reduce: planes in memory order, each thread one contiguous range of (n, c),
      // so both tensors stream through the prefetchers. (By channel, each thread jumps C * S
      // values between planes of 1-4 KiB, too short for the prefetchers to get going: a
      // MobileNetV2 eval forward's [32, 144, 16, 16] took 2x torch's time on a conv output not
      // in L2.)
      const AffineRows<acc_t> affine = affine_rows(mean_ptr, var_ptr, w_ptr, b_ptr, C, eps);
      const int64_t plane_grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(S, 1));
      parallel_for(0, N * C, plane_grain, [&](int64_t begin, int64_t end) {
        [[maybe_unused]] const StreamingStoreFence fence;
        dispatch_activation(spec.kind, [&](auto kind) {
          constexpr Activation kAct = decltype(kind)::value;
          for (int64_t plane = begin; plane < end; ++plane) {
            const int64_t c = plane % C;
            normalize_plane<kAct>(x_ptr + plane * S, S, affine.scale[c], affine.shift[c], act,
                                  y_ptr + plane * S, stream);
          }
        });
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(count, 1));
    parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      [[maybe_unused]] const StreamingStoreFence fence;
      for (int64_t c = begin; c < end; ++c) {
        if (training) {
          if (count == 0) {
            mean_ptr[c] = acc_t(0);
            var_ptr[c] = acc_t(0);
          } else {
            const auto [mean, var] = plane_statistics<scalar_t, acc_t>(x_ptr, N, C, S, c);
            mean_ptr[c] = static_cast<acc_t>(mean);
            var_ptr[c] = static_cast<acc_t>(var);
          }
        }
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        const acc_t scale = affine.scale;
        const acc_t shift = affine.shift;
        dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* src = x_ptr + (n * C + c) * S;
            scalar_t* dst = y_ptr + (n * C + c) * S;
            normalize_plane<kAct>(src, S, scale, shift, act, dst, stream);
          }
        });
      }
    });
  });
  return std::make_tuple(output.view(input.sizes()), save_mean, save_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta,
    std::array<bool, 3> output_mask) {
  const char* op = "convkit::batch_norm_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const ActivationSpec spec = activation_spec(op, activation, alpha, beta);
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, save_mean, save_var);
  const RowView view = row_view(input, N, C, S);
  const at::Tensor x = input.contiguous(view.format);
  const at::Tensor dy = grad_output.contiguous(view.format);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = per_channel_or(weight, C, acc_type, 1.0, x.options());
  const at::Tensor b = per_channel_or(bias, C, acc_type, 0.0, x.options());
  const at::Tensor mean = as_acc_contiguous(save_mean, acc_type);
  const at::Tensor var = as_acc_contiguous(save_var, acc_type);

  at::Tensor grad_input =
      output_mask[0] ? empty_in_format(x.sizes(), x.options(), view.format, cached_empty)
                     : at::empty({0}, x.options());
  const at::ScalarType param_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  at::Tensor grad_weight_acc = at::empty({C}, x.options().dtype(acc_type));
  at::Tensor grad_bias_acc = at::empty({C}, x.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActivationParams<acc_t> act = spec.params<acc_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b.const_data_ptr<acc_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* var_ptr = var.const_data_ptr<acc_t>();
    acc_t* gw_ptr = grad_weight_acc.mutable_data_ptr<acc_t>();
    acc_t* gb_ptr = grad_bias_acc.mutable_data_ptr<acc_t>();
    if (view.rows) {
      std::vector<acc_t> scale(C), shift(C), invstd(C);
      for (int64_t c = 0; c < C; ++c) {
        const ChannelAffine<acc_t> affine =
            channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
        invstd[c] = affine.invstd;
        scale[c] = affine.scale;
        shift[c] = affine.shift;
      }
      std::vector<double> sum_dy(C), sum_dy_xmu(C);
      dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
        row_backward<kAct>(x_ptr, dy_ptr, view.images, C, view.plane, scale.data(),
                           shift.data(), act, mean_ptr, invstd.data(), training, sum_dy.data(),
                           sum_dy_xmu.data(), dx_ptr);
      });
      for (int64_t c = 0; c < C; ++c) {
        const ChannelGradient<acc_t> grad =
            channel_gradient(sum_dy[c], sum_dy_xmu[c], count, invstd[c], training);
        gw_ptr[c] = grad.grad_weight;
        gb_ptr[c] = grad.grad_bias;
      }
      return;
    }
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(count, 1));
    dispatch_activation(spec.kind, [&](auto kind) {
        constexpr Activation kAct = decltype(kind)::value;
      parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const ChannelAffine<acc_t> affine =
              channel_affine(mean_ptr[c], var_ptr[c], w_ptr[c], b_ptr[c], eps);
          const acc_t scale = affine.scale;
          const acc_t shift = affine.shift;
          const acc_t mu = mean_ptr[c];
          // Reduction pass: sum(dy') and sum(dy' * (x - mean)).
          const auto [sum_dy, sum_dy_xmu] =
              plane_gradient_sums<kAct>(x_ptr, dy_ptr, N, C, S, c, scale, shift, mu, act);
          const ChannelGradient<acc_t> grad =
              channel_gradient(sum_dy, sum_dy_xmu, count, affine.invstd, training);
          gw_ptr[c] = grad.grad_weight;
          gb_ptr[c] = grad.grad_bias;
          if (dx_ptr == nullptr) continue;
          // Element-wise pass. Training: the mean and variance depend on x, which adds the two
          // correction terms; eval: statistics are constants.
          for (int64_t n = 0; n < N; ++n) {
            const int64_t offset = (n * C + c) * S;
            grad_input_plane<kAct>(x_ptr + offset, dy_ptr + offset, S, scale, shift, act, mu,
                                     grad.mean_dy, grad.proj, training, dx_ptr + offset);
          }
        }
      });
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

// convkit._C registers these for the CPU dispatch key (cpu_kernels.cpp).
void add_batch_norm_kernels(CpuKernelTable& table) {
  table.batch_norm_forward = &batch_norm_forward_cpu;
  table.batch_norm_backward = &batch_norm_backward_cpu;
  table.batch_norm_update_stats = &batch_norm_update_stats_cpu;
}

}  // namespace convkit
