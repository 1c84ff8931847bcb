// Batch norm's CUDA code (csrc/cuda/batch_norm_ops.h) compiled for the emulator.
#include "../cuda/batch_norm_ops.h"
#include "emulated_ops.h"

namespace convkit::emulated_cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation, double alpha, double beta) {
  return cuda_emulated::batch_norm_forward(input, weight, bias, running_mean, running_var,
                                           training, eps, activation, alpha, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta, std::array<bool, 3> output_mask) {
  return cuda_emulated::batch_norm_backward(grad_output, input, weight, bias, save_mean, save_var,
                                            training, eps, activation, alpha, beta, output_mask);
}

void batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var,
                             double momentum, int64_t count) {
  cuda_emulated::batch_norm_update_stats(running_mean, running_var, batch_mean, batch_var,
                                         momentum, count);
}

}  // namespace convkit::emulated_cuda
