// Argument checks shared by the CPU and CUDA kernels: every op validates its inputs here,
// before any memory is touched, and reports what it received and what it expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "conv2d.h"

namespace convkit {

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
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation of 2 values each, but got ", stride,
              ", ", padding, ", ", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": expected a positive stride, but got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op,
              ": expected a positive dilation, but got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op,
              ": expected a non-negative padding, but got ", padding);
  TORCH_CHECK(groups > 0, op, ": expected a positive number of groups, but got ", groups);

  Conv2dGeometry g{};
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_channels = weight.size(0);
  g.groups = groups;
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];

  TORCH_CHECK(g.out_channels > 0 && g.kernel_h > 0 && g.kernel_w > 0, op,
              ": expected a weight with positive out_channels and kernel size, but got shape ",
              weight.sizes());
  TORCH_CHECK(g.out_channels % groups == 0, op, ": expected out_channels (", g.out_channels,
              ") to be divisible by groups (", groups, ")");
  TORCH_CHECK(g.in_channels == weight.size(1) * groups, op, ": expected input of shape ",
              input.sizes(), " to have ", weight.size(1) * groups,
              " channels (weight.size(1) = ", weight.size(1), " times groups = ", groups,
              "), but got ", g.in_channels, " channels");

  const int64_t padded_h = g.in_h + 2 * g.pad_h;
  const int64_t padded_w = g.in_w + 2 * g.pad_w;
  const int64_t dilated_kh = g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t dilated_kw = g.dilation_w * (g.kernel_w - 1) + 1;
  TORCH_CHECK(dilated_kh <= padded_h && dilated_kw <= padded_w, op,
              ": the (dilated) kernel size (", dilated_kh, " x ", dilated_kw,
              ") is larger than the padded input size (", padded_h, " x ", padded_w,
              "); expected a kernel no larger than the padded input");
  g.out_h = conv_output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = conv_output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  return g;
}

inline void check_conv2d_bias(const char* op, const at::Tensor& input,
                              const c10::optional<at::Tensor>& bias, int64_t out_channels) {
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
                              const c10::optional<at::Tensor>& t, const char* name,
                              int64_t channels) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == input.device(), op, ": expected ", name,
              " on the same device as input (", input.device(), "), but got ", t->device());
  check_floating(op, *t, name);
  TORCH_CHECK(t->dim() == 1 && t->numel() == channels, op, ": expected ", name,
              " to be a 1-D tensor of ", channels, " elements (one per channel of input ",
              input.sizes(), "), but got shape ", t->sizes());
}

inline void check_batch_norm_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input of at least 2 dimensions [N, C, ...], ",
              "but got a ", input.dim(), "-D tensor of shape ", input.sizes());
  check_floating(op, input, "input");
  TORCH_CHECK(input.size(1) > 0, op, ": expected at least one channel, but got input of shape ",
              input.sizes());
}

}  // namespace convkit
