// The depthwise path: groups == in_channels == out_channels (one kH x kW filter per channel,
// MobileNet's 3x3 stride 1 and 2), any kernel size, stride, padding and dilation. The image
// family ran these as one GEMM of a single output channel per group; here each (image,
// channel) plane is convolved directly, in the vector lanes along the plane.
//
// Layout. A plane is copied (widened to acc_t) into s_h * s_w phase planes of the padded
// input: phase (qr, qc) holds padded rows qr, qr + s_h, ... and columns qc, qc + s_w, ...
// Tap (kh, kw) then reads phase ((kh d_h) % s_h, (kw d_w) % s_w) at (oh + kh d_h / s_h,
// ow + kw d_w / s_w): a stride-1 window. All planes share one row stride, so output (oh, ow)
// at flat index i = oh * row_stride + ow reads every tap at i plus a per-tap constant, and each
// pass below is one contiguous loop over the whole plane (the few flat positions with
// ow >= out_w are computed and dropped): no per-row tails on 16-, 8- or 4-wide maps.
//   forward       y[i] = b + sum_t w_t x_t[i]                               (sum_taps)
//   weight grad   dw_t += sum_i dy[i] x_t[i], per plane in acc_t, over the batch in double
//                 (dot_taps; the positions ow >= out_w are masked out, not multiplied by
//                 dY's zero borders: an inf there, an input the tap does not read, would add
//                 0 * inf = NaN where torch's sum has no such term)
//   input grad    per phase plane, dP[j] = sum over the phase's taps w_t dy_t[j] from the same
//                 bordered dY (a stride-1 correlation: transposed convolution by phases), then
//                 interleaved back into dX's rows (each dX element written once, no atomics)
// Every plane is computed by one thread in a fixed order and the weight gradient of a channel
// by the thread that owns the channel: results do not depend on the thread count.
// Floors: 9 FMAs per 16 outputs (a 3x3 kernel), so the layer is bound by memory: at
// [8,128,56,56] the forward's 58 MFLOP take ~0.3 ms on two cores, reading X and writing Y
// once (25.7 MB) 0.4-1.0 ms at 25-60 GB/s; it runs in 1.4-1.7 ms. The phase copies stay in
// L1/L2 and add no memory traffic. depthwise_blocks_fit (path.h) sends small maps, where the
// per-plane fixed cost (~200 cycles) dominates, to depthwise_blocks.cpp.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../parallel.h"
#include "kernels.h"
#include "simd.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {
namespace {

// Taps per pass of sum_taps and dot_taps: 9 (a 3x3 kernel in one pass) keeps their sums,
// weights and pointers in registers; larger kernels take several passes.
constexpr int kMaxTapsPerPass = 9;
// The flat loops run to a multiple of this many positions (a 64-byte vector of floats), so
// that none ends in a scalar remainder: every buffer they read or write has this much zeroed
// slack at its end.
constexpr int64_t kSlack = 16;

inline int64_t round_up(int64_t n) { return (n + kSlack - 1) / kSlack * kSlack; }

struct PhaseLayout {
  int64_t phases;                // s_h * s_w
  int64_t shift_h, shift_w;      // largest tap shift within a phase: (k - 1) d / s
  int64_t row_stride;            // out_w + 2 shift_w: also holds dY with its zero borders
  int64_t rows;                  // out_h + shift_h: rows of a phase plane
  int64_t span;                  // round_up((out_h - 1) row_stride + out_w): the outputs
  int64_t plane() const { return rows * row_stride; }
  int64_t input_elems() const { return phases * plane() + kSlack; }
  // dY with shift_h zero rows above and below, shift_w zero columns on each side (between
  // two rows the borders meet) and shift_w + kSlack zeros of slack after the last row.
  int64_t dy_elems() const { return (rows + shift_h) * row_stride + shift_w + kSlack; }
  int64_t dy_origin() const { return shift_h * row_stride + shift_w; }
};

PhaseLayout make_layout(const Conv2dGeometry& g) {
  PhaseLayout l;
  l.phases = g.stride_h * g.stride_w;
  l.shift_h = (g.kernel_h - 1) * g.dilation_h / g.stride_h;
  l.shift_w = (g.kernel_w - 1) * g.dilation_w / g.stride_w;
  l.row_stride = g.out_w + 2 * l.shift_w;
  l.rows = g.out_h + l.shift_h;
  l.span = round_up((g.out_h - 1) * l.row_stride + g.out_w);
  return l;
}

// Per tap t = kh * kW + kw: its phase and its shift (rows and columns) within the phase.
struct Tap {
  int64_t phase, shift_h, shift_w;
};

std::vector<Tap> make_taps(const Conv2dGeometry& g) {
  std::vector<Tap> taps;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t h = kh * g.dilation_h;
      const int64_t w = kw * g.dilation_w;
      taps.push_back({(h % g.stride_h) * g.stride_w + w % g.stride_w, h / g.stride_h,
                      w / g.stride_w});
    }
  }
  return taps;
}

// One input plane [H, W] into its phase planes, padding and slack written as zeros.
template <typename scalar_t, typename acc_t>
void split_phases(const scalar_t* x, const Conv2dGeometry& g, const PhaseLayout& l, acc_t* out) {
  for (int64_t qr = 0; qr < g.stride_h; ++qr) {
    for (int64_t qc = 0; qc < g.stride_w; ++qc) {
      acc_t* plane = out + (qr * g.stride_w + qc) * l.plane();
      // Columns b of this phase hold input columns b * s_w + qc - pad_w.
      int64_t b_begin = 0, b_end = 0;
      conv_valid_output_range(g.in_w, l.row_stride, 0, g.stride_w, g.pad_w - qc, 1, &b_begin,
                              &b_end);
      for (int64_t a = 0; a < l.rows; ++a) {
        acc_t* dst = plane + a * l.row_stride;
        const int64_t ih = a * g.stride_h + qr - g.pad_h;
        if (ih < 0 || ih >= g.in_h || b_begin >= b_end) {
          std::fill(dst, dst + l.row_stride, acc_t(0));
          continue;
        }
        std::fill(dst, dst + b_begin, acc_t(0));
        copy_with_stride(x + ih * g.in_w + b_begin * g.stride_w + qc - g.pad_w, g.stride_w,
                         b_end - b_begin, dst + b_begin);
        std::fill(dst + b_end, dst + l.row_stride, acc_t(0));
      }
    }
  }
  std::fill(out + l.phases * l.plane(), out + l.input_elems(), acc_t(0));
}

// One dY plane [oH, oW] into the bordered layout of PhaseLayout::dy_elems.
template <typename scalar_t, typename acc_t>
void border_dy(const scalar_t* dy, const Conv2dGeometry& g, const PhaseLayout& l, acc_t* out) {
  std::fill(out, out + l.dy_origin(), acc_t(0));
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    acc_t* dst = out + l.dy_origin() + oh * l.row_stride;
    copy_strided<1>(dy + oh * g.out_w, 1, g.out_w, dst);
    std::fill(dst + g.out_w, dst + l.row_stride, acc_t(0));
  }
  std::fill(out + l.dy_origin() + g.out_h * l.row_stride, out + l.dy_elems(), acc_t(0));
}

// out[i] (= init, or += when add) sum_t weights[t] * src[offsets[t] + i], i < len, N taps.
template <int N, typename acc_t>
void sum_taps_n(const acc_t* src, const int64_t* offsets, const acc_t* weights, int64_t len,
                bool add, acc_t init, acc_t* __restrict out) {
  const acc_t* p[N];
  acc_t w[N];
  for (int t = 0; t < N; ++t) {
    p[t] = src + offsets[t];
    w[t] = weights[t];
  }
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      acc_t sum = out[i];
      for (int t = 0; t < N; ++t) sum += w[t] * p[t][i];
      out[i] = sum;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      acc_t sum = init;
      for (int t = 0; t < N; ++t) sum += w[t] * p[t][i];
      out[i] = sum;
    }
  }
}

template <int N, typename acc_t>
void sum_taps_dispatch(int64_t n, const acc_t* src, const int64_t* offsets, const acc_t* weights,
                       int64_t len, bool add, acc_t init, acc_t* out) {
  if constexpr (N > 1) {
    if (n < N) return sum_taps_dispatch<N - 1>(n, src, offsets, weights, len, add, init, out);
  }
  sum_taps_n<N>(src, offsets, weights, len, add, init, out);
}

// out[i] = init + sum over n taps (any n >= 0), in passes of up to kMaxTapsPerPass.
template <typename acc_t>
void sum_taps(const acc_t* src, const int64_t* offsets, const acc_t* weights, int64_t n,
              int64_t len, acc_t init, acc_t* out) {
  if (n == 0) {
    std::fill(out, out + len, init);
    return;
  }
  for (int64_t first = 0; first < n; first += kMaxTapsPerPass) {
    const int64_t count = std::min<int64_t>(kMaxTapsPerPass, n - first);
    sum_taps_dispatch<kMaxTapsPerPass>(count, src, offsets + first, weights + first, len,
                                       first > 0, init, out);
  }
}

// sums[t] = sum over i < len with valid[i] != 0 of dy[i] * src[offsets[t] + i], N <= 9 taps in
// one pass: nine named reductions, each its own vector accumulator (one shared sum would chain
// every FMA). The mask is a select, not a product: the skipped terms may be inf * 0.
template <int N, typename acc_t>
void dot_taps_n(const acc_t* __restrict dy, const acc_t* __restrict valid, const acc_t* src,
                const int64_t* offsets, int64_t len, acc_t* sums) {
  const acc_t* p[kMaxTapsPerPass];
  for (int t = 0; t < kMaxTapsPerPass; ++t) p[t] = src + offsets[t < N ? t : 0];
  const acc_t *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3], *p4 = p[4], *p5 = p[5],
              *p6 = p[6], *p7 = p[7], *p8 = p[8];
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t d = dy[i];
    const bool in = valid[i] != acc_t(0);
    s0 += in ? d * p0[i] : acc_t(0);
    if constexpr (N > 1) s1 += in ? d * p1[i] : acc_t(0);
    if constexpr (N > 2) s2 += in ? d * p2[i] : acc_t(0);
    if constexpr (N > 3) s3 += in ? d * p3[i] : acc_t(0);
    if constexpr (N > 4) s4 += in ? d * p4[i] : acc_t(0);
    if constexpr (N > 5) s5 += in ? d * p5[i] : acc_t(0);
    if constexpr (N > 6) s6 += in ? d * p6[i] : acc_t(0);
    if constexpr (N > 7) s7 += in ? d * p7[i] : acc_t(0);
    if constexpr (N > 8) s8 += in ? d * p8[i] : acc_t(0);
  }
  const acc_t all[kMaxTapsPerPass] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
  for (int t = 0; t < N; ++t) sums[t] = all[t];
}

template <int N, typename acc_t>
void dot_taps_dispatch(int64_t n, const acc_t* dy, const acc_t* valid, const acc_t* src,
                       const int64_t* offsets, int64_t len, acc_t* sums) {
  if constexpr (N > 1) {
    if (n < N) return dot_taps_dispatch<N - 1>(n, dy, valid, src, offsets, len, sums);
  }
  dot_taps_n<N>(dy, valid, src, offsets, len, sums);
}

template <typename acc_t>
void dot_taps(const acc_t* dy, const acc_t* valid, const acc_t* src, const int64_t* offsets,
              int64_t n, int64_t len, acc_t* sums) {
  for (int64_t first = 0; first < n; first += kMaxTapsPerPass) {
    const int64_t count = std::min<int64_t>(kMaxTapsPerPass, n - first);
    dot_taps_dispatch<kMaxTapsPerPass>(count, dy, valid, src, offsets + first, len,
                                       sums + first);
  }
}

// 1 at the flat positions i < span that are outputs (i % row_stride < out_w), else 0.
template <typename acc_t>
std::vector<acc_t> output_mask(const Conv2dGeometry& g, const PhaseLayout& l) {
  std::vector<acc_t> valid(l.span, acc_t(0));
  for (int64_t i = 0; i < l.span; ++i) {
    if (i / l.row_stride < g.out_h && i % l.row_stride < g.out_w) valid[i] = acc_t(1);
  }
  return valid;
}

// dst[iw] for iw < count from the two column phases of a row (stride 2): padded column
// iw + pad_w is phase (iw + pad_w) % 2, index (iw + pad_w) / 2. An interleave of pairs, which
// the compiler vectorises (one scalar store per element had cost more than the taps).
template <typename scalar_t, typename acc_t>
void interleave_row(const acc_t* p0, const acc_t* p1, int64_t pad_w, int64_t count,
                    scalar_t* __restrict dst) {
  int64_t iw = 0;
  if (pad_w % 2 == 1 && count > 0) {
    dst[0] = static_cast<scalar_t>(p1[pad_w / 2]);
    iw = 1;
  }
  const int64_t b0 = (iw + pad_w) / 2;  // (iw + pad_w) is even from here
  const int64_t pairs = (count - iw) / 2;
  const acc_t* even = p0 + b0;
  const acc_t* odd = p1 + b0;
  scalar_t* out = dst + iw;
#pragma omp simd
  for (int64_t k = 0; k < pairs; ++k) {
    out[2 * k] = static_cast<scalar_t>(even[k]);
    out[2 * k + 1] = static_cast<scalar_t>(odd[k]);
  }
  if ((count - iw) % 2 == 1) dst[count - 1] = static_cast<scalar_t>(even[pairs]);
}

// dX plane [H, W] from the phase planes of dP (phase q at dp + q * dp_stride): input (ih, iw)
// is padded (ih + pad_h, iw + pad_w). Rows and columns beyond every phase plane (no window
// reaches them) are 0.
template <typename scalar_t, typename acc_t>
void gather_dx(const acc_t* dp, int64_t dp_stride, const Conv2dGeometry& g, const PhaseLayout& l,
               scalar_t* dx) {
  const int64_t ih_end = std::clamp<int64_t>(l.rows * g.stride_h - g.pad_h, 0, g.in_h);
  const int64_t iw_end = std::clamp<int64_t>(l.row_stride * g.stride_w - g.pad_w, 0, g.in_w);
  for (int64_t ih = 0; ih < ih_end; ++ih) {
    const int64_t r = ih + g.pad_h;
    // Column phase qc of this row at row + qc * dp_stride.
    const acc_t* row = dp + (r % g.stride_h) * g.stride_w * dp_stride + (r / g.stride_h) * l.row_stride;
    scalar_t* dst = dx + ih * g.in_w;
    if (g.stride_w == 1) {
      copy_strided<1>(row + g.pad_w, 1, iw_end, dst);
    } else if (g.stride_w == 2) {
      interleave_row(row, row + dp_stride, g.pad_w, iw_end, dst);
    } else {
      for (int64_t iw = 0; iw < iw_end; ++iw) {
        const int64_t c = iw + g.pad_w;
        dst[iw] = static_cast<scalar_t>(row[(c % g.stride_w) * dp_stride + c / g.stride_w]);
      }
    }
    std::fill(dst + iw_end, dst + g.in_w, scalar_t(0));
  }
  std::fill(dx + ih_end * g.in_w, dx + g.in_area(), scalar_t(0));
}

}  // namespace

template <typename scalar_t>
void depthwise_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                       const at::Tensor& bias_acc, const Conv2dGeometry& g, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const PhaseLayout l = make_layout(g);
  const std::vector<Tap> taps = make_taps(g);
  const int64_t T = static_cast<int64_t>(taps.size());
  std::vector<int64_t> offsets(T);
  for (int64_t t = 0; t < T; ++t) {
    offsets[t] = taps[t].phase * l.plane() + taps[t].shift_h * l.row_stride + taps[t].shift_w;
  }
  const int64_t C = g.in_channels;
  const int64_t team = team_size();
  const int64_t per_thread = l.input_elems() + l.span;
  const at::Tensor buffers = scratch<acc_t>(x, team * per_thread);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const acc_t* b_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  parallel_for_slots(0, g.batch * C, grain_for(g.in_area() + g.out_area() * T), team,
                     [&](int64_t begin, int64_t end, int64_t slot) {
    acc_t* phases = buffer_base + slot * per_thread;
    acc_t* sums = phases + l.input_elems();
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      split_phases(x_ptr + plane * g.in_area(), g, l, phases);
      sum_taps(phases, offsets.data(), w_ptr + c * T, T, l.span,
               b_ptr != nullptr ? b_ptr[c] : acc_t(0), sums);
      scalar_t* y = y_ptr + plane * g.out_area();
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        copy_strided<1>(sums + oh * l.row_stride, 1, g.out_w, y + oh * g.out_w);
      }
    }
  });
}

template <typename scalar_t>
void depthwise_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                        const Conv2dGeometry& g, bool need_input_grad, bool need_weight_grad,
                        at::Tensor& grad_input, at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const PhaseLayout l = make_layout(g);
  const std::vector<Tap> taps = make_taps(g);
  const int64_t T = static_cast<int64_t>(taps.size());
  // The weight gradient reads tap t of the input's phases at i + x_offsets[t] against dY at
  // dy_origin + i. The input gradient takes the taps phase by phase (by_phase, phase_begin):
  // the phase plane's j reads dY at j + dy_offsets[k].
  std::vector<int64_t> x_offsets(T), by_phase, phase_begin(l.phases + 1, 0), dy_offsets;
  for (int64_t t = 0; t < T; ++t) {
    x_offsets[t] = taps[t].phase * l.plane() + taps[t].shift_h * l.row_stride + taps[t].shift_w;
  }
  for (int64_t q = 0; q < l.phases; ++q) {
    phase_begin[q] = static_cast<int64_t>(by_phase.size());
    for (int64_t t = 0; t < T; ++t) {
      if (taps[t].phase != q) continue;
      by_phase.push_back(t);
      dy_offsets.push_back((l.shift_h - taps[t].shift_h) * l.row_stride + l.shift_w -
                           taps[t].shift_w);
    }
  }
  phase_begin[l.phases] = T;

  const int64_t C = g.in_channels;
  const int64_t team = team_size();
  const int64_t dp_stride = round_up(l.plane());  // dP's phase planes, each a flat loop
  const int64_t per_thread = l.dy_elems() + (need_weight_grad ? l.input_elems() : 0) +
                             (need_input_grad ? l.phases * dp_stride : 0) + 2 * T;
  const at::Tensor buffers = scratch<acc_t>(x, team * per_thread);
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  scalar_t* dx_ptr = need_input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* dw_ptr = need_weight_grad ? grad_weight_acc.mutable_data_ptr<acc_t>() : nullptr;
  // By channel: a channel's weight gradient is summed over the batch by the thread that owns
  // it, in image order.
  const int64_t work = g.batch * (g.in_area() + g.out_area() * T);
  const std::vector<acc_t> valid =
      need_weight_grad ? output_mask<acc_t>(g, l) : std::vector<acc_t>();
  parallel_for_slots(0, C, grain_for(work), team, [&](int64_t begin, int64_t end, int64_t slot) {
    acc_t* bordered = buffer_base + slot * per_thread;
    acc_t* phases = bordered + l.dy_elems();
    acc_t* dp = phases + (need_weight_grad ? l.input_elems() : 0);
    acc_t* weights = dp + (need_input_grad ? l.phases * dp_stride : 0);  // by_phase order
    acc_t* sums = weights + T;
    std::vector<double> total(T);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < T; ++k) weights[k] = w_ptr[c * T + by_phase[k]];
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t n = 0; n < g.batch; ++n) {
        const int64_t plane = n * C + c;
        border_dy(dy_ptr + plane * g.out_area(), g, l, bordered);
        if (need_weight_grad) {
          split_phases(x_ptr + plane * g.in_area(), g, l, phases);
          dot_taps(bordered + l.dy_origin(), valid.data(), phases, x_offsets.data(), T, l.span,
                   sums);
          for (int64_t t = 0; t < T; ++t) total[t] += static_cast<double>(sums[t]);
        }
        if (need_input_grad) {
          scalar_t* dx = dx_ptr + plane * g.in_area();
          for (int64_t q = 0; q < l.phases; ++q) {
            const int64_t first = phase_begin[q];
            sum_taps(bordered, dy_offsets.data() + first, weights + first,
                     phase_begin[q + 1] - first, dp_stride, acc_t(0), dp + q * dp_stride);
          }
          gather_dx(dp, dp_stride, g, l, dx);
        }
      }
      if (need_weight_grad) {
        for (int64_t t = 0; t < T; ++t) dw_ptr[c * T + t] = static_cast<acc_t>(total[t]);
      }
    }
  });
}

#define CONVKIT_INSTANTIATE_DEPTHWISE(scalar_t)                                              \
  template void depthwise_forward<scalar_t>(const at::Tensor&, const at::Tensor&,            \
                                            const at::Tensor&, const Conv2dGeometry&,        \
                                            at::Tensor&);                                    \
  template void depthwise_backward<scalar_t>(const at::Tensor&, const at::Tensor&,           \
                                             const at::Tensor&, const Conv2dGeometry&, bool, \
                                             bool, at::Tensor&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_DEPTHWISE)
#undef CONVKIT_INSTANTIATE_DEPTHWISE

}  // namespace convkit::cpu_conv2d
