// The depthwise path on small maps (depthwise_blocks_fit, path.h): 16 channels in the vector
// lanes. depthwise.cpp's per-plane passes cost a fixed ~200 cycles a plane (phase copies, a
// short flat loop per pass), which on MobileNet's 2x2-16x16 maps outweighs the taps. Here an
// image's block of 16 channel planes is transposed into [position][16 lanes] (16 x 16
// register transposes), and every tap is one vector FMA per output position with the weights
// of 16 channels in registers: no phases (any stride is an offset), no tails.
//   forward       yb[p] = b + sum_t w_t xb[p * s + off_t]              (xb: zero-bordered)
//   weight grad   dw_t += sum_p dyb[p] xb[p * s + off_t]   (per image in acc_t, per channel
//                 over the batch in double, by the thread that owns the block)
//   input grad    dxb[p * s + off_t] += w_t dyb[p], into a zeroed bordered buffer, whose
//                 interior is transposed back into dX's planes
// Lanes beyond the last channel of a partial block hold whatever the scratch held: they are
// per-lane sums that never mix with the others and are never written out.
// The vectors are GCC vector extensions of 16 acc_t (one zmm of floats; the compiler splits
// them on narrower targets).
// Floor: memory. [32,144,16,16] stride 2 moves 5.9 MB (X read, Y written) for 5.3 MFLOP:
// 0.1-0.24 ms at 25-60 GB/s; its forward runs in 0.16-0.17 ms on two threads. The transposes
// and tap loops run in L2 (a block of 16 planes of 56x56 floats is 200 KiB).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../parallel.h"
#include "kernels.h"
#include "relayout.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {
namespace {

constexpr int64_t kLanes = 16;

template <typename T>
struct LaneVector {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using vec_t = typename LaneVector<T>::type;

template <typename T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, const vec_t<T>& v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// The zero-bordered input of a block: padded rows [0, rows) and columns [0, cols), those the
// windows reach.
struct BlockLayout {
  int64_t rows, cols;
  int64_t taps;
  std::vector<int64_t> offsets;  // per tap, in positions of the bordered buffer
  int64_t bordered() const { return rows * cols * kLanes; }
};

BlockLayout make_block_layout(const Conv2dGeometry& g) {
  BlockLayout b;
  b.rows = (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1;
  b.cols = (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1;
  b.taps = g.kernel_area();
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      b.offsets.push_back(kh * g.dilation_h * b.cols + kw * g.dilation_w);
    }
  }
  return b;
}

// out[p * 16 + lane] = planes[lane * area + p], lane < lanes, widened to acc_t (through
// `wide`, lanes * area values, for half types).
template <typename scalar_t, typename acc_t>
void to_lanes(const scalar_t* planes, int64_t area, int64_t lanes, acc_t* wide, acc_t* out) {
  const acc_t* src = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    src = planes;
  } else {
    for (int64_t i = 0; i < lanes * area; ++i) wide[i] = static_cast<acc_t>(planes[i]);
    src = wide;
  }
  transpose_matrix<false>(src, area, lanes, area, out, kLanes);
}

// planes[lane * area + p] = blocks[p * 16 + lane], lane < lanes, rounded once to scalar_t.
template <typename scalar_t, typename acc_t>
void from_lanes(const acc_t* blocks, int64_t area, int64_t lanes, acc_t* wide, scalar_t* planes) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    transpose_matrix<false>(blocks, kLanes, area, lanes, planes, area);
  } else {
    transpose_matrix<false>(blocks, kLanes, area, lanes, wide, area);
    for (int64_t i = 0; i < lanes * area; ++i) planes[i] = static_cast<scalar_t>(wide[i]);
  }
}

// The interior of the bordered buffer from [H * W][16]: input (ih, iw) at padded (ih + pad_h,
// iw + pad_w), the parts beyond the windows dropped. The borders are never written.
template <typename acc_t>
void fill_interior(const acc_t* lanes, const Conv2dGeometry& g, const BlockLayout& b,
                   acc_t* bordered) {
  const int64_t h = std::min(g.in_h, b.rows - g.pad_h);
  const int64_t w = std::max<int64_t>(0, std::min(g.in_w, b.cols - g.pad_w));
  for (int64_t ih = 0; ih < h; ++ih) {
    std::copy(lanes + ih * g.in_w * kLanes, lanes + (ih * g.in_w + w) * kLanes,
              bordered + ((ih + g.pad_h) * b.cols + g.pad_w) * kLanes);
  }
}

// The reverse for the input gradient: every input position, 0 where no window reaches.
template <typename acc_t>
void take_interior(const acc_t* bordered, const Conv2dGeometry& g, const BlockLayout& b,
                   acc_t* lanes) {
  const int64_t h = std::min(g.in_h, b.rows - g.pad_h);
  const int64_t w = std::max<int64_t>(0, std::min(g.in_w, b.cols - g.pad_w));
  for (int64_t ih = 0; ih < g.in_h; ++ih) {
    acc_t* dst = lanes + ih * g.in_w * kLanes;
    int64_t done = 0;
    if (ih < h) {
      const acc_t* src = bordered + ((ih + g.pad_h) * b.cols + g.pad_w) * kLanes;
      std::copy(src, src + w * kLanes, dst);
      done = w * kLanes;
    }
    std::fill(dst + done, dst + g.in_w * kLanes, acc_t(0));
  }
}

// Tap loops: N taps as a constant (a 3x3 kernel: weights and sums in registers), or 0 for
// any count at run time.
template <int N, typename acc_t>
void forward_block(const acc_t* xb, const vec_t<acc_t>* w, const vec_t<acc_t>& bias,
                   const Conv2dGeometry& g, const BlockLayout& b, acc_t* yb) {
  const int64_t T = N > 0 ? N : b.taps;
  const int64_t* off = b.offsets.data();
  // With N constant the weights are copied into locals, so that the stores to yb (which the
  // compiler must assume may alias them) do not reload them.
  constexpr int kHeld = N > 0 ? N : 1;
  vec_t<acc_t> held[kHeld];
  int64_t held_off[kHeld];
  for (int t = 0; t < kHeld && N > 0; ++t) {
    held[t] = w[t];
    held_off[t] = off[t] * kLanes;
  }
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const acc_t* base = xb + (oh * g.stride_h * b.cols + ow * g.stride_w) * kLanes;
      vec_t<acc_t> sum = bias;
      if constexpr (N > 0) {
        for (int t = 0; t < N; ++t) sum += held[t] * load(base + held_off[t]);
      } else {
        for (int64_t t = 0; t < T; ++t) sum += w[t] * load(base + off[t] * kLanes);
      }
      store(yb + (oh * g.out_w + ow) * kLanes, sum);
    }
  }
}

template <int N, typename acc_t>
void weight_grad_block(const acc_t* xb, const acc_t* dyb, const Conv2dGeometry& g,
                       const BlockLayout& b, vec_t<acc_t>* sums) {
  const int64_t T = N > 0 ? N : b.taps;
  const int64_t* off = b.offsets.data();
  constexpr int kHeld = N > 0 ? N : 1;
  vec_t<acc_t> held[kHeld] = {};
  if constexpr (N == 0) {
    for (int64_t t = 0; t < T; ++t) sums[t] = vec_t<acc_t>{};
  }
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const acc_t* base = xb + (oh * g.stride_h * b.cols + ow * g.stride_w) * kLanes;
      const vec_t<acc_t> d = load(dyb + (oh * g.out_w + ow) * kLanes);
      if constexpr (N > 0) {
        for (int t = 0; t < N; ++t) held[t] += d * load(base + off[t] * kLanes);
      } else {
        for (int64_t t = 0; t < T; ++t) sums[t] += d * load(base + off[t] * kLanes);
      }
    }
  }
  if constexpr (N > 0) {
    for (int t = 0; t < N; ++t) sums[t] = held[t];
  }
}

template <int N, typename acc_t>
void input_grad_block(const acc_t* dyb, const vec_t<acc_t>* w, const Conv2dGeometry& g,
                      const BlockLayout& b, acc_t* dxb) {
  const int64_t T = N > 0 ? N : b.taps;
  const int64_t* off = b.offsets.data();
  constexpr int kHeld = N > 0 ? N : 1;
  vec_t<acc_t> held[kHeld];
  int64_t held_off[kHeld];
  for (int t = 0; t < kHeld && N > 0; ++t) {
    held[t] = w[t];
    held_off[t] = off[t] * kLanes;
  }
  std::fill(dxb, dxb + b.bordered(), acc_t(0));
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      acc_t* base = dxb + (oh * g.stride_h * b.cols + ow * g.stride_w) * kLanes;
      const vec_t<acc_t> d = load(dyb + (oh * g.out_w + ow) * kLanes);
      if constexpr (N > 0) {
        for (int t = 0; t < N; ++t) {
          acc_t* p = base + held_off[t];
          store(p, load(p) + held[t] * d);
        }
      } else {
        for (int64_t t = 0; t < T; ++t) {
          acc_t* p = base + off[t] * kLanes;
          store(p, load(p) + w[t] * d);
        }
      }
    }
  }
}

// The weights (and bias) of channels [c0, c0 + lanes) as lane vectors, 0 beyond.
template <typename acc_t>
void weight_lanes(const acc_t* weight, int64_t c0, int64_t lanes, int64_t taps,
                  vec_t<acc_t>* out) {
  for (int64_t t = 0; t < taps; ++t) out[t] = vec_t<acc_t>{};
  transpose_matrix<false>(weight + c0 * taps, taps, lanes, taps, reinterpret_cast<acc_t*>(out),
                          kLanes);
}

}  // namespace

template <typename scalar_t>
void depthwise_blocks_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                              const at::Tensor& bias_acc, const Conv2dGeometry& g,
                              at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockLayout b = make_block_layout(g);
  const int64_t C = g.in_channels;
  const int64_t blocks = (C + kLanes - 1) / kLanes;
  const int64_t area = std::max(g.in_area(), g.out_area());
  const int64_t per_thread = b.bordered() + 2 * area * kLanes;
  const int64_t team = team_size();
  const at::Tensor buffers = scratch<acc_t>(x, team * per_thread);
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const acc_t* b_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  const int64_t work = kLanes * (g.in_area() + g.out_area() * b.taps);
  parallel_for_slots(0, g.batch * blocks, grain_for(work), team,
                     [&](int64_t begin, int64_t end, int64_t slot) {
    acc_t* xb = buffer_base + slot * per_thread;
    acc_t* lanes_buf = xb + b.bordered();
    acc_t* wide = lanes_buf + area * kLanes;
    std::fill(xb, xb + b.bordered(), acc_t(0));  // the borders stay 0: only the interior is written
    std::vector<vec_t<acc_t>> w(b.taps);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      // Block-major: a thread's consecutive tasks share their weights.
      const int64_t n = task % g.batch;
      const int64_t c0 = (task / g.batch) * kLanes;
      const int64_t lanes = std::min(kLanes, C - c0);
      if (c0 != loaded) {
        weight_lanes(w_ptr, c0, lanes, b.taps, w.data());
        loaded = c0;
      }
      vec_t<acc_t> bias{};
      for (int64_t lane = 0; lane < lanes && b_ptr != nullptr; ++lane) bias[lane] = b_ptr[c0 + lane];
      to_lanes(x_ptr + (n * C + c0) * g.in_area(), g.in_area(), lanes, wide, lanes_buf);
      fill_interior(lanes_buf, g, b, xb);
      if (b.taps == 9) {
        forward_block<9>(xb, w.data(), bias, g, b, lanes_buf);
      } else {
        forward_block<0>(xb, w.data(), bias, g, b, lanes_buf);
      }
      from_lanes(lanes_buf, g.out_area(), lanes, wide, y_ptr + (n * C + c0) * g.out_area());
    }
  });
}

template <typename scalar_t>
void depthwise_blocks_backward(const at::Tensor& dy, const at::Tensor& x,
                               const at::Tensor& weight_acc, const Conv2dGeometry& g,
                               bool need_input_grad, bool need_weight_grad,
                               at::Tensor& grad_input, at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockLayout b = make_block_layout(g);
  const int64_t C = g.in_channels;
  const int64_t T = b.taps;
  const int64_t blocks = (C + kLanes - 1) / kLanes;
  const int64_t area = std::max(g.in_area(), g.out_area());
  // Per thread: the bordered input, the bordered input gradient, dY in lanes, a [H * W][16]
  // buffer and the half types' widening buffer.
  const int64_t per_thread = 2 * b.bordered() + 3 * area * kLanes;
  const int64_t team = team_size();
  const at::Tensor buffers = scratch<acc_t>(x, team * per_thread);
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  scalar_t* dx_ptr = need_input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* dw_ptr = need_weight_grad ? grad_weight_acc.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t work = g.batch * kLanes * (g.in_area() + g.out_area() * T);
  parallel_for_slots(0, blocks, grain_for(work), team,
                     [&](int64_t begin, int64_t end, int64_t slot) {
    acc_t* xb = buffer_base + slot * per_thread;
    acc_t* dxb = xb + b.bordered();
    acc_t* dyb = dxb + b.bordered();
    acc_t* lanes_buf = dyb + area * kLanes;
    acc_t* wide = lanes_buf + area * kLanes;
    std::fill(xb, xb + b.bordered(), acc_t(0));
    std::vector<vec_t<acc_t>> w(T), sums(T);
    std::vector<double> total(T * kLanes);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kLanes;
      const int64_t lanes = std::min(kLanes, C - c0);
      weight_lanes(w_ptr, c0, lanes, T, w.data());
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t n = 0; n < g.batch; ++n) {
        to_lanes(dy_ptr + (n * C + c0) * g.out_area(), g.out_area(), lanes, wide, dyb);
        if (need_weight_grad) {
          to_lanes(x_ptr + (n * C + c0) * g.in_area(), g.in_area(), lanes, wide, lanes_buf);
          fill_interior(lanes_buf, g, b, xb);
          if (T == 9) {
            weight_grad_block<9>(xb, dyb, g, b, sums.data());
          } else {
            weight_grad_block<0>(xb, dyb, g, b, sums.data());
          }
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t lane = 0; lane < lanes; ++lane) {
              total[t * kLanes + lane] += static_cast<double>(sums[t][lane]);
            }
          }
        }
        if (need_input_grad) {
          if (T == 9) {
            input_grad_block<9>(dyb, w.data(), g, b, dxb);
          } else {
            input_grad_block<0>(dyb, w.data(), g, b, dxb);
          }
          take_interior(dxb, g, b, lanes_buf);
          from_lanes(lanes_buf, g.in_area(), lanes, wide, dx_ptr + (n * C + c0) * g.in_area());
        }
      }
      if (need_weight_grad) {
        for (int64_t lane = 0; lane < lanes; ++lane) {
          for (int64_t t = 0; t < T; ++t) {
            dw_ptr[(c0 + lane) * T + t] = static_cast<acc_t>(total[t * kLanes + lane]);
          }
        }
      }
    }
  });
}

#define CONVKIT_INSTANTIATE_DEPTHWISE_BLOCKS(scalar_t)                                       \
  template void depthwise_blocks_forward<scalar_t>(const at::Tensor&, const at::Tensor&,     \
                                                   const at::Tensor&, const Conv2dGeometry&, \
                                                   at::Tensor&);                             \
  template void depthwise_blocks_backward<scalar_t>(                                         \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const Conv2dGeometry&, bool,  \
      bool, at::Tensor&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_DEPTHWISE_BLOCKS)
#undef CONVKIT_INSTANTIATE_DEPTHWISE_BLOCKS

}  // namespace convkit::cpu_conv2d
