// Conv2d geometry and the index arithmetic of im2col / col2im.
//
// Everything here is plain integer math in `CONVKIT_HOST_DEVICE` functions so that the
// CPU kernels (csrc/cpu/conv2d/) and the CUDA kernels (csrc/cuda/conv2d_kernels.cuh) share one
// definition: the CPU tests then exercise the same index math the GPU runs.
//
// Column layout. For a chunk of `chunk` images the column buffer is a row-major matrix
// [in_channels * kernel_h * kernel_w, chunk * out_h * out_w]: row r = (c * kernel_h + kh)
// * kernel_w + kw, column b * out_h * out_w + oh * out_w + ow. Keeping the images of a
// chunk side by side along the columns makes every conv GEMM one call per group per chunk.
// All sizes and offsets are int64_t: products such as channels * kernel * positions * batch
// overflow 32 bits on realistic layers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CONVKIT_HOST_DEVICE __host__ __device__
#else
#define CONVKIT_HOST_DEVICE
#endif

namespace convkit {

struct Conv2dGeometry {
  int64_t batch;
  int64_t in_channels;
  int64_t in_h, in_w;
  int64_t out_channels;
  int64_t groups;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t out_h, out_w;

  CONVKIT_HOST_DEVICE int64_t kernel_area() const { return kernel_h * kernel_w; }
  CONVKIT_HOST_DEVICE int64_t out_area() const { return out_h * out_w; }
  CONVKIT_HOST_DEVICE int64_t in_area() const { return in_h * in_w; }
  // Rows of the column matrix: one per (input channel, kernel offset).
  CONVKIT_HOST_DEVICE int64_t column_rows() const { return in_channels * kernel_h * kernel_w; }
};

// Output size along one dimension, as PyTorch defines it. Can be <= 0 for invalid
// configurations; callers check before using it.
CONVKIT_HOST_DEVICE inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride,
                                                    int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// Input coordinate read by output coordinate `out` at kernel offset `k` (may lie in the
// padding, i.e. be < 0 or >= the input size).
CONVKIT_HOST_DEVICE inline int64_t conv_input_coordinate(int64_t out, int64_t k, int64_t stride,
                                                         int64_t pad, int64_t dilation) {
  return out * stride - pad + k * dilation;
}

// The half-open range [*begin, *end) of output coordinates whose input coordinate at kernel
// offset k lies inside [0, in). Lets the CPU im2col copy the interior without a branch per
// element and fill only the padded ends with zeros.
CONVKIT_HOST_DEVICE inline void conv_valid_output_range(int64_t in, int64_t out, int64_t k,
                                                        int64_t stride, int64_t pad,
                                                        int64_t dilation, int64_t* begin,
                                                        int64_t* end) {
  const int64_t offset = k * dilation - pad;  // input coordinate of output 0
  // first o with o * stride + offset >= 0
  int64_t first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  // last o with o * stride + offset <= in - 1
  int64_t last_excl = (in - 1 - offset) < 0 ? 0 : (in - 1 - offset) / stride + 1;
  if (first > out) first = out;
  if (last_excl > out) last_excl = out;
  if (last_excl < first) last_excl = first;
  *begin = first;
  *end = last_excl;
}

// The kernel offset whose tap reads input coordinate `in` for output coordinate 0, or -1 when
// no tap does (the window skips it, or it lies beyond the kernel). A conv with a single output
// position is a product with each image's values in this order (the CPU "window" path).
CONVKIT_HOST_DEVICE inline int64_t conv_window_offset(int64_t in, int64_t kernel, int64_t pad,
                                                      int64_t dilation) {
  const int64_t shifted = in + pad;  // = k * dilation for the tap that reads `in`
  if (shifted < 0 || shifted % dilation != 0) return -1;
  const int64_t k = shifted / dilation;
  return k < kernel ? k : -1;
}

// Where column-matrix entry (row, pos) of one image comes from: its offset in the image's
// [in_channels, in_h, in_w] data, or -1 when the window reads the zero padding. Row r =
// (c * kernel_h + kh) * kernel_w + kw, position pos = oh * out_w + ow.
CONVKIT_HOST_DEVICE inline int64_t im2col_source_offset(const Conv2dGeometry& g, int64_t row,
                                                        int64_t pos) {
  const int64_t kw = row % g.kernel_w;
  const int64_t kh = (row / g.kernel_w) % g.kernel_h;
  const int64_t c = row / g.kernel_area();
  const int64_t oh = pos / g.out_w;
  const int64_t ow = pos % g.out_w;
  const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
  const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
  if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
  return (c * g.in_h + ih) * g.in_w + iw;
}

// One element of the column matrix of one image: row `row`, position `pos`. `image` points
// at that image's [in_channels, in_h, in_w] contiguous data.
template <typename scalar_t>
CONVKIT_HOST_DEVICE inline scalar_t im2col_value(const scalar_t* image, const Conv2dGeometry& g,
                                                 int64_t row, int64_t pos) {
  const int64_t offset = im2col_source_offset(g, row, pos);
  return offset < 0 ? scalar_t(0) : image[offset];
}

// The output coordinate that reads input coordinate `in` at kernel offset `k`, or -1 when
// none does (the stride skips it or it falls outside [0, out)).
CONVKIT_HOST_DEVICE inline int64_t conv_output_coordinate(int64_t in, int64_t k, int64_t stride,
                                                          int64_t pad, int64_t dilation,
                                                          int64_t out) {
  const int64_t shifted = in + pad - k * dilation;
  if (shifted < 0 || shifted % stride != 0) return -1;
  const int64_t o = shifted / stride;
  return o < out ? o : -1;
}

// col2im as a gather: the gradient of input element (c, ih, iw) is the sum of every column
// entry that im2col copied from it. Gathering (instead of scattering with atomics) makes the
// result deterministic and lets each input element be written exactly once.
// `columns` points at this image's first column; `row_stride` is the column matrix's row
// length (chunk * out_area for the chunked layout).
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t col2im_gather(const scalar_t* columns, int64_t row_stride,
                                               const Conv2dGeometry& g, int64_t c, int64_t ih,
                                               int64_t iw) {
  acc_t sum = acc_t(0);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    const int64_t oh = conv_output_coordinate(ih, kh, g.stride_h, g.pad_h, g.dilation_h, g.out_h);
    if (oh < 0) continue;
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t ow =
          conv_output_coordinate(iw, kw, g.stride_w, g.pad_w, g.dilation_w, g.out_w);
      if (ow < 0) continue;
      const int64_t row = (c * g.kernel_h + kh) * g.kernel_w + kw;
      sum += static_cast<acc_t>(columns[row * row_stride + oh * g.out_w + ow]);
    }
  }
  return sum;
}

}  // namespace convkit
