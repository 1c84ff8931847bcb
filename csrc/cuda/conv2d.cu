// conv2d on CUDA by im2col + GEMM: the CPU algorithm (csrc/cpu/conv2d.cpp) with kernels of
// ours for the data movement and cuBLAS (through at::mm, on the current stream, honouring
// torch's TF32 setting) for the GEMMs.
//
//   forward   im2col_kernel: columns[K, chunk*L] of a chunk of images (one thread per
//             column entry, index math from csrc/conv2d.h); one GEMM per group into
//             out_t[O, chunk*L]; scatter_output_kernel copies to [chunk, O, L] adding the bias.
//   backward  gather_grad_kernel: grad_t[O, chunk*L] from grad_output; grad_W_g += grad_t_g @
//             columns_g^T (GEMM accumulated over chunks, in float for half types);
//             dcolumns_g = W_g^T @ grad_t_g; col2im_kernel gathers each input element's
//             gradient (deterministic, no atomics); bias_grad_kernel: one block per channel.
// Column buffer bounded by CONVKIT_COLUMN_BUDGET_MB (default 64 MiB), as on the CPU.
// No host synchronisation anywhere: every kernel and GEMM is queued on the current stream.
// Version 1 (this file): element-per-thread im2col/col2im, one GEMM per group per chunk.
// It has not yet been run on a GPU: the index helpers it uses are tested on the CPU through
// the im2col/col2im ops.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../checks.h"
#include "../column_buffer.h"
#include "../conv2d.h"
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


at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const char* op = "convkit::conv2d_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(op, input, bias, g.out_channels);
  const c10::cuda::CUDAGuard device_guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = input.contiguous();
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (output.numel() == 0) return output;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / groups;
  const int64_t Kg = K / groups;
  const at::Tensor weight_matrix = weight.contiguous().view({O, Kg});
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t chunk = images_per_chunk(g, x.element_size());
  at::Tensor column_buffer = at::empty({K * chunk * L}, x.options());
  at::Tensor out_t_buffer = at::empty({O * chunk * L}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_forward_cuda",
                                  [&] {
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      at::Tensor columns = matrix_view(column_buffer, K, count * L);
      at::Tensor out_t = matrix_view(out_t_buffer, O, count * L);
      im2col_kernel<scalar_t><<<blocks_for(K * count * L), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), g, first, count, L, count * L,
          columns.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int64_t group = 0; group < groups; ++group) {
        at::Tensor out_group = out_t.narrow(0, group * Og, Og);
        at::mm_out(out_group, weight_matrix.narrow(0, group * Og, Og),
                   columns.narrow(0, group * Kg, Kg));
      }
      scatter_output_kernel<scalar_t><<<blocks_for(count * O * L), kThreads, 0, stream>>>(
          out_t.const_data_ptr<scalar_t>(), has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr,
          first, count, O, L, output.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "convkit::conv2d_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(op, input, grad_output, g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / groups;
  const int64_t Kg = K / groups;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());

  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_weight_acc =
      output_mask[1] ? at::zeros({O, Kg}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({O}, x.options()) : at::empty({0}, x.options());

  const bool need_columns_pass = (output_mask[0] || output_mask[1]) && g.batch > 0 && L > 0;
  if (need_columns_pass) {
    const at::Tensor weight_matrix = weight.contiguous().view({O, Kg});
    const int64_t chunk = images_per_chunk(g, x.element_size());
    at::Tensor column_buffer = at::empty({K * chunk * L}, x.options());
    at::Tensor grad_t_buffer = at::empty({O * chunk * L}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "conv2d_backward_cuda", [&] {
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        at::Tensor columns = matrix_view(column_buffer, K, count * L);
        at::Tensor grad_t = matrix_view(grad_t_buffer, O, count * L);
        gather_grad_kernel<scalar_t><<<blocks_for(count * O * L), kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), first, count, O, L, grad_t.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (output_mask[1]) {
          im2col_kernel<scalar_t><<<blocks_for(K * count * L), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), g, first, count, L, count * L,
              columns.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          for (int64_t group = 0; group < groups; ++group) {
            at::Tensor acc_group = grad_weight_acc.narrow(0, group * Og, Og);
            const at::Tensor grad_group = grad_t.narrow(0, group * Og, Og);
            const at::Tensor columns_group = columns.narrow(0, group * Kg, Kg);
            if (acc_type == x.scalar_type()) {
              acc_group.addmm_(grad_group, columns_group.t());
            } else {
              acc_group.add_(at::mm(grad_group, columns_group.t()));
            }
          }
        }
        if (output_mask[0]) {
          for (int64_t group = 0; group < groups; ++group) {
            at::Tensor dcolumns_group = columns.narrow(0, group * Kg, Kg);
            at::mm_out(dcolumns_group, weight_matrix.narrow(0, group * Og, Og).t(),
                       grad_t.narrow(0, group * Og, Og));
          }
          col2im_kernel<scalar_t><<<blocks_for(count * g.in_channels * g.in_area()), kThreads, 0,
                                    stream>>>(columns.const_data_ptr<scalar_t>(), g, first, count,
                                              L, count * L, grad_input.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  } else if (output_mask[0]) {
    grad_input.zero_();
  }

  if (output_mask[2]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "conv2d_bias_grad_cuda", [&] {
      bias_grad_kernel<scalar_t><<<static_cast<unsigned int>(O), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), g.batch, O, L, grad_bias.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_weight = output_mask[1]
                               ? grad_weight_acc.to(x.scalar_type()).view(weight.sizes())
                               : at::empty({0}, x.options());
  return std::make_tuple(grad_input, grad_weight, grad_bias);
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
