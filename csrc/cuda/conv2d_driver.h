// The chunked im2col + GEMM conv2d of the CUDA backend: the algorithm, with the device steps
// in a Backend struct (csrc/cuda/conv2d_ops.h), so that the steps are kernels of their own and
// the algorithm reads apart from them. The ops' frames (checks, outputs, the backward's mask,
// weight-gradient accumulator and bias) are csrc/conv2d_op_frame.h, shared with the CPU.
//
// Per chunk of `count` images (see csrc/conv2d.h for the column layout):
//   forward   columns[K, count*L] = im2col(input chunk)          Backend::im2col_chunk
//             out_t[O, count*L]   = W_g[Og, Kg] @ columns_g       one GEMM per group (at::mm:
//                                                                 BLAS on the CPU, cuBLAS on CUDA)
//             output[b, o, :]     = out_t[o, b*L:(b+1)*L] + bias  Backend::scatter_output
//   backward  grad_t[O, count*L]  = grad_output chunk, channels first   Backend::gather_grad
//             grad_W_g           += grad_t_g @ columns_g^T         (columns: im2col again)
//             dcolumns_g          = W_g^T @ grad_t_g; grad_input = col2im(dcolumns)
//                                                                 Backend::col2im_chunk (gather)
//             grad_bias[o]        = sum of grad_output[:, o, :]   Backend::bias_grad
// where K = C*kH*kW, L = oH*oW, Kg = K/groups, Og = O/groups. The column buffer is bounded by
// CONVKIT_COLUMN_BUDGET_MB (csrc/column_buffer.h): the chunk shrinks to fit, down to one image.
//
// A Backend is a struct of static member templates, each taking raw pointers into contiguous
// tensors (and running on the current stream on CUDA), and the allocator of outputs and buffers:
//   empty(sizes, options)                                   an uninitialised tensor
//   im2col_chunk(input, g, first, count, columns)           columns [K, count*L]
//   col2im_chunk(columns, g, first, count, grad_input)      grad_input [N, C, H, W]
//   scatter_output(out_t, bias_or_null, g, first, count, output)
//   gather_grad(grad_output, g, first, count, grad_t)
//   bias_grad(grad_output, g, grad_bias)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../column_buffer.h"
#include "../conv2d_op_frame.h"
#include "../conv2d.h"

namespace convkit {

template <typename Backend>
at::Tensor conv2d_forward_impl(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return Backend::empty(sizes, options);
  };
  auto forward = [&](const at::Tensor& x, const at::Tensor& bias_or_undefined,
                     const Conv2dGeometry& g, at::Tensor& output, bool /*channels_last*/) {
    const int64_t O = g.out_channels;
    const int64_t K = g.column_rows();
    const int64_t L = g.out_area();
    const int64_t Og = O / groups;
    const int64_t Kg = K / groups;
    const at::Tensor weight_matrix = weight.contiguous().view({O, Kg});
    const bool has_bias = bias_or_undefined.defined();
    const at::Tensor bias_c = has_bias ? bias_or_undefined.contiguous() : at::Tensor();
    const int64_t chunk = images_per_chunk(g, x.element_size());
    at::Tensor column_buffer = Backend::empty({K * chunk * L}, x.options());
    record_column_buffer(column_buffer.nbytes());
    at::Tensor out_t_buffer = Backend::empty({O * chunk * L}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_forward",
                                    [&] {
      const scalar_t* bias_ptr = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        at::Tensor columns = matrix_view(column_buffer, K, count * L);
        at::Tensor out_t = matrix_view(out_t_buffer, O, count * L);
        Backend::im2col_chunk(x.const_data_ptr<scalar_t>(), g, first, count,
                              columns.mutable_data_ptr<scalar_t>());
        for (int64_t group = 0; group < groups; ++group) {
          at::Tensor out_group = out_t.narrow(0, group * Og, Og);
          at::mm_out(out_group, weight_matrix.narrow(0, group * Og, Og),
                     columns.narrow(0, group * Kg, Kg));
        }
        Backend::scatter_output(out_t.const_data_ptr<scalar_t>(), bias_ptr, g, first, count,
                                output.mutable_data_ptr<scalar_t>());
      }
    });
  };
  // Contiguous memory only: the frame converts a channels-last layer's output.
  return run_conv2d_forward(input, weight, bias, stride, padding, dilation, groups,
                            /*native_channels_last=*/false, empty, forward);
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  auto empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return Backend::empty(sizes, options);
  };
  auto columns_pass = [&](const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                          Conv2dGradients& grads) {
    const int64_t O = g.out_channels;
    const int64_t K = g.column_rows();
    const int64_t L = g.out_area();
    const int64_t Og = O / groups;
    const int64_t Kg = K / groups;
    const bool acc_is_input_type = grads.want_weight && grads.weight_acc.scalar_type() == x.scalar_type();
    const at::Tensor weight_matrix = weight.contiguous().view({O, Kg});
    const int64_t chunk = images_per_chunk(g, x.element_size());
    at::Tensor column_buffer = Backend::empty({K * chunk * L}, x.options());
    record_column_buffer(column_buffer.nbytes());
    at::Tensor grad_t_buffer = Backend::empty({O * chunk * L}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_backward",
                                    [&] {
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        at::Tensor columns = matrix_view(column_buffer, K, count * L);
        at::Tensor grad_t = matrix_view(grad_t_buffer, O, count * L);
        Backend::gather_grad(dy.const_data_ptr<scalar_t>(), g, first, count,
                             grad_t.mutable_data_ptr<scalar_t>());
        if (grads.want_weight) {
          Backend::im2col_chunk(x.const_data_ptr<scalar_t>(), g, first, count,
                                columns.mutable_data_ptr<scalar_t>());
          for (int64_t group = 0; group < groups; ++group) {
            at::Tensor acc_group = grads.weight_acc.narrow(0, group * Og, Og);
            const at::Tensor grad_group = grad_t.narrow(0, group * Og, Og);
            const at::Tensor columns_group = columns.narrow(0, group * Kg, Kg);
            if (acc_is_input_type) {
              acc_group.addmm_(grad_group, columns_group.t());
            } else {
              acc_group.add_(at::mm(grad_group, columns_group.t()));
            }
          }
        }
        if (grads.want_input) {
          // The columns are no longer needed: the column gradient reuses their buffer.
          for (int64_t group = 0; group < groups; ++group) {
            at::Tensor dcolumns_group = columns.narrow(0, group * Kg, Kg);
            at::mm_out(dcolumns_group, weight_matrix.narrow(0, group * Og, Og).t(),
                       grad_t.narrow(0, group * Og, Og));
          }
          Backend::col2im_chunk(columns.const_data_ptr<scalar_t>(), g, first, count,
                                grads.input.mutable_data_ptr<scalar_t>());
        }
      }
    });
    return false;  // the bias gradient is a pass of its own
  };
  auto bias_grad = [](const at::Tensor& dy, const Conv2dGeometry& g, at::Tensor& grad_bias,
                      bool /*channels_last*/) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "conv2d_bias_grad",
                                    [&] {
      Backend::bias_grad(dy.const_data_ptr<scalar_t>(), g, grad_bias.mutable_data_ptr<scalar_t>());
    });
  };
  return run_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups,
                             output_mask, /*native_channels_last=*/false, empty, columns_pass,
                             bias_grad);
}

}  // namespace convkit
