// conv2d on CUDA: the CUDA backend of csrc/conv2d_driver.h (which holds the algorithm:
// im2col + one GEMM per group per chunk of images, the GEMMs through at::mm, i.e. cuBLAS on
// the current stream, honouring torch's TF32 setting) and F.unfold/F.fold-like ops.
//
//   im2col_kernel          one thread per column entry, im2col_value of csrc/conv2d.h
//   col2im_kernel          one thread per input element, gathering its column entries
//                          (col2im_gather of csrc/conv2d.h): deterministic, no atomics
//   scatter_output_kernel  [O, count*L] -> [count, O, L] with the bias added
//   gather_grad_kernel     [count, O, L] -> [O, count*L]
//   bias_grad_kernel       one block per output channel, a block reduction in float/double
// All index math is 64-bit; no host synchronisation: everything is queued on the current
// stream. Version 1 (this file): element-per-thread kernels, one GEMM per group per chunk.
// It has not yet been run on a GPU: the index helpers it uses are tested on the CPU through
// the im2col/col2im ops.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../checks.h"
#include "../conv2d.h"
#include "../conv2d_driver.h"
#include "common.cuh"

namespace convkit {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

// columns[b * batch_stride + row * row_stride + pos] = im2col_value(image b, row, pos) for
// images [first, first + count). Threads run along pos first, so writes are coalesced in
// both layouts used: the chunked one (batch_stride = L, row_stride = count * L) and
// F.unfold's (batch_stride = K * L, row_stride = L).
template <typename scalar_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ input, Conv2dGeometry g,
                              int64_t first, int64_t count, int64_t batch_stride,
                              int64_t row_stride, scalar_t* __restrict__ columns) {
  const int64_t L = g.out_area();
  const int64_t total = g.column_rows() * count * L;
  const int64_t image_size = g.in_channels * g.in_area();
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pos = idx % L;
    const int64_t rest = idx / L;
    const int64_t b = rest % count;
    const int64_t row = rest / count;
    columns[b * batch_stride + row * row_stride + pos] =
        im2col_value(input + (first + b) * image_size, g, row, pos);
  }
}

// grad_input of images [first, first + count): one thread per input element, gathering the
// column entries im2col copied from it (col2im_gather of csrc/conv2d.h).
template <typename scalar_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ columns, Conv2dGeometry g,
                              int64_t first, int64_t count, int64_t batch_stride,
                              int64_t row_stride, scalar_t* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t area = g.in_area();
  const int64_t total = count * g.in_channels * area;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t iw = idx % g.in_w;
    const int64_t ih = (idx / g.in_w) % g.in_h;
    const int64_t c = (idx / area) % g.in_channels;
    const int64_t b = idx / (area * g.in_channels);
    grad_input[first * g.in_channels * area + idx] = static_cast<scalar_t>(
        col2im_gather<scalar_t, acc_t>(columns + b * batch_stride, row_stride, g, c, ih, iw));
  }
}

// output[first + b, o, l] = out_t[o, b * L + l] (+ bias[o]).
template <typename scalar_t>
__global__ void scatter_output_kernel(const scalar_t* __restrict__ out_t,
                                      const scalar_t* __restrict__ bias, int64_t first,
                                      int64_t count, int64_t channels, int64_t L,
                                      scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = count * channels * L;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = idx % L;
    const int64_t o = (idx / L) % channels;
    const int64_t b = idx / (L * channels);
    acc_t value = static_cast<acc_t>(out_t[o * count * L + b * L + l]);
    if (bias != nullptr) value += static_cast<acc_t>(bias[o]);
    output[first * channels * L + idx] = static_cast<scalar_t>(value);
  }
}

// grad_t[o, b * L + l] = grad_output[first + b, o, l]: channels first, as the GEMMs want.
template <typename scalar_t>
__global__ void gather_grad_kernel(const scalar_t* __restrict__ grad_output, int64_t first,
                                   int64_t count, int64_t channels, int64_t L,
                                   scalar_t* __restrict__ grad_t) {
  const int64_t total = count * channels * L;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = idx % L;
    const int64_t o = (idx / L) % channels;
    const int64_t b = idx / (L * channels);
    grad_t[o * count * L + b * L + l] = grad_output[first * channels * L + idx];
  }
}

// grad_bias[o] = sum over images and positions of grad_output[:, o, :]: one block per channel.
template <typename scalar_t>
__global__ void bias_grad_kernel(const scalar_t* __restrict__ grad_output, int64_t batch,
                                 int64_t channels, int64_t L, scalar_t* __restrict__ grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t o = blockIdx.x;
  acc_t sum = acc_t(0);
  for (int64_t j = threadIdx.x; j < batch * L; j += blockDim.x) {
    const int64_t b = j / L;
    sum += static_cast<acc_t>(grad_output[(b * channels + o) * L + (j - b * L)]);
  }
  sum = cuda::block_sum(sum, scratch);
  if (threadIdx.x == 0) grad_bias[o] = static_cast<scalar_t>(sum);
}


// The CUDA side of csrc/conv2d_driver.h: each step one kernel on the current stream.
struct CudaConvBackend {
  template <typename scalar_t>
  static void im2col_chunk(const scalar_t* input, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* columns) {
    const int64_t L = g.out_area();
    im2col_kernel<scalar_t><<<blocks_for(g.column_rows() * count * L), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(input, g, first, count, L,
                                                                   count * L, columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void col2im_chunk(const scalar_t* columns, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* grad_input) {
    const int64_t L = g.out_area();
    col2im_kernel<scalar_t><<<blocks_for(count * g.in_channels * g.in_area()), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(columns, g, first, count, L,
                                                                   count * L, grad_input);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void scatter_output(const scalar_t* out_t, const scalar_t* bias, const Conv2dGeometry& g,
                             int64_t first, int64_t count, scalar_t* output) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    scatter_output_kernel<scalar_t><<<blocks_for(count * O * L), kThreads, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(out_t, bias, first,
                                                                           count, O, L, output);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void gather_grad(const scalar_t* grad_output, const Conv2dGeometry& g, int64_t first,
                          int64_t count, scalar_t* grad_t) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    gather_grad_kernel<scalar_t><<<blocks_for(count * O * L), kThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(grad_output, first, count,
                                                                        O, L, grad_t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void bias_grad(const scalar_t* grad_output, const Conv2dGeometry& g, scalar_t* grad_bias) {
    bias_grad_kernel<scalar_t><<<static_cast<unsigned int>(g.out_channels), kThreads, 0,
                                 c10::cuda::getCurrentCUDAStream()>>>(
        grad_output, g.batch, g.out_channels, g.out_area(), grad_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return conv2d_forward_impl<CudaConvBackend>(input, weight, bias, stride, padding, dilation,
                                              groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return conv2d_backward_impl<CudaConvBackend>(grad_output, input, weight, stride, padding,
                                               dilation, groups, output_mask);
}

at::Tensor im2col_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                       at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g =
      make_im2col_geometry("convkit::im2col", input, kernel_size, dilation, padding, stride);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  at::Tensor columns = at::empty({g.batch, K, L}, x.options());
  if (columns.numel() == 0) return columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "im2col_cuda", [&] {
    im2col_kernel<scalar_t><<<blocks_for(columns.numel()), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), g, 0, g.batch, K * L, L, columns.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return columns;
}

at::Tensor col2im_cuda(const at::Tensor& columns, at::IntArrayRef output_size,
                       at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                       at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g = make_col2im_geometry("convkit::col2im", columns, output_size,
                                                kernel_size, dilation, padding, stride);
  const c10::cuda::CUDAGuard device_guard(columns.device());
  const at::Tensor cols = columns.contiguous();
  at::Tensor output = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, cols.options());
  if (output.numel() == 0) return output;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_cuda", [&] {
    col2im_kernel<scalar_t><<<blocks_for(output.numel()), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
        cols.const_data_ptr<scalar_t>(), g, 0, g.batch, K * L, L, output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, CUDA, m) {
  m.impl("conv2d_forward", &conv2d_forward_cuda);
  m.impl("conv2d_backward", &conv2d_backward_cuda);
  m.impl("im2col", &im2col_cuda);
  m.impl("col2im", &col2im_cuda);
}

}  // namespace convkit
