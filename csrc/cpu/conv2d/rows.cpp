// The rows path: direct convolution along output rows, for first layers (few input and
// output channels, rows >= 8 wide: path.h). The implicit GEMM puts output channels in the
// vector lanes; with 8 of them each gathered input value feeds one 8-lane FMA and the loads
// dominate (the chapter's first layer: 1 -> 8 channels, 5x5, stride 2). Here the lanes are
// kRowLanes consecutive output positions of one row: the image is copied once, zero-padded
// and split by the column stride into phase planes, so that every tap's inputs for a run of
// positions are contiguous; one vector load then feeds an FMA per output channel. The weight
// gradient reuses the layout: per tap a dot product of its input runs with dY's rows.
// Floor: one 16-lane FMA per cycle per core with 14 of 16 lanes used on the chapter's 28-wide
// rows; both kernels run there (docs/performance-notes.md).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "path.h"
#include "relayout.h"
#include "simd.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {
namespace {

constexpr int kRowLanes = 16;

struct RowLayout {
  int64_t padded_h;     // H + 2 * pad_h
  int64_t phase_width;  // columns of a phase plane, with slack for the last vector
  int64_t phases;       // stride_w
  int64_t row_vectors;  // ceil(out_w / kRowLanes)
  int64_t plane_elems() const { return padded_h * phase_width; }
};

RowLayout make_row_layout(const Conv2dGeometry& g) {
  RowLayout r;
  r.phases = g.stride_w;
  r.padded_h = g.in_h + 2 * g.pad_h;
  r.row_vectors = (g.out_w + kRowLanes - 1) / kRowLanes;
  const int64_t padded_w = g.in_w + 2 * g.pad_w;
  const int64_t max_shift = ((g.kernel_w - 1) * g.dilation_w) / g.stride_w;
  r.phase_width = std::max((padded_w + r.phases - 1) / r.phases,
                           r.row_vectors * kRowLanes + max_shift);
  return r;
}

// phases[(c * stride_w + ph) * plane + ih * width + j] = padded input (c, ih, j * stride_w + ph)
// for the entries that hold input values. The rest (padding, slack) is the same for every
// image: split_phases never writes it, so a buffer zeroed once per call keeps it zero.
template <typename scalar_t, typename acc_t>
void split_phases(const scalar_t* image, const Conv2dGeometry& g, const RowLayout& r,
                  acc_t* phases) {
  const int64_t plane = r.plane_elems();
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t ph = 0; ph < r.phases; ++ph) {
      // Phase ph holds padded columns ph, ph + s, ...: input columns j * s + ph - pad_w.
      int64_t j_begin = 0, j_end = 0;
      conv_valid_output_range(g.in_w, r.phase_width, 0, r.phases, g.pad_w - ph, 1, &j_begin,
                              &j_end);
      const int64_t iw0 = j_begin * r.phases + ph - g.pad_w;
      for (int64_t ih = 0; ih < g.in_h; ++ih) {
        const scalar_t* src = image + (c * g.in_h + ih) * g.in_w + iw0;
        acc_t* dst = phases + (c * r.phases + ph) * plane + (ih + g.pad_h) * r.phase_width + j_begin;
        copy_with_stride(src, r.phases, j_end - j_begin, dst);
      }
    }
  }
}

// Where tap k = (c, kh, kw) reads, relative to the start of output row oh's input row
// (oh * stride_h * phase_width) plus the run's first column: built once per call, so that the
// inner loops hold no division by the stride.
std::vector<int64_t> make_tap_offsets(const Conv2dGeometry& g, const RowLayout& r) {
  std::vector<int64_t> offsets(g.column_rows());
  int64_t k = 0;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw, ++k) {
        const int64_t shift = kw * g.dilation_w;
        offsets[k] = (c * r.phases + shift % r.phases) * r.plane_elems() +
                     kh * g.dilation_h * r.phase_width + shift / r.phases;
      }
    }
  }
  return offsets;
}

// dst[lane] = value[lane] + bias for lane < lanes (an output row's last vector is partial:
// 14 of 16 lanes in the chapter's first layer): one masked store on AVX-512, where a scalar
// loop would cost a third of the forward; load_lanes below is its inverse.
template <typename scalar_t, typename acc_t>
inline void store_lanes(scalar_t* dst, const acc_t (&value)[kRowLanes], acc_t bias, int64_t lanes) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(value), _mm512_set1_ps(bias));
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << lanes) - 1u), sum);
    return;
  }
#endif
  for (int64_t lane = 0; lane < lanes; ++lane) dst[lane] = static_cast<scalar_t>(value[lane] + bias);
}

// value[lane] = src[lane] for lane < lanes and 0 beyond, reading nothing past lanes.
template <typename scalar_t, typename acc_t>
inline void load_lanes(acc_t (&value)[kRowLanes], const scalar_t* src, int64_t lanes) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    _mm512_storeu_ps(value, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u), src));
    return;
  }
#endif
  for (int64_t lane = 0; lane < kRowLanes; ++lane) {
    value[lane] = lane < lanes ? static_cast<acc_t>(src[lane]) : acc_t(0);
  }
}

// out[o, oh, ow] = bias[o] + sum over taps of weight[o, tap] * input run, for one image.
template <typename scalar_t, typename acc_t, int Channels>
void rows_forward_image(const acc_t* __restrict phases, const Conv2dGeometry& g,
                        const RowLayout& r, const int64_t* __restrict tap_offsets,
                        const acc_t* __restrict weight_t, const acc_t* bias,
                        scalar_t* __restrict out) {
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const acc_t* row = phases + oh * g.stride_h * r.phase_width;
    for (int64_t v = 0; v < r.row_vectors; ++v) {
      const int64_t ow0 = v * kRowLanes;
      acc_t acc[Channels][kRowLanes] = {};
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* __restrict run = row + tap_offsets[k] + ow0;
        const acc_t* __restrict w = weight_t + k * Channels;
        for (int o = 0; o < Channels; ++o) {
#pragma omp simd
          for (int lane = 0; lane < kRowLanes; ++lane) acc[o][lane] += w[o] * run[lane];
        }
      }
      const int64_t lanes = std::min<int64_t>(kRowLanes, g.out_w - ow0);
      for (int64_t o = 0; o < O; ++o) {
        const acc_t b = bias != nullptr ? bias[o] : acc_t(0);
        store_lanes(out + o * L + oh * g.out_w + ow0, acc[o], b, lanes);
      }
    }
  }
}

// weight_grad_t[tap, o] += sum over positions of dy[o, position] * input(tap, position);
// dy_rows holds dY as [O, out_h, row_vectors * kRowLanes] with zeros past out_w. Taps are
// taken kRowAccumulators / Channels at a time, so each dY vector loaded feeds that many FMAs.
constexpr int kRowAccumulators = 16;

template <typename acc_t, int Channels>
void rows_weight_grad_image(const acc_t* __restrict phases, const Conv2dGeometry& g,
                            const RowLayout& r, const int64_t* __restrict tap_offsets,
                            const acc_t* __restrict dy_rows,
                            acc_t* __restrict weight_grad_t) {
  constexpr int Taps = kRowAccumulators / Channels;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t K = g.column_rows();
  for (int64_t k0 = 0; k0 < K; k0 += Taps) {
    const int taps = static_cast<int>(std::min<int64_t>(Taps, K - k0));
    int64_t tap_offset[Taps];
    // A short last block repeats its last tap (and drops the sums).
    for (int t = 0; t < Taps; ++t) tap_offset[t] = tap_offsets[k0 + std::min(t, taps - 1)];
    acc_t acc[Taps][Channels][kRowLanes] = {};
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      const acc_t* row = phases + oh * g.stride_h * r.phase_width;
      for (int64_t v = 0; v < r.row_vectors; ++v) {
        const acc_t* base = row + v * kRowLanes;
        for (int o = 0; o < Channels; ++o) {
          const acc_t* __restrict d = dy_rows + (o * g.out_h + oh) * row_len + v * kRowLanes;
          for (int t = 0; t < Taps; ++t) {
            const acc_t* __restrict run = base + tap_offset[t];
#pragma omp simd
            for (int lane = 0; lane < kRowLanes; ++lane) acc[t][o][lane] += d[lane] * run[lane];
          }
        }
      }
    }
    for (int t = 0; t < taps; ++t) {
      for (int o = 0; o < Channels; ++o) {
        acc_t sum = acc_t(0);
        for (int lane = 0; lane < kRowLanes; ++lane) sum += acc[t][o][lane];
        weight_grad_t[(k0 + t) * Channels + o] += sum;
      }
    }
  }
}

#if defined(__AVX512F__)
// The same sums for float, 8 channels x 3 taps per pass (24 zmm accumulators). GCC folds the
// dY loads of the generic loop into its FMAs (18 zmm loads per 16 FMAs, where a core loads
// one or two a cycle); here a step loads 3 input runs and 8 dY vectors, once each, for 24
// FMAs. Channel blocks of 16 take two passes.
void rows_weight_grad_image_avx512(const float* __restrict phases, const Conv2dGeometry& g,
                                   const RowLayout& r, const int64_t* __restrict tap_offsets,
                                   const float* __restrict dy_rows, int64_t channels,
                                   float* __restrict weight_grad_t) {
  constexpr int Taps = 3;
  constexpr int Block = 8;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t K = g.column_rows();
  for (int64_t o0 = 0; o0 < channels; o0 += Block) {
    const float* dy_block = dy_rows + o0 * g.out_h * row_len;
    for (int64_t k0 = 0; k0 < K; k0 += Taps) {
      const int taps = static_cast<int>(std::min<int64_t>(Taps, K - k0));
      int64_t tap_offset[Taps];
      // A short last block repeats its last tap (and drops the sums).
      for (int t = 0; t < Taps; ++t) tap_offset[t] = tap_offsets[k0 + std::min(t, taps - 1)];
      __m512 acc[Taps][Block];
#pragma GCC unroll 3
      for (int t = 0; t < Taps; ++t) {
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) acc[t][o] = _mm512_setzero_ps();
      }
      // One flat loop over the (row, vector) steps: with the rows and vectors as two nested
      // loops GCC kept the accumulators in memory, a store and a load of each per row.
      int64_t oh = 0, v = 0;
      for (int64_t step = 0; step < g.out_h * r.row_vectors; ++step) {
        const float* base = phases + oh * g.stride_h * r.phase_width + v * kRowLanes;
        const float* dy_vector = dy_block + oh * row_len + v * kRowLanes;
        __m512 run[Taps];
#pragma GCC unroll 3
        for (int t = 0; t < Taps; ++t) {
          run[t] = _mm512_loadu_ps(base + tap_offset[t]);
          keep_in_register(run[t]);
        }
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) {
          __m512 d = _mm512_loadu_ps(dy_vector + o * g.out_h * row_len);
          keep_in_register(d);
#pragma GCC unroll 3
          for (int t = 0; t < Taps; ++t) acc[t][o] = _mm512_fmadd_ps(d, run[t], acc[t][o]);
        }
        if (++v == r.row_vectors) {
          v = 0;
          ++oh;
        }
      }
      // Reduced with constant bounds: indexing acc with the runtime `taps` made GCC keep it in
      // memory, stored back at every step of the loop above.
      float sums[Taps][Block];
#pragma GCC unroll 3
      for (int t = 0; t < Taps; ++t) {
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) sums[t][o] = _mm512_reduce_add_ps(acc[t][o]);
      }
      for (int t = 0; t < taps; ++t) {
        for (int o = 0; o < Block; ++o) weight_grad_t[(k0 + t) * channels + o0 + o] += sums[t][o];
      }
    }
  }
}
#endif

}  // namespace

template <typename scalar_t>
void rows_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                  const at::Tensor& bias_acc, const Conv2dGeometry& g, int64_t threads,
                  at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const RowLayout r = make_row_layout(g);
  const std::vector<int64_t> tap_offsets = make_tap_offsets(g, r);
  const int64_t channels = O <= 8 ? 8 : kMaxRowChannels;
  const std::vector<acc_t> weight_t = weight_by_tap(weight_acc.const_data_ptr<acc_t>(), O, K, channels);
  const int64_t per_thread = g.in_channels * r.phases * r.plane_elems();
  // Zeroed once: split_phases leaves the padding alone (see there).
  at::Tensor buffers = scratch<acc_t>(x, threads * per_thread).zero_();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  parallel_for_slots(0, g.batch, 1, threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* phases = buffer_base + thread * per_thread;
    for (int64_t b = begin; b < end; ++b) {
      split_phases(x_ptr + b * image_elems, g, r, phases);
      with_block(channels, [&](auto block) {
        rows_forward_image<scalar_t, acc_t, decltype(block)::value>(
            phases, g, r, tap_offsets.data(), weight_t.data(), bias_ptr, y_ptr + b * O * L);
      });
    }
  });
}

namespace {

// One dY plane of an image as rows of row_vectors * kRowLanes values (zeros past out_w), for
// the weight gradient's kernels; returns the plane's sum (the bias gradient's share).
template <typename scalar_t, typename acc_t>
acc_t copy_dy_rows(const scalar_t* __restrict plane, const Conv2dGeometry& g, const RowLayout& r,
                   acc_t* __restrict rows) {
  const int64_t row_len = r.row_vectors * kRowLanes;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    // In registers, the sum on the way: through load_lanes' local array and a second pass
    // this copy would be a fifth of the first layer's weight gradient.
    __m512 sum = _mm512_setzero_ps();
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += kRowLanes) {
        const int64_t lanes = std::min<int64_t>(kRowLanes, g.out_w - ow0);
        const __m512 value = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u),
                                                   plane + oh * g.out_w + ow0);
        _mm512_storeu_ps(rows + oh * row_len + ow0, value);
        sum = _mm512_add_ps(sum, value);
      }
    }
    return _mm512_reduce_add_ps(sum);
  }
#endif
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t v = 0; v < r.row_vectors; ++v) {
      const int64_t ow0 = v * kRowLanes;
      acc_t value[kRowLanes];
      load_lanes(value, plane + oh * g.out_w + ow0, std::min<int64_t>(kRowLanes, g.out_w - ow0));
      std::copy(value, value + kRowLanes, rows + oh * row_len + ow0);
    }
  }
  // The sum from the padded rows just written (zeros past out_w): one contiguous reduction,
  // where summing along the copy kept a chain through memory.
  acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < g.out_h * row_len; ++e) sum += rows[e];
  return sum;
}

}  // namespace

// grad_bias (when given) is summed on the way: each dY plane is copied into dy_rows anyway.
template <typename scalar_t>
void rows_weight_grad(const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                      int64_t threads, at::Tensor& grad_weight_acc, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const RowLayout r = make_row_layout(g);
  const std::vector<int64_t> tap_offsets = make_tap_offsets(g, r);
  const int64_t channels = O <= 8 ? 8 : kMaxRowChannels;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t phase_elems = g.in_channels * r.phases * r.plane_elems();
  const int64_t dy_elems = channels * g.out_h * row_len;
  const int64_t per_thread = phase_elems + dy_elems + K * channels;
  // Zeroed once: the phase planes' padding, dY's padded lanes and channels stay zero for the
  // whole call, and the weight sums start at zero.
  at::Tensor buffers = scratch<acc_t>(x, threads * per_thread).zero_();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  // Per (image, channel) sums of dY, totalled in image order below: the same bias gradient
  // on any number of threads.
  std::vector<double> plane_sums(g.batch * O);
  parallel_for_slots(0, g.batch, 1, threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* phases = buffer_base + thread * per_thread;
    acc_t* dy_rows = phases + phase_elems;
    acc_t* weight_grad_t = dy_rows + dy_elems;
    for (int64_t b = begin; b < end; ++b) {
      split_phases(x_ptr + b * image_elems, g, r, phases);
      for (int64_t o = 0; o < O; ++o) {
        plane_sums[b * O + o] = static_cast<double>(
            copy_dy_rows(dy_ptr + (b * O + o) * L, g, r, dy_rows + o * g.out_h * row_len));
      }
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<acc_t, float> && kRowLanes == 16) {
        rows_weight_grad_image_avx512(phases, g, r, tap_offsets.data(), dy_rows, channels,
                                            weight_grad_t);
        continue;
      }
#endif
      with_block(channels, [&](auto block) {
        rows_weight_grad_image<acc_t, decltype(block)::value>(
            phases, g, r, tap_offsets.data(), dy_rows, weight_grad_t);
      });
    }
  });
  acc_t* total = grad_weight_acc.mutable_data_ptr<acc_t>();
  for (int64_t thread = 0; thread < threads; ++thread) {
    add_tap_major(buffer_base + thread * per_thread + phase_elems + dy_elems, O, K, channels,
                  total);
  }
  if (grad_bias == nullptr) return;
  for (int64_t o = 0; o < O; ++o) {
    double sum = 0.0;
    for (int64_t b = 0; b < g.batch; ++b) sum += plane_sums[b * O + o];
    grad_bias[o] = static_cast<scalar_t>(sum);
  }
}

#define CONVKIT_INSTANTIATE_ROWS(scalar_t)                                                 \
  template void rows_forward<scalar_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                       const Conv2dGeometry&, int64_t, at::Tensor&);          \
  template void rows_weight_grad<scalar_t>(const at::Tensor&, const at::Tensor&,              \
                                           const Conv2dGeometry&, int64_t, at::Tensor&,       \
                                           scalar_t*);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_ROWS)
#undef CONVKIT_INSTANTIATE_ROWS

}  // namespace convkit::cpu_conv2d
