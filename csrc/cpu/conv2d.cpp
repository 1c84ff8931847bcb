// conv2d on the CPU: the CPU backend of csrc/conv2d_driver.h (which holds the algorithm:
// im2col + one GEMM per group per chunk of images) and F.unfold/F.fold-like ops.
//
// im2col_channel writes the rows of one (image, channel): each row is a run of the input row
// (copied with std::copy when stride is 1) with zeros where the window leaves the padded
// input; col2im gathers each input element's gradient (col2im_gather of csrc/conv2d.h), so
// every element is written once and the result does not depend on the thread count.
// Parallelism: at::parallel_for over (image, channel) for im2col/col2im and over
// (image, out channel) for the copies; the GEMMs are BLAS-threaded.
// Memory passes per chunk: im2col reads the input once and writes the columns once; the
// GEMMs stream the columns; the output copy reads and writes the output once.
// Version 1 (this file): one GEMM per group per chunk through at::mm (MKL/oneDNN BLAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../conv2d.h"
#include "../conv2d_driver.h"

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
void im2col_chunk_cpu(const scalar_t* input, const Conv2dGeometry& g, int64_t first,
                      int64_t count, scalar_t* columns) {
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
void col2im_chunk_cpu(const scalar_t* columns, const Conv2dGeometry& g, int64_t first,
                      int64_t count, scalar_t* grad_input) {
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

// The CPU side of csrc/conv2d_driver.h: loops parallelised with at::parallel_for.
struct CpuConvBackend {
  template <typename scalar_t>
  static void im2col_chunk(const scalar_t* input, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* columns) {
    im2col_chunk_cpu(input, g, first, count, columns);
  }

  template <typename scalar_t>
  static void col2im_chunk(const scalar_t* columns, const Conv2dGeometry& g, int64_t first,
                           int64_t count, scalar_t* grad_input) {
    col2im_chunk_cpu(columns, g, first, count, grad_input);
  }

  // out_t is [O, count * L]; the output wants [count, O, L]: copy and add the bias.
  template <typename scalar_t>
  static void scatter_output(const scalar_t* out_t, const scalar_t* bias, const Conv2dGeometry& g,
                             int64_t first, int64_t count, scalar_t* output) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    at::parallel_for(0, count * O, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / O;
        const int64_t o = task % O;
        const scalar_t* src = out_t + o * count * L + b * L;
        scalar_t* dst = output + ((first + b) * O + o) * L;
        if (bias != nullptr) {
          const scalar_t bias_value = bias[o];
          for (int64_t l = 0; l < L; ++l) dst[l] = src[l] + bias_value;
        } else {
          std::copy(src, src + L, dst);
        }
      }
    });
  }

  template <typename scalar_t>
  static void gather_grad(const scalar_t* grad_output, const Conv2dGeometry& g, int64_t first,
                          int64_t count, scalar_t* grad_t) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    at::parallel_for(0, count * O, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / O;
        const int64_t o = task % O;
        const scalar_t* src = grad_output + ((first + b) * O + o) * L;
        std::copy(src, src + L, grad_t + o * count * L + b * L);
      }
    });
  }

  // Sums in double: a channel can hold millions of values.
  template <typename scalar_t>
  static void bias_grad(const scalar_t* grad_output, const Conv2dGeometry& g, scalar_t* grad_bias) {
    const int64_t O = g.out_channels;
    const int64_t L = g.out_area();
    at::parallel_for(0, O, grain_for(g.batch * L), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        double sum = 0.0;
        for (int64_t b = 0; b < g.batch; ++b) {
          const scalar_t* src = grad_output + (b * O + o) * L;
          for (int64_t l = 0; l < L; ++l) sum += static_cast<double>(src[l]);
        }
        grad_bias[o] = static_cast<scalar_t>(sum);
      }
    });
  }
};

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
      col2im_chunk_cpu(col_ptr + b * K * L, g, b, 1, out_ptr);
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward_impl<CpuConvBackend>);
  m.impl("conv2d_backward", &conv2d_backward_impl<CpuConvBackend>);
  m.impl("im2col", &im2col_cpu);
  m.impl("col2im", &col2im_cpu);
}

}  // namespace convkit
