// Fused BatchNorm(+ReLU) on CUDA: the kernels of batch_norm_kernels.cuh launched by the host
// code of batch_norm_ops.h, registered for tensors on CUDA devices.
#include <torch/library.h>

#include "batch_norm_ops.h"

TORCH_LIBRARY_IMPL(convkit, CUDA, m) {
  m.impl("batch_norm_forward", &convkit::cuda::batch_norm_forward);
  m.impl("batch_norm_backward", &convkit::cuda::batch_norm_backward);
  m.impl("batch_norm_update_stats", &convkit::cuda::batch_norm_update_stats);
}
