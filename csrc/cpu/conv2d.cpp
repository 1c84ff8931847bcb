// conv2d on the CPU by im2col + GEMM.
//
// Algorithm, per chunk of `chunk` images (see csrc/conv2d.h for the column layout):
//   forward   columns[K, chunk*L] = im2col(input chunk)         parallel over image x channel
//             out_t[O, chunk*L]   = W_g[Og, Kg] @ columns_g      one GEMM per group
//             output[b, o, :]     = out_t[o, b*L : (b+1)*L] + bias[o]   (bias fused in the copy)
//   backward  grad_t[O, chunk*L]  = grad_output chunk, channels first   (shared by both GEMMs)
//             grad_W_g           += grad_t_g @ columns_g^T             (columns: im2col again)
//             dcolumns_g          = W_g^T @ grad_t_g, then col2im by gather (deterministic)
//             grad_bias[o]        = sum of grad_output over images and positions (double)
// where K = C * kH * kW, L = oH * oW, Kg = K / groups, Og = O / groups.
// Memory passes: im2col reads the input once and writes the columns once; the GEMMs stream
// the columns; the output copy touches the output twice. The column buffer is bounded by
// CONVKIT_COLUMN_BUDGET_MB (default 64 MiB): the chunk shrinks to fit, down to one image.
// Version 1 (this file): one GEMM per group per chunk through at::mm (MKL/oneDNN BLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <tuple>

#include "../checks.h"
#include "../column_buffer.h"
#include "../conv2d.h"

namespace convkit {
namespace {

// Aim for parallel tasks of at least this many elements, so thread start-up stays small.
constexpr int64_t kParallelGrainElements = int64_t(1) << 15;

int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(elements_per_task, 1));
}

// Writes the kH * kW rows of channel `c` of one image into `columns` (already offset to the
// image's first column); `row_stride` is the full row length of the column matrix.
template <typename scalar_t>
void im2col_channel(const scalar_t* image, const Conv2dGeometry& g, int64_t c, scalar_t* columns,
                    int64_t row_stride) {
  const scalar_t* plane = image + c * g.in_area();
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t row = (c * g.kernel_h + kh) * g.kernel_w + kw;
      scalar_t* dst_row = columns + row * row_stride;
      int64_t ow_begin = 0, ow_end = 0;
      conv_valid_output_range(g.in_w, g.out_w, kw, g.stride_w, g.pad_w, g.dilation_w, &ow_begin,
                              &ow_end);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        scalar_t* dst = dst_row + oh * g.out_w;
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        if (ih < 0 || ih >= g.in_h) {
          std::fill(dst, dst + g.out_w, scalar_t(0));
          continue;
        }
        const scalar_t* src_row = plane + ih * g.in_w;
        std::fill(dst, dst + ow_begin, scalar_t(0));
        const int64_t iw0 = conv_input_coordinate(ow_begin, kw, g.stride_w, g.pad_w, g.dilation_w);
        if (g.stride_w == 1) {
          std::copy(src_row + iw0, src_row + iw0 + (ow_end - ow_begin), dst + ow_begin);
        } else {
          for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
            dst[ow] = src_row[iw0 + (ow - ow_begin) * g.stride_w];
          }
        }
        std::fill(dst + ow_end, dst + g.out_w, scalar_t(0));
      }
    }
  }
}

// im2col of images [first, first + count) of a contiguous input into a contiguous
// [K, count * L] column matrix.
template <typename scalar_t>
void im2col_chunk(const scalar_t* input, const Conv2dGeometry& g, int64_t first, int64_t count,
                  scalar_t* columns) {
  const int64_t C = g.in_channels;
  const int64_t L = g.out_area();
  const int64_t row_stride = count * L;
  at::parallel_for(0, count * C, grain_for(g.kernel_area() * L), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C;
      const int64_t c = task % C;
      im2col_channel(input + (first + b) * C * g.in_area(), g, c, columns + b * L, row_stride);
    }
  });
}

// grad_input of images [first, first + count) from a [K, count * L] column-gradient matrix,
// each input element gathered once (no accumulation races, same result on any thread count).
template <typename scalar_t>
void col2im_chunk(const scalar_t* columns, const Conv2dGeometry& g, int64_t first, int64_t count,
                  scalar_t* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.in_channels;
  const int64_t L = g.out_area();
  const int64_t row_stride = count * L;
  at::parallel_for(0, count * C, grain_for(g.in_area() * g.kernel_area()),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C;
      const int64_t c = task % C;
      scalar_t* dst = grad_input + ((first + b) * C + c) * g.in_area();
      const scalar_t* image_columns = columns + b * L;
      for (int64_t ih = 0; ih < g.in_h; ++ih) {
        for (int64_t iw = 0; iw < g.in_w; ++iw) {
          dst[ih * g.in_w + iw] = static_cast<scalar_t>(
              col2im_gather<scalar_t, acc_t>(image_columns, row_stride, g, c, ih, iw));
        }
      }
    }
  });
}

at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "convkit::conv2d_forward";
  // The ATen calls below (mm, addmm) are implementation details: keep autograd out of them
  // even when the caller's tensors require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(op, input, bias, g.out_channels);

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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_forward_cpu",
                                  [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      at::Tensor columns = matrix_view(column_buffer, K, count * L);
      at::Tensor out_t = matrix_view(out_t_buffer, O, count * L);
      im2col_chunk(x_ptr, g, first, count, columns.mutable_data_ptr<scalar_t>());
      for (int64_t group = 0; group < groups; ++group) {
        at::Tensor out_group = out_t.narrow(0, group * Og, Og);
        at::mm_out(out_group, weight_matrix.narrow(0, group * Og, Og),
                   columns.narrow(0, group * Kg, Kg));
      }
      // out_t is [O, count * L]; the output wants [count, O, L]: copy and add the bias.
      const scalar_t* out_t_ptr = out_t.const_data_ptr<scalar_t>();
      at::parallel_for(0, count * O, grain_for(L), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / O;
          const int64_t o = task % O;
          const scalar_t* src = out_t_ptr + o * count * L + b * L;
          scalar_t* dst = out_ptr + ((first + b) * O + o) * L;
          if (bias_ptr != nullptr) {
            const scalar_t bias_value = bias_ptr[o];
            for (int64_t l = 0; l < L; ++l) dst[l] = src[l] + bias_value;
          } else {
            std::copy(src, src + L, dst);
          }
        }
      });
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "convkit::conv2d_backward";
  // The ATen calls below (mm, addmm) are implementation details: keep autograd out of them
  // even when the caller's tensors require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(op, input, grad_output, g);

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / groups;
  const int64_t Kg = K / groups;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());

  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  // grad_weight accumulates over chunks: keep it in the accumulation type (float for
  // bfloat16/float16) and round once at the end.
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
                                    "conv2d_backward_cpu", [&] {
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        at::Tensor columns = matrix_view(column_buffer, K, count * L);
        at::Tensor grad_t = matrix_view(grad_t_buffer, O, count * L);
        scalar_t* grad_t_ptr = grad_t.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, count * O, grain_for(L), [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / O;
            const int64_t o = task % O;
            const scalar_t* src = dy_ptr + ((first + b) * O + o) * L;
            std::copy(src, src + L, grad_t_ptr + o * count * L + b * L);
          }
        });
        if (output_mask[1]) {
          im2col_chunk(x_ptr, g, first, count, columns.mutable_data_ptr<scalar_t>());
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
          // The columns are no longer needed: the column gradient reuses their buffer.
          for (int64_t group = 0; group < groups; ++group) {
            at::Tensor dcolumns_group = columns.narrow(0, group * Kg, Kg);
            at::mm_out(dcolumns_group, weight_matrix.narrow(0, group * Og, Og).t(),
                       grad_t.narrow(0, group * Og, Og));
          }
          col2im_chunk(columns.const_data_ptr<scalar_t>(), g, first, count,
                       grad_input.mutable_data_ptr<scalar_t>());
        }
      }
    });
  } else if (output_mask[0]) {
    grad_input.zero_();
  }

  if (output_mask[2]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "conv2d_bias_grad_cpu", [&] {
      const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
      scalar_t* grad_bias_ptr = grad_bias.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, O, grain_for(g.batch * L), [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          double sum = 0.0;
          for (int64_t b = 0; b < g.batch; ++b) {
            const scalar_t* src = dy_ptr + (b * O + o) * L;
            for (int64_t l = 0; l < L; ++l) sum += static_cast<double>(src[l]);
          }
          grad_bias_ptr[o] = static_cast<scalar_t>(sum);
        }
      });
    });
  }

  at::Tensor grad_weight = output_mask[1]
                               ? grad_weight_acc.to(x.scalar_type()).view(weight.sizes())
                               : at::empty({0}, x.options());
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

// F.unfold's semantics, one element at a time through the shared helper im2col_value: the
// reference the row-wise im2col above (and the CUDA kernel) can be checked against.
at::Tensor im2col_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g =
      make_im2col_geometry("convkit::im2col", input, kernel_size, dilation, padding, stride);
  const at::Tensor x = input.contiguous();
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  at::Tensor columns = at::empty({g.batch, K, L}, x.options());
  if (columns.numel() == 0) return columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "im2col_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* col_ptr = columns.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * K, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K;
        const int64_t row = task % K;
        const scalar_t* image = x_ptr + b * g.in_channels * g.in_area();
        scalar_t* dst = col_ptr + task * L;
        for (int64_t pos = 0; pos < L; ++pos) dst[pos] = im2col_value(image, g, row, pos);
      }
    });
  });
  return columns;
}

// F.fold's semantics: every input element gathers the column entries copied from it.
at::Tensor col2im_cpu(const at::Tensor& columns, at::IntArrayRef output_size,
                      at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                      at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g = make_col2im_geometry("convkit::col2im", columns, output_size,
                                                kernel_size, dilation, padding, stride);
  const at::Tensor cols = columns.contiguous();
  at::Tensor output = at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, cols.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_cpu", [&] {
    const scalar_t* col_ptr = cols.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
    const int64_t K = g.column_rows();
    const int64_t L = g.out_area();
    // One image at a time: the gather of col2im_chunk with a chunk of one.
    for (int64_t b = 0; b < g.batch; ++b) {
      col2im_chunk(col_ptr + b * K * L, g, b, 1, out_ptr);
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_cpu);
  m.impl("conv2d_backward", &conv2d_backward_cpu);
  m.impl("im2col", &im2col_cpu);
  m.impl("col2im", &col2im_cpu);
}

}  // namespace convkit
