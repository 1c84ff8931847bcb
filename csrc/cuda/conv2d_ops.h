// The host side of conv2d on CUDA: the CUDA backend of csrc/cuda/conv2d_driver.h (which holds the
// algorithm: im2col + one GEMM per group per chunk of images, the GEMMs through at::mm, i.e.
// cuBLAS on the current stream, honouring torch's TF32 setting) and the F.unfold/F.fold-like
// ops. Compiled by nvcc into the CUDA kernels of the ops (conv2d.cu) and by the host compiler
// into their emulated twins (csrc/cuda_emu/emulated_ops.cpp), where at::mm runs on the CPU.
// No host synchronisation: everything is queued on the current stream.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../conv2d.h"
#include "conv2d_driver.h"
#include "conv2d_kernels.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

// The CUDA side of csrc/cuda/conv2d_driver.h: each step one kernel on the current stream.
struct ConvBackend {
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return empty_device(sizes, options);
  }

  template <typename scalar_t>
  static void im2col_chunk(const scalar_t* input, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* columns) {
    const int64_t L = g.out_area();
    launch<im2col_kernel<scalar_t>>(blocks_for(g.column_rows() * count * L), kThreads, 0, input,
                                    g, first, count, L, count * L, columns);
  }

  template <typename scalar_t>
  static void col2im_chunk(const scalar_t* columns, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* grad_input) {
    const int64_t L = g.out_area();
    launch<col2im_kernel<scalar_t>>(blocks_for(count * g.in_channels * g.in_area()), kThreads, 0,
                                    columns, g, first, count, L, count * L, grad_input);
  }

  template <typename scalar_t>
  static void scatter_output(const scalar_t* out_t, const scalar_t* bias, const Conv2dGeometry& g,
                             int64_t first, int64_t count, scalar_t* output) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    launch<scatter_output_kernel<scalar_t>>(blocks_for(count * O * L), kThreads, 0, out_t, bias,
                                            first, count, O, L, output);
  }

  template <typename scalar_t>
  static void gather_grad(const scalar_t* grad_output, const Conv2dGeometry& g, int64_t first,
                          int64_t count, scalar_t* grad_t) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    launch<gather_grad_kernel<scalar_t>>(blocks_for(count * O * L), kThreads, 0, grad_output,
                                         first, count, O, L, grad_t);
  }

  template <typename scalar_t>
  static void bias_grad(const scalar_t* grad_output, const Conv2dGeometry& g, scalar_t* grad_bias) {
    launch<bias_grad_kernel<scalar_t>>(static_cast<unsigned int>(g.out_channels), kThreads, 0,
                                       grad_output, g.batch, g.out_channels, g.out_area(),
                                       grad_bias);
  }
};

inline at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const DeviceGuard device_guard(input.device());
  return conv2d_forward_impl<ConvBackend>(input, weight, bias, stride, padding, dilation, groups);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const DeviceGuard device_guard(input.device());
  return conv2d_backward_impl<ConvBackend>(grad_output, input, weight, stride, padding, dilation,
                                           groups, output_mask);
}

inline at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size,
                         at::IntArrayRef dilation, at::IntArrayRef padding,
                         at::IntArrayRef stride) {
  const Conv2dGeometry g =
      make_im2col_geometry("convkit::im2col", input, kernel_size, dilation, padding, stride);
  const DeviceGuard device_guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  at::Tensor columns = empty_device({g.batch, K, L}, x.options());
  if (columns.numel() == 0) return columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "im2col_cuda", [&] {
    launch<im2col_kernel<scalar_t>>(blocks_for(columns.numel()), kThreads, 0,
                                    x.const_data_ptr<scalar_t>(), g, int64_t(0), g.batch, K * L,
                                    L, columns.mutable_data_ptr<scalar_t>());
  });
  return columns;
}

inline at::Tensor col2im(const at::Tensor& columns, at::IntArrayRef output_size,
                         at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                         at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g = make_col2im_geometry("convkit::col2im", columns, output_size,
                                                kernel_size, dilation, padding, stride);
  const DeviceGuard device_guard(columns.device());
  const at::Tensor cols = columns.contiguous();
  at::Tensor output = empty_device({g.batch, g.in_channels, g.in_h, g.in_w}, cols.options());
  if (output.numel() == 0) return output;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_cuda", [&] {
    launch<col2im_kernel<scalar_t>>(blocks_for(output.numel()), kThreads, 0,
                                    cols.const_data_ptr<scalar_t>(), g, int64_t(0), g.batch,
                                    K * L, L, output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
