// conv2d's CUDA kernels (device code only; the launches are in conv2d_ops.h). Every index is
// 64-bit and every loop is grid-stride, so any tensor size works with a bounded grid.
//
//   im2col_kernel          one thread per column entry, im2col_value of csrc/conv2d.h
//   col2im_kernel          one thread per input element, gathering its column entries
//                          (col2im_gather of csrc/conv2d.h): deterministic, no atomics
//   scatter_output_kernel  [O, count*L] -> [count, O, L] with the bias added
//   gather_grad_kernel     [count, O, L] -> [O, count*L]
//   bias_grad_kernel       one block per output channel, a block reduction in float/double
// All are memory-bound copies or gathers: one read and one write per element (col2im reads
// kH*kW column entries per input element, bias_grad one read per element of grad_output).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../conv2d.h"
#include "common.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

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

// grad_bias[o] = sum over images and positions of grad_output[:, o, :]: one block per channel
// (blockIdx.x), launched with kThreads threads.
template <typename scalar_t>
__global__ void bias_grad_kernel(const scalar_t* __restrict__ grad_output, int64_t batch,
                                 int64_t channels, int64_t L, scalar_t* __restrict__ grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ SharedArray<acc_t, kWarps> scratch;
  const int64_t o = blockIdx.x;
  acc_t sum = acc_t(0);
  for (int64_t j = threadIdx.x; j < batch * L; j += blockDim.x) {
    const int64_t b = j / L;
    sum += static_cast<acc_t>(grad_output[(b * channels + o) * L + (j - b * L)]);
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) grad_bias[o] = static_cast<scalar_t>(sum);
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
