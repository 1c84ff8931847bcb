// Argument checks shared by the CPU and CUDA kernels: every op validates its inputs here,
// before any memory is touched, and reports what it received and what it expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <optional>
#include <string_view>

#include <c10/util/safe_numerics.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <cstdlib>
#include <initializer_list>

#include "activation.h"
#include "conv2d.h"

namespace convkit {

// The product of sizes the caller gave (or derived from them), or an error naming `what` when
// it does not fit 64 bits: no size arithmetic may wrap around (a kernel area of 2^32 x 2^32 is 0).
inline int64_t checked_product(const char* op, const char* what,
                               std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t factor : factors) {
    TORCH_CHECK(!c10::mul_overflows(product, factor, &product), op, ": ", what, " (",
                c10::IntArrayRef(factors), ") overflows a 64-bit size");
  }
  return product;
}

inline int64_t checked_sum(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t sum = 0;
  TORCH_CHECK(!c10::add_overflows(a, b, &sum), op, ": ", what, " (", a, " + ", b,
              ") overflows a 64-bit size");
  return sum;
}

inline void check_same_device_and_dtype(const char* op, const at::Tensor& reference,
                                        const char* reference_name, const at::Tensor& other,
                                        const char* other_name) {
  TORCH_CHECK(other.device() == reference.device(), op, ": expected ", other_name,
              " on the same device as ", reference_name, " (", reference.device(), "), but got ",
              other_name, " on ", other.device());
  TORCH_CHECK(other.scalar_type() == reference.scalar_type(), op, ": expected ", other_name,
              " to have the same dtype as ", reference_name, " (", reference.scalar_type(),
              "), but got ", other.scalar_type());
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be a floating-point tensor (float64, float32, bfloat16 or float16), but got ",
              t.scalar_type());
}

// Checks the window arguments (stride, padding, dilation, kernel size against the padded
// input) and returns the geometry with its output size. Shared by conv2d and im2col/col2im.
inline Conv2dGeometry make_window_geometry(const char* op, int64_t batch, int64_t channels,
                                           int64_t in_h, int64_t in_w, int64_t kernel_h,
                                           int64_t kernel_w, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation of 2 values each, but got ", stride,
              ", ", padding, ", ", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": expected a positive stride, but got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op,
              ": expected a positive dilation, but got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op,
              ": expected a non-negative padding, but got ", padding);
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, op, ": expected a positive kernel size, but got (",
              kernel_h, ", ", kernel_w, ")");
  Conv2dGeometry g{};
  g.batch = batch;
  g.in_channels = channels;
  g.in_h = in_h;
  g.in_w = in_w;
  g.out_channels = channels;
  g.groups = 1;
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  const int64_t padded_h =
      checked_sum(op, "the padded input height", g.in_h, checked_product(op, "the padding", {2, g.pad_h}));
  const int64_t padded_w =
      checked_sum(op, "the padded input width", g.in_w, checked_product(op, "the padding", {2, g.pad_w}));
  const int64_t dilated_kh = checked_sum(
      op, "the dilated kernel height",
      checked_product(op, "the dilated kernel height", {g.dilation_h, g.kernel_h - 1}), 1);
  const int64_t dilated_kw = checked_sum(
      op, "the dilated kernel width",
      checked_product(op, "the dilated kernel width", {g.dilation_w, g.kernel_w - 1}), 1);
  TORCH_CHECK(dilated_kh <= padded_h && dilated_kw <= padded_w, op,
              ": the (dilated) kernel size (", dilated_kh, " x ", dilated_kw,
              ") is larger than the padded input size (", padded_h, " x ", padded_w,
              "); expected a kernel no larger than the padded input");
  g.out_h = conv_output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = conv_output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  // Every product the kernels form from the geometry: a column matrix's rows, an image's
  // columns, and an image's column entries (in bytes of the widest type).
  checked_product(op, "the column rows channels x kernel height x kernel width",
                  {g.in_channels, g.kernel_h, g.kernel_w});
  checked_product(op, "one image's column entries", {g.in_channels, g.kernel_h, g.kernel_w, g.out_h,
                                                     g.out_w, 8});
  checked_product(op, "the output size", {g.batch, g.in_channels, g.out_h, g.out_w});
  return g;
}

// Validates a conv2d call and returns its geometry. `op` names the caller in messages.
inline Conv2dGeometry make_conv2d_geometry(const char* op, const at::Tensor& input,
                                           const at::Tensor& weight, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups) {
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input [N, C, H, W], but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected a 4-D weight [out_channels, in_channels / groups, kH, kW], but got a ",
              weight.dim(), "-D tensor of shape ", weight.sizes());
  check_floating(op, input, "input");
  check_same_device_and_dtype(op, input, "input", weight, "weight");
  TORCH_CHECK(groups > 0, op, ": expected a positive number of groups, but got ", groups);
  const int64_t out_channels = weight.size(0);
  TORCH_CHECK(out_channels > 0 && weight.size(2) > 0 && weight.size(3) > 0, op,
              ": expected a weight with positive out_channels and kernel size, but got shape ",
              weight.sizes());
  TORCH_CHECK(out_channels % groups == 0, op, ": expected out_channels (", out_channels,
              ") to be divisible by groups (", groups, ")");
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": expected input of shape ",
              input.sizes(), " to have ", weight.size(1) * groups,
              " channels (weight.size(1) = ", weight.size(1), " times groups = ", groups,
              "), but got ", input.size(1), " channels");
  TORCH_CHECK((input.size(2) > 0 && input.size(3) > 0) || input.size(0) == 0 || input.size(1) == 0,
              op, ": expected an input with non-zero height and width (only the batch or the ",
              "channels may be empty), but got input of shape ", input.sizes());
  Conv2dGeometry g = make_window_geometry(op, input.size(0), input.size(1), input.size(2),
                                          input.size(3), weight.size(2), weight.size(3), stride,
                                          padding, dilation);
  g.out_channels = out_channels;
  g.groups = groups;
  checked_product(op, "the output size", {g.batch, g.out_channels, g.out_h, g.out_w});
  return g;
}

// im2col (as F.unfold): input [N, C, H, W] -> columns [N, C * kH * kW, oH * oW].
inline Conv2dGeometry make_im2col_geometry(const char* op, const at::Tensor& input,
                                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                           at::IntArrayRef padding, at::IntArrayRef stride) {
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input [N, C, H, W], but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  check_floating(op, input, "input");
  TORCH_CHECK(kernel_size.size() == 2, op, ": expected a kernel_size of 2 values, but got ",
              kernel_size);
  TORCH_CHECK(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
              ": expected an input with non-zero channels, height and width (only the batch may ",
              "be empty), but got input of shape ", input.sizes());
  return make_window_geometry(op, input.size(0), input.size(1), input.size(2), input.size(3),
                              kernel_size[0], kernel_size[1], stride, padding, dilation);
}

// col2im (as F.fold): columns [N, C * kH * kW, L] -> output [N, C, H, W], where L must be the
// number of windows of the given output size.
inline Conv2dGeometry make_col2im_geometry(const char* op, const at::Tensor& columns,
                                           at::IntArrayRef output_size,
                                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                           at::IntArrayRef padding, at::IntArrayRef stride) {
  TORCH_CHECK(columns.dim() == 3, op, ": expected 3-D columns [N, C * kH * kW, L], but got a ",
              columns.dim(), "-D tensor of shape ", columns.sizes());
  check_floating(op, columns, "columns");
  TORCH_CHECK(kernel_size.size() == 2 && output_size.size() == 2, op,
              ": expected kernel_size and output_size of 2 values each, but got ", kernel_size,
              " and ", output_size);
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": expected a positive kernel size, but got ", kernel_size);
  const int64_t area = checked_product(op, "the kernel area", {kernel_size[0], kernel_size[1]});
  TORCH_CHECK(columns.size(1) % area == 0, op, ": expected columns.size(1) (", columns.size(1),
              ") to be divisible by the kernel area ", kernel_size[0], " x ", kernel_size[1]);
  TORCH_CHECK(output_size[0] > 0 && output_size[1] > 0, op,
              ": expected a positive output_size, but got ", output_size);
  Conv2dGeometry g = make_window_geometry(op, columns.size(0), columns.size(1) / area,
                                          output_size[0], output_size[1], kernel_size[0],
                                          kernel_size[1], stride, padding, dilation);
  TORCH_CHECK(columns.size(2) == g.out_area(), op, ": expected columns.size(2) to be ",
              g.out_area(), " (", g.out_h, " x ", g.out_w, " windows for output_size ",
              output_size, "), but got ", columns.size(2));
  return g;
}

inline void check_conv2d_bias(const char* op, const at::Tensor& input,
                              const std::optional<at::Tensor>& bias, int64_t out_channels) {
  if (!bias.has_value() || !bias->defined()) return;
  check_same_device_and_dtype(op, input, "input", *bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op,
              ": expected a 1-D bias of ", out_channels, " elements (one per output channel), ",
              "but got shape ", bias->sizes());
}

inline void check_conv2d_grad_output(const char* op, const at::Tensor& input,
                                     const at::Tensor& grad_output, const Conv2dGeometry& g) {
  check_same_device_and_dtype(op, input, "input", grad_output, "grad_output");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.batch &&
                  grad_output.size(1) == g.out_channels && grad_output.size(2) == g.out_h &&
                  grad_output.size(3) == g.out_w,
              op, ": expected grad_output of shape [", g.batch, ", ", g.out_channels, ", ",
              g.out_h, ", ", g.out_w, "], but got ", grad_output.sizes());
}

// Batch norm: one value per channel in each of these optional parameters.
inline void check_per_channel(const char* op, const at::Tensor& input,
                              const std::optional<at::Tensor>& t, const char* name,
                              int64_t channels) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == input.device(), op, ": expected ", name,
              " on the same device as input (", input.device(), "), but got ", t->device());
  check_floating(op, *t, name);
  TORCH_CHECK(t->dim() == 1 && t->numel() == channels, op, ": expected ", name,
              " to be a 1-D tensor of ", channels, " elements (one per channel of input ",
              input.sizes(), "), but got shape ", t->sizes());
}

// A batch norm's parameters and running statistics have the input's dtype, or float32 for
// a float16/bfloat16 input (mixed precision), as torch requires.
inline void check_parameter_dtype(const char* op, const at::Tensor& input,
                                  const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  const at::ScalarType type = t->scalar_type();
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(type == input.scalar_type() || (reduced && type == at::kFloat), op, ": expected ",
              name, " of dtype ", input.scalar_type(),
              reduced ? " (the input's) or Float" : " (the input's)", ", but got ", type);
}

// The fused activation an op was asked for: one of activation_names, with hardtanh's
// (alpha, beta) = (min_val, max_val), min_val <= max_val, and leaky_relu's alpha its slope,
// as torch's F.hardtanh and F.leaky_relu take them; the others ignore alpha and beta.
inline ActivationSpec activation_spec(const char* op, std::string_view name, double alpha,
                                      double beta) {
  struct Named {
    std::string_view name;
    Activation kind;
  };
  static constexpr Named kNames[] = {
      {"none", Activation::none},         {"relu", Activation::relu},
      {"hardtanh", Activation::hardtanh}, {"leaky_relu", Activation::leaky_relu},
      {"silu", Activation::silu},         {"hardswish", Activation::hardswish}};
  for (const Named& entry : kNames) {
    if (entry.name != name) continue;
    if (entry.kind == Activation::hardtanh) {
      TORCH_CHECK(alpha <= beta, op, ": hardtanh expects min_val (alpha) <= max_val (beta), but got ",
                  alpha, " and ", beta);
    }
    if (entry.kind == Activation::leaky_relu) {
      TORCH_CHECK(!std::isnan(alpha), op, ": leaky_relu expects a negative_slope (alpha), but got ",
                  alpha);
    }
    return {entry.kind, alpha, beta};
  }
  TORCH_CHECK(false, op, ": expected activation to be one of none, relu, hardtanh, leaky_relu, ",
              "silu or hardswish, but got '", name, "'");
}

inline void check_batch_norm_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input of at least 2 dimensions [N, C, ...], ",
              "but got a ", input.dim(), "-D tensor of shape ", input.sizes());
  check_floating(op, input, "input");
  TORCH_CHECK(input.size(1) > 0, op, ": expected at least one channel, but got input of shape ",
              input.sizes());
}

// Batch norm views its input as [N, C, S]: S is the product of the spatial sizes and
// count = N * S the number of values per channel.
struct BatchNormShape {
  int64_t N, C, S, count;
};

inline BatchNormShape check_batch_norm_forward(const char* op, const at::Tensor& input,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& running_mean,
                                               const std::optional<at::Tensor>& running_var,
                                               bool training, double eps) {
  check_batch_norm_input(op, input);
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t S = N == 0 ? 0 : input.numel() / (N * C);
  check_per_channel(op, input, weight, "weight", C);
  check_per_channel(op, input, bias, "bias", C);
  check_per_channel(op, input, running_mean, "running_mean", C);
  check_per_channel(op, input, running_var, "running_var", C);
  check_parameter_dtype(op, input, weight, "weight");
  check_parameter_dtype(op, input, bias, "bias");
  check_parameter_dtype(op, input, running_mean, "running_mean");
  check_parameter_dtype(op, input, running_var, "running_var");
  TORCH_CHECK(eps >= 0, op, ": expected a non-negative eps, but got ", eps);
  const bool has_running = running_mean.has_value() && running_mean->defined() &&
                           running_var.has_value() && running_var->defined();
  TORCH_CHECK(training || has_running, op,
              ": running_mean and running_var must be given in eval mode (training=False)");
  TORCH_CHECK(!training || N * S != 1, op,
              ": expected more than 1 value per channel when training, but got input of shape ",
              input.sizes());
  return {N, C, S, N * S};
}

inline BatchNormShape check_batch_norm_backward(const char* op, const at::Tensor& grad_output,
                                                const at::Tensor& input,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& save_mean,
                                                const at::Tensor& save_var) {
  check_batch_norm_input(op, input);
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t S = N == 0 ? 0 : input.numel() / (N * C);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": expected grad_output of shape ",
              input.sizes(), ", but got ", grad_output.sizes());
  check_same_device_and_dtype(op, input, "input", grad_output, "grad_output");
  check_per_channel(op, input, weight, "weight", C);
  check_per_channel(op, input, bias, "bias", C);
  check_per_channel(op, input, save_mean, "save_mean", C);
  check_per_channel(op, input, save_var, "save_var", C);
  check_parameter_dtype(op, input, weight, "weight");
  check_parameter_dtype(op, input, bias, "bias");
  return {N, C, S, N * S};
}

inline void check_batch_norm_update_stats(const char* op, const at::Tensor& running_mean,
                                          const at::Tensor& running_var,
                                          const at::Tensor& batch_mean,
                                          const at::Tensor& batch_var, int64_t count) {
  const int64_t C = batch_mean.numel();
  TORCH_CHECK(batch_mean.dim() == 1 && batch_var.dim() == 1 && batch_var.numel() == C, op,
              ": expected 1-D batch_mean and batch_var of the same size, but got ",
              batch_mean.sizes(), " and ", batch_var.sizes());
  for (const auto* t : {&running_mean, &running_var}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": expected running statistics of ", C,
                " elements (one per channel), but got shape ", t->sizes());
    TORCH_CHECK(t->device() == batch_mean.device(), op, ": expected running statistics on ",
                batch_mean.device(), ", but got ", t->device());
    TORCH_CHECK(C <= 1 || t->stride(0) != 0, op,
                ": expected running statistics whose elements are distinct in memory, but got an ",
                "expanded tensor (stride 0)");
    check_floating(op, *t, "running statistics");
  }
  TORCH_CHECK(count >= 0, op, ": expected a non-negative count, but got ", count);
}

// Synchronised batch norm's ops (convkit.nn.SyncBatchNorm): the statistics of W processes,
// mean and var [W, C] of one floating dtype, with one count (values per channel) per process.
inline void check_batch_norm_combine_stats(const char* op, const at::Tensor& mean,
                                           const at::Tensor& var, at::IntArrayRef count) {
  TORCH_CHECK(mean.dim() == 2, op, ": expected mean of shape [processes, channels], but got ",
              mean.sizes());
  check_floating(op, mean, "mean");
  check_same_device_and_dtype(op, mean, "mean", var, "var");
  TORCH_CHECK(var.sizes() == mean.sizes(), op, ": expected var of mean's shape ", mean.sizes(),
              ", but got ", var.sizes());
  TORCH_CHECK(static_cast<int64_t>(count.size()) == mean.size(0), op, ": expected one count per ",
              "process (", mean.size(0), "), but got ", count.size());
  for (size_t r = 0; r < count.size(); ++r) {
    TORCH_CHECK(count[r] >= 0, op, ": expected non-negative counts, but got ", count[r],
                " for process ", r);
  }
}

// The backward's element-wise pass of a synchronised batch norm: the sums over every process
// (float64, one per channel) and their count, which holds at least this process's values.
inline void check_batch_norm_backward_elemt(const char* op, const at::Tensor& input,
                                            const at::Tensor& sum_dy,
                                            const at::Tensor& sum_dy_xmu, int64_t count,
                                            int64_t local_count) {
  const int64_t C = input.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&sum_dy, "sum_dy"},
                                {&sum_dy_xmu, "sum_dy_xmu"}}) {
    TORCH_CHECK(t->device() == input.device(), op, ": expected ", name,
                " on the same device as input (", input.device(), "), but got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 1 && t->numel() == C, op,
                ": expected ", name, " to be a 1-D float64 tensor of ", C, " elements, but got ",
                t->scalar_type(), " of shape ", t->sizes());
  }
  TORCH_CHECK(count >= local_count, op, ": expected count (values per channel over all ",
              "processes) of at least this process's ", local_count, ", but got ", count);
}

}  // namespace convkit
