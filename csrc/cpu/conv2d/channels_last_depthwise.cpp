// Depthwise conv2d (groups == in_channels == out_channels) on channels-last (NHWC) memory:
// the channels of a pixel are contiguous, so every loop runs along them in the vector lanes,
// one output position (or input pixel) at a time, each tap a multiply-add of two runs of C
// values. Any kernel, stride, padding and dilation.
//   forward      y[p, c] = b[c] + sum over the taps inside the image of w[t, c] x[pixel(p, t), c]
//   input grad   gathered: dx[q, c] = sum over the taps that reach pixel q from inside the
//                output map of w[t, c] dy[output(q, t), c] (each dX row written once)
//   weight grad  dw[t, c] = sum over positions of dy[p, c] x[pixel(p, t), c], per block of
//                output rows in acc_t, the blocks in double in order
// w is [kH*kW, C] (acc_t). Taps in the padding are skipped: they add nothing but zeros (an
// infinite weight there gives inf where the padded NCHW kernels give NaN).
// Tasks are output rows or input rows, in a fixed order each: results do not depend on the
// thread count. Floors: 9 FMAs per output at 3x3; the layer is bound by reading X and writing
// Y once, as the NCHW depthwise kernels (depthwise.cpp).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../parallel.h"
#include "kernels.h"

namespace convkit::cpu_conv2d {
namespace {

// Output rows per block of the weight gradient's partial sums.
constexpr int64_t kRowsPerBlock = 4;

}  // namespace

template <typename scalar_t>
void channels_last_depthwise_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                                     const at::Tensor& bias_acc, const Conv2dGeometry& g,
                                     at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.in_channels;
  const int64_t KA = g.kernel_area();
  const at::Tensor w = weight_acc.view({C, KA}).t().contiguous();  // [taps, C]
  const acc_t* w_ptr = w.const_data_ptr<acc_t>();
  const acc_t* bias = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  const int64_t rows = g.batch * g.out_h;
  parallel_for(0, rows, grain_for(g.out_w * C * KA), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(static_cast<size_t>(C));
    acc_t* __restrict acc = sums.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h;
      const int64_t oh = row % g.out_h;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        if (bias != nullptr) {
          std::copy_n(bias, C, acc);
        } else {
          std::fill_n(acc, C, acc_t(0));
        }
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
          if (ih < 0 || ih >= g.in_h) continue;
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
            if (iw < 0 || iw >= g.in_w) continue;
            const scalar_t* __restrict src = x_ptr + ((n * g.in_h + ih) * g.in_w + iw) * C;
            const acc_t* __restrict wt = w_ptr + (kh * g.kernel_w + kw) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * static_cast<acc_t>(src[c]);
          }
        }
        scalar_t* __restrict dst = y_ptr + ((n * g.out_h + oh) * g.out_w + ow) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t>
void channels_last_depthwise_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& weight_acc, const Conv2dGeometry& g,
                                      bool need_input_grad, bool need_weight_grad,
                                      at::Tensor& grad_input, at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.in_channels;
  const int64_t KA = g.kernel_area();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  if (need_input_grad) {
    const at::Tensor w = weight_acc.view({C, KA}).t().contiguous();  // [taps, C]
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    scalar_t* dx_ptr = grad_input.mutable_data_ptr<scalar_t>();
    const int64_t rows = g.batch * g.in_h;
    parallel_for(0, rows, grain_for(g.in_w * C * KA), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(static_cast<size_t>(C));
      acc_t* __restrict acc = sums.data();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.in_h;
        const int64_t ih = row % g.in_h;
        for (int64_t iw = 0; iw < g.in_w; ++iw) {
          std::fill_n(acc, C, acc_t(0));
          for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
            const int64_t oh_scaled = ih + g.pad_h - kh * g.dilation_h;
            if (oh_scaled < 0 || oh_scaled % g.stride_h != 0) continue;
            const int64_t oh = oh_scaled / g.stride_h;
            if (oh >= g.out_h) continue;
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const int64_t ow_scaled = iw + g.pad_w - kw * g.dilation_w;
              if (ow_scaled < 0 || ow_scaled % g.stride_w != 0) continue;
              const int64_t ow = ow_scaled / g.stride_w;
              if (ow >= g.out_w) continue;
              const scalar_t* __restrict src = dy_ptr + ((n * g.out_h + oh) * g.out_w + ow) * C;
              const acc_t* __restrict wt = w_ptr + (kh * g.kernel_w + kw) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * static_cast<acc_t>(src[c]);
            }
          }
          scalar_t* __restrict dst = dx_ptr + ((n * g.in_h + ih) * g.in_w + iw) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  }
  if (!need_weight_grad) return;
  const int64_t rows = g.batch * g.out_h;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> partial(static_cast<size_t>(blocks * KA * C), acc_t(0));
  parallel_for(0, blocks, grain_for(kRowsPerBlock * g.out_w * C * KA),
               [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      acc_t* sums = partial.data() + block * KA * C;
      const int64_t last = std::min(rows, (block + 1) * kRowsPerBlock);
      for (int64_t row = block * kRowsPerBlock; row < last; ++row) {
        const int64_t n = row / g.out_h;
        const int64_t oh = row % g.out_h;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const scalar_t* __restrict grad = dy_ptr + ((n * g.out_h + oh) * g.out_w + ow) * C;
          for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
            const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
            if (ih < 0 || ih >= g.in_h) continue;
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const int64_t iw =
                  conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
              if (iw < 0 || iw >= g.in_w) continue;
              const scalar_t* __restrict src = x_ptr + ((n * g.in_h + ih) * g.in_w + iw) * C;
              acc_t* __restrict dst = sums + (kh * g.kernel_w + kw) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                dst[c] += static_cast<acc_t>(grad[c]) * static_cast<acc_t>(src[c]);
              }
            }
          }
        }
      }
    }
  });
  std::vector<double> total(static_cast<size_t>(KA * C), 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    const acc_t* sums = partial.data() + block * KA * C;
    for (int64_t i = 0; i < KA * C; ++i) total[i] += static_cast<double>(sums[i]);
  }
  acc_t* dw = grad_weight_acc.mutable_data_ptr<acc_t>();  // [C, taps]
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < KA; ++t) dw[c * KA + t] += static_cast<acc_t>(total[t * C + c]);
  }
}

#define CONVKIT_INSTANTIATE_CHANNELS_LAST_DEPTHWISE(T)                                        \
  template void channels_last_depthwise_forward<T>(const at::Tensor&, const at::Tensor&,      \
                                                   const at::Tensor&, const Conv2dGeometry&,  \
                                                   at::Tensor&);                              \
  template void channels_last_depthwise_backward<T>(                                          \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const Conv2dGeometry&, bool,   \
      bool, at::Tensor&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_CHANNELS_LAST_DEPTHWISE)
#undef CONVKIT_INSTANTIATE_CHANNELS_LAST_DEPTHWISE

}  // namespace convkit::cpu_conv2d
