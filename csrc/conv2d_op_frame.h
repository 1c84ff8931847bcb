// The conv2d ops' frames, one for every backend: argument checks, the output and, for the
// backward, the output mask, the weight gradient's accumulator and the bias gradient. A
// backend supplies only its kernels:
//   empty(sizes, options)                        an uninitialised contiguous tensor (the
//                                                CPU's comes from its block cache)
//   forward(x, bias, g, output, channels_last)   the convolution into output (never empty);
//                                                bias undefined when the layer has none
//   columns_pass(dy, x, g, grads) -> bool        the input and/or weight gradient (whichever
//                                                grads.want_* says) into grads.input and
//                                                grads.weight_acc; true when it also wrote
//                                                grads.bias (a pass that reads dY anyway)
//   bias_grad(dy, g, grads.bias, channels_last)  otherwise, the bias gradient on its own
// The memory format (csrc/memory_format.h): outputs and the input gradient follow torch's rule
// (channels-last when the input or the weight is). A backend that computes in channels-last
// memory (native_channels_last) gets x, dy, output and grads.input in it, channels_last set;
// any other gets them contiguous and the frame converts its results at the end.
// Invariants the frames keep, so that no backend can drift from torch's semantics:
//  * an unwanted gradient is an empty tensor of shape [0] (as the schema's callers expect);
//  * the weight gradient accumulates in the compute type (float for bfloat16/float16),
//    starting from zeros, and is rounded to the input's dtype once, at the end;
//  * no kernel runs on an empty output or batch: a wanted input gradient of a batch with no
//    output positions is zeros, a wanted bias gradient of zero channels is empty.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "conv2d.h"
#include "memory_format.h"

namespace convkit {

struct Conv2dGradients {
  bool want_input = false;
  bool want_weight = false;
  bool want_bias = false;
  bool channels_last = false;  // input (and x, dy) in channels-last memory
  at::Tensor input;       // [N, C, H, W] when wanted
  at::Tensor weight_acc;  // [O, C/groups * kH * kW] in the compute type, zeros, when wanted
  at::Tensor bias;        // [O] when wanted
};

// The format of a layer's results (torch's rule) and the one its kernels compute in: the
// same when the backend computes in channels-last memory, contiguous otherwise.
struct Conv2dLayout {
  at::MemoryFormat format;
  at::MemoryFormat compute;
  bool channels_last;  // the kernels get channels-last memory
};

inline Conv2dLayout conv2d_layout(const at::Tensor& input, const at::Tensor& weight,
                                  bool native_channels_last) {
  const at::MemoryFormat format = conv2d_memory_format(input, weight);
  const bool channels_last = native_channels_last && is_channels_last_format(format);
  return {format, channels_last ? format : at::MemoryFormat::Contiguous, channels_last};
}

template <typename Empty, typename Forward>
at::Tensor run_conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool native_channels_last, Empty empty, Forward forward) {
  const char* op = "convkit::conv2d_forward";
  // The ATen calls the kernels make (mm, to) are implementation details: keep autograd out
  // of them even when the caller's tensors require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g =
      make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(op, input, bias, g.out_channels);
  const Conv2dLayout layout = conv2d_layout(input, weight, native_channels_last);
  const at::Tensor x = input.contiguous(layout.compute);
  at::Tensor output = empty_in_format({g.batch, g.out_channels, g.out_h, g.out_w}, x.options(),
                                      layout.compute, empty);
  if (output.numel() > 0) {
    const bool has_bias = bias.has_value() && bias->defined();
    forward(x, has_bias ? *bias : at::Tensor(), g, output, layout.channels_last);
  }
  return restride_to(output, layout.format);
}

template <typename Empty, typename ColumnsPass, typename BiasGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool native_channels_last, Empty empty,
    ColumnsPass columns_pass, BiasGrad bias_grad) {
  const char* op = "convkit::conv2d_backward";
  // The ATen calls the kernels make (mm, to) are implementation details: keep autograd out
  // of them even when the caller's tensors require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g =
      make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(op, input, grad_output, g);
  const Conv2dLayout layout = conv2d_layout(input, weight, native_channels_last);
  const at::Tensor x = input.contiguous(layout.compute);
  const at::Tensor dy = grad_output.contiguous(layout.compute);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  // Each unwanted output its own tensor: outputs must not alias one another.
  auto unwanted = [&] { return at::empty({0}, x.options()); };

  Conv2dGradients grads;
  grads.want_input = output_mask[0];
  grads.want_weight = output_mask[1];
  grads.want_bias = output_mask[2];
  grads.channels_last = layout.channels_last;
  grads.input = grads.want_input
                    ? empty_in_format(x.sizes(), x.options(), layout.compute, empty)
                    : unwanted();
  if (grads.want_weight) {
    grads.weight_acc =
        at::zeros({g.out_channels, g.column_rows() / groups}, x.options().dtype(acc_type));
  }
  grads.bias = grads.want_bias ? empty({g.out_channels}, x.options()) : unwanted();

  bool bias_done = false;
  if ((grads.want_input || grads.want_weight) && g.batch > 0 && g.out_area() > 0) {
    bias_done = columns_pass(dy, x, g, grads);
  } else if (grads.want_input) {
    grads.input.zero_();
  }
  if (grads.want_bias && g.out_channels > 0 && !bias_done) {
    bias_grad(dy, g, grads.bias, layout.channels_last);
  }
  at::Tensor grad_weight =
      grads.want_weight
          ? restride_to(grads.weight_acc.to(x.scalar_type()).view(weight.sizes()),
                        weight.suggest_memory_format())
          : unwanted();
  at::Tensor grad_input =
      grads.want_input ? restride_to(grads.input, layout.format) : grads.input;
  return std::make_tuple(grad_input, grad_weight, grads.bias);
}

}  // namespace convkit
