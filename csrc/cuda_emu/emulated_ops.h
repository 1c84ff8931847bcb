// convkit's CUDA ops compiled for the CPU against the emulator (emulated_ops.cpp): the same
// kernels and host code as csrc/cuda/*.cu, on CPU tensors. The CPU kernels hand their calls
// to these while CUDA emulation is on in the calling thread (routing.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace convkit::emulated_cuda {

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask);
at::Tensor im2col(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                  at::IntArrayRef padding, at::IntArrayRef stride);
at::Tensor col2im(const at::Tensor& columns, at::IntArrayRef output_size,
                  at::IntArrayRef kernel_size, at::IntArrayRef dilation, at::IntArrayRef padding,
                  at::IntArrayRef stride);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation, double alpha, double beta);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta, std::array<bool, 3> output_mask);
void batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var,
                             double momentum, int64_t count);

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input);
std::tuple<at::Tensor, at::Tensor> batch_norm_combine_stats(const at::Tensor& mean,
                                                            const at::Tensor& var,
                                                            at::IntArrayRef count);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double alpha, double beta);
at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     int64_t count, double eps, c10::string_view activation, double alpha, double beta);
}  // namespace convkit::emulated_cuda
