// conv2d, im2col and col2im's CUDA code (csrc/cuda/conv2d_ops.h) compiled for the emulator.
#include "../cuda/conv2d_ops.h"
#include "emulated_ops.h"

namespace convkit::emulated_cuda {

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return cuda_emulated::conv2d_forward(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  return cuda_emulated::conv2d_backward(grad_output, input, weight, stride, padding, dilation,
                                        groups, output_mask);
}

at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride) {
  return cuda_emulated::im2col(input, kernel_size, dilation, padding, stride);
}

at::Tensor col2im(const at::Tensor& columns, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride) {
  return cuda_emulated::col2im(columns, output_size, kernel_size, dilation, padding, stride);
}

}  // namespace convkit::emulated_cuda
