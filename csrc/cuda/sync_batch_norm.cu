// Synchronised batch norm's building blocks on CUDA: the host code of sync_batch_norm_ops.h,
// registered for tensors on CUDA devices.
#include <torch/library.h>

#include "sync_batch_norm_ops.h"

TORCH_LIBRARY_IMPL(convkit, CUDA, m) {
  m.impl("batch_norm_stats", &convkit::cuda::batch_norm_stats);
  m.impl("batch_norm_combine_stats", &convkit::cuda::batch_norm_combine_stats);
  m.impl("batch_norm_backward_reduce", &convkit::cuda::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &convkit::cuda::batch_norm_backward_elemt);
}
