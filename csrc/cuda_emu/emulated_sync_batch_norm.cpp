// Synchronised batch norm's CUDA code (csrc/cuda/sync_batch_norm_ops.h) compiled for the
// emulator.
#include "../cuda/sync_batch_norm_ops.h"
#include "emulated_ops.h"

namespace convkit::emulated_cuda {

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  return cuda_emulated::batch_norm_stats(input);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_combine_stats(const at::Tensor& mean,
                                                            const at::Tensor& var,
                                                            at::IntArrayRef count) {
  return cuda_emulated::batch_norm_combine_stats(mean, var, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double alpha, double beta) {
  return cuda_emulated::batch_norm_backward_reduce(grad_output, input, mean, var, weight, bias, eps,
                                                   activation, alpha, beta);
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     int64_t count, double eps, c10::string_view activation, double alpha, double beta) {
  return cuda_emulated::batch_norm_backward_elemt(grad_output, input, mean, var, weight, bias,
                                                  sum_dy, sum_dy_xmu, count, eps, activation, alpha, beta);
}

}  // namespace convkit::emulated_cuda
