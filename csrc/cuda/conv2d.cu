// conv2d, im2col and col2im on CUDA: the kernels of conv2d_kernels.cuh launched by the host
// code of conv2d_ops.h, registered for tensors on CUDA devices.
#include <torch/library.h>

#include "conv2d_ops.h"

TORCH_LIBRARY_IMPL(convkit, CUDA, m) {
  m.impl("conv2d_forward", &convkit::cuda::conv2d_forward);
  m.impl("conv2d_backward", &convkit::cuda::conv2d_backward);
  m.impl("im2col", &convkit::cuda::im2col);
  m.impl("col2im", &convkit::cuda::col2im);
}
