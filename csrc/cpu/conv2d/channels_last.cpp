// Conv2d on channels-last (NHWC) memory: every layer whose input or weight is channels-last
// (csrc/memory_format.h), depthwise ones excepted (channels_last_depthwise.cpp).
//
// In NHWC memory a pixel's channels are one contiguous run, so the column matrix has one row
// per output position and, along it, the kernel's taps one after another, each a run of the
// C/groups channel values of the input pixel under the tap (zeros in the padding):
//   columns [P, K]   K = kH*kW*C/groups, P output positions (n, oh, ow) in memory order
//   forward          Y[P, O_g] = columns @ W_g^T        W as [O, kH, kW, C/groups]
//   weight grad      dW_g += dY[P, O_g]^T @ columns
//   input grad       the transposed convolution, gathered: an input pixel's row holds, for
//                    each tap that reaches it, the O/groups gradient values of the output the
//                    tap came from; dX[Q, C_g] = rows @ W'_g, W' as [taps, O/groups, C/groups].
//                    Pixels are taken by phase (coordinates modulo the stride), which fixes
//                    the taps that can reach them: a stride-2 3x3 layer gathers the 1-4 taps
//                    of each phase instead of all 9.
// 1x1 stride-1 unpadded layers (ResNet's and MobileNet's projections) need no columns when
// the tensors are of the compute type: X is the column matrix, dY the input gradient's rows.
// Tiles of positions (or pixels) are spread over the threads, one GEMM each on its thread;
// a layer with a large weight operand runs one tile at a time on all threads instead, the
// gather split between them and the GEMM threaded (TileSchedule).
// Every output element is written by one task (tiles of positions or pixels, column ranges of
// dW), each summing in a fixed order: results do not depend on the thread count.
// Non-finite values: the padding enters the products as zeros, as in the NCHW column paths; an
// input gradient row also holds zeros for taps whose output lies outside the map, so an
// infinite weight gives NaN there where torch's scatter (col2im) never multiplies it.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../gemm.h"
#include "../parallel.h"
#include "kernels.h"

namespace convkit::cpu_conv2d {
namespace {

// Columns per thread tile (L2-sized), and its bounds in positions.
constexpr int64_t kTileBytes = int64_t(384) << 10;
constexpr int64_t kMinTilePositions = 32;
constexpr int64_t kMaxTilePositions = 512;
// The weight gradient's column ranges are at least this wide (a GEMM panel or two).
constexpr int64_t kMinWeightColumns = 32;
// A group's weight operand at least this large (ResNet's 512-channel 3x3: 9.4 MB) does not stay
// in a core's cache next to a tile: tiles then run one at a time, shared by all threads (the
// gather split between them, the GEMM threaded over the output's columns), as the NCHW
// shared_tiles path does; their columns take up to kSharedTileBytes.
constexpr int64_t kSharedWeightBytes = int64_t(2) << 20;
constexpr int64_t kSharedTileBytes = int64_t(4) << 20;

// How a layer's tiles run: spread over the threads, or (shared) one at a time on all of them.
struct TileSchedule {
  int64_t tile;  // positions (or pixels) a tile
  bool shared;
  int64_t tiles(int64_t total) const { return (total + tile - 1) / tile; }
  // fn(begin, end) over [0, count) rows of a tile: split between the threads when shared.
  template <typename F>
  void spread(int64_t count, const F& fn) const {
    if (shared) {
      parallel_for(0, count, 8, fn);
    } else {
      fn(int64_t(0), count);
    }
  }
  // body(begin, end) over the tiles: on the calling thread when shared (its GEMMs threaded).
  template <typename F>
  void run(int64_t total, const F& body) const {
    if (shared) {
      body(int64_t(0), tiles(total));
    } else {
      parallel_for(0, tiles(total), 1, body);
    }
  }
};

template <typename T>
std::unique_ptr<T[]> scratch(int64_t count) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(count, 1))]);
}

// Positions per tile for rows of `row_values` acc_t values, so that `positions` give each of
// `threads` threads at least one tile.
int64_t tile_positions(int64_t row_values, int64_t value_bytes, int64_t positions,
                       int64_t threads) {
  const int64_t by_bytes = kTileBytes / std::max<int64_t>(row_values * value_bytes, 1);
  const int64_t tile = std::clamp(by_bytes, kMinTilePositions, kMaxTilePositions);
  const int64_t per_thread = (positions + threads - 1) / std::max<int64_t>(threads, 1);
  return std::max<int64_t>(1, std::min(tile, per_thread));
}

// Tiles of `total` rows of `row_values` values, for a group weight operand of weight_bytes.
TileSchedule schedule_tiles(int64_t row_values, int64_t value_bytes, int64_t total,
                            int64_t threads, int64_t weight_bytes) {
  if (threads > 1 && weight_bytes >= kSharedWeightBytes) {
    const int64_t by_bytes = kSharedTileBytes / std::max<int64_t>(row_values * value_bytes, 1);
    return {std::min(std::clamp(by_bytes, kMinTilePositions, kMaxTilePositions),
                     std::max<int64_t>(total, 1)),
            true};
  }
  return {tile_positions(row_values, value_bytes, total, threads), false};
}

template <typename scalar_t, typename acc_t>
inline void copy_run(const scalar_t* __restrict src, int64_t count, acc_t* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename acc_t>
inline void zero_run(int64_t count, acc_t* dst) {
  std::fill(dst, dst + count, acc_t(0));
}

bool is_pointwise(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h == 0 && g.pad_w == 0;
}

// Columns [k0, k1) of group `group`'s column rows for positions [p0, p0 + count), row q at
// dst + q * ld.
template <typename scalar_t, typename acc_t>
void gather_columns(const scalar_t* x, const Conv2dGeometry& g, int64_t group, int64_t p0,
                    int64_t count, int64_t k0, int64_t k1, acc_t* dst, int64_t ld) {
  const int64_t C = g.in_channels;
  const int64_t Cg = C / g.groups;
  const int64_t area = g.out_area();
  const int64_t first_tap = k0 / Cg;
  const int64_t end_tap = (k1 + Cg - 1) / Cg;
  // A kernel row's taps are adjacent pixels, their channels one run, when nothing between
  // them is skipped (one group, no dilation).
  const bool whole_rows = g.groups == 1 && g.dilation_w == 1 && g.kernel_w > 1;
  for (int64_t q = 0; q < count; ++q) {
    const int64_t p = p0 + q;
    const int64_t n = p / area;
    const int64_t oh = (p % area) / g.out_w;
    const int64_t ow = p % g.out_w;
    acc_t* row = dst + q * ld - k0;
    for (int64_t t = first_tap; t < end_tap; ++t) {
      const int64_t kh = t / g.kernel_w;
      const int64_t kw = t % g.kernel_w;
      if (whole_rows && kw == 0 && t * Cg >= k0 && (t + g.kernel_w) * Cg <= k1) {
        // A kernel row inside the image, undilated, with every channel: one run of kW*C
        // values (the stem's 7 taps of 3 channels: 21 values, not 7 runs of 3).
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        const int64_t iw = conv_input_coordinate(ow, 0, g.stride_w, g.pad_w, 1);
        if (ih >= 0 && ih < g.in_h && iw >= 0 && iw + g.kernel_w <= g.in_w) {
          copy_run(x + ((n * g.in_h + ih) * g.in_w + iw) * C, g.kernel_w * C, row + t * Cg);
          t += g.kernel_w - 1;
          continue;
        }
      }
      const int64_t c0 = std::max<int64_t>(k0 - t * Cg, 0);
      const int64_t c1 = std::min<int64_t>(k1 - t * Cg, Cg);
      const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
      const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
      acc_t* out = row + t * Cg + c0;
      if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) {
        zero_run(c1 - c0, out);
      } else {
        copy_run(x + ((n * g.in_h + ih) * g.in_w + iw) * C + group * Cg + c0, c1 - c0, out);
      }
    }
  }
}

// Y += bias on rows [0, count) of a [count, O] block with leading dimension ld.
template <typename acc_t>
void add_bias_rows(const acc_t* bias, int64_t count, int64_t O, acc_t* y, int64_t ld) {
  for (int64_t q = 0; q < count; ++q) {
    acc_t* row = y + q * ld;
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) row[o] += bias[o];
  }
}

// The input pixels of one phase (ph, pw): rows ph, ph + s_h, ... and columns pw, pw + s_w, ...
// of every image, numbered image by image, row by row.
struct PhasePixels {
  int64_t ph, pw, rows_h, rows_w, stride_h, stride_w;
  int64_t count(int64_t batch) const { return batch * rows_h * rows_w; }
  void locate(int64_t pixel, int64_t* n, int64_t* ih, int64_t* iw) const {
    *n = pixel / (rows_h * rows_w);
    *ih = ph + ((pixel / rows_w) % rows_h) * stride_h;
    *iw = pw + (pixel % rows_w) * stride_w;
  }
};

// The taps of a phase along one dimension: offsets k whose input coordinate has the phase's
// residue modulo the stride.
std::vector<int64_t> phase_taps(int64_t phase, int64_t kernel, int64_t stride, int64_t pad,
                                int64_t dilation) {
  std::vector<int64_t> taps;
  for (int64_t k = 0; k < kernel; ++k) {
    const int64_t offset = phase + pad - k * dilation;
    if (((offset % stride) + stride) % stride == 0) taps.push_back(k);
  }
  return taps;
}

}  // namespace

template <typename scalar_t>
void channels_last_forward(const at::Tensor& x, const at::Tensor& weight_ohwc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t C = g.in_channels, O = g.out_channels;
  const int64_t Cg = C / g.groups, Og = O / g.groups;
  const int64_t Kg = g.kernel_area() * Cg;
  const int64_t P = g.batch * g.out_area();
  const acc_t* w_ptr = weight_ohwc.const_data_ptr<acc_t>();
  const acc_t* bias = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  const bool direct = same_type && is_pointwise(g);
  const TileSchedule schedule =
      schedule_tiles(direct ? O : Kg + O, sizeof(acc_t), P, team_size(),
                     Og * Kg * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t tile = schedule.tile;
  schedule.run(P, [&](int64_t begin, int64_t end) {
    auto columns = scratch<acc_t>(direct ? 0 : tile * Kg);
    auto block = scratch<acc_t>(same_type ? 0 : tile * O);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * tile;
      const int64_t count = std::min(tile, P - p0);
      acc_t* y_tile = nullptr;
      if constexpr (same_type) {
        y_tile = y_ptr + p0 * O;
      } else {
        y_tile = block.get();
      }
      for (int64_t group = 0; group < g.groups; ++group) {
        const acc_t* a = nullptr;
        int64_t lda = Kg;
        if (direct) {
          a = reinterpret_cast<const acc_t*>(x_ptr) + p0 * C + group * Cg;
          lda = C;
        } else {
          schedule.spread(count, [&](int64_t first, int64_t last) {
            gather_columns(x_ptr, g, group, p0 + first, last - first, 0, Kg,
                           columns.get() + first * Kg, Kg);
          });
          a = columns.get();
        }
        cpu::gemm<acc_t>(false, true, count, Og, Kg, acc_t(1), a, lda, w_ptr + group * Og * Kg,
                         Kg, acc_t(0), y_tile + group * Og, O);
      }
      if (bias != nullptr) add_bias_rows(bias, count, O, y_tile, O);
      if constexpr (!same_type) {
        scalar_t* dst = y_ptr + p0 * O;
#pragma omp simd
        for (int64_t i = 0; i < count * O; ++i) dst[i] = static_cast<scalar_t>(y_tile[i]);
      }
    }
  });
}

// dW [O, kH*kW*C/groups] (zeros on entry): each task owns a range of one group's columns and
// walks all positions in tiles.
template <typename scalar_t>
void channels_last_weight_grad(const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                               at::opmath_type<scalar_t>* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t C = g.in_channels, O = g.out_channels;
  const int64_t Cg = C / g.groups, Og = O / g.groups;
  const int64_t Kg = g.kernel_area() * Cg;
  const int64_t P = g.batch * g.out_area();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const bool direct = same_type && is_pointwise(g);
  const int64_t threads = team_size();
  const int64_t wanted = std::max<int64_t>(1, (threads + g.groups - 1) / g.groups);
  const int64_t ranges =
      std::max<int64_t>(1, std::min(wanted, Kg / kMinWeightColumns));
  const int64_t width = (Kg + ranges - 1) / ranges;
  parallel_for(0, g.groups * ranges, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile = tile_positions(width + Og, sizeof(acc_t), P, 1);
    auto columns = scratch<acc_t>(direct ? 0 : tile * width);
    auto dy_block = scratch<acc_t>(same_type ? 0 : tile * Og);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / ranges;
      const int64_t k0 = (task % ranges) * width;
      const int64_t k1 = std::min(Kg, k0 + width);
      if (k0 >= k1) continue;
      for (int64_t p0 = 0; p0 < P; p0 += tile) {
        const int64_t count = std::min(tile, P - p0);
        const acc_t* b = nullptr;
        int64_t ldb = k1 - k0;
        if (direct) {
          b = reinterpret_cast<const acc_t*>(x_ptr) + p0 * C + group * Cg + k0;
          ldb = C;
        } else {
          gather_columns(x_ptr, g, group, p0, count, k0, k1, columns.get(), k1 - k0);
          b = columns.get();
        }
        const acc_t* a = nullptr;
        int64_t lda = O;
        if constexpr (same_type) {
          a = dy_ptr + p0 * O + group * Og;
        } else {
          for (int64_t q = 0; q < count; ++q) {
            copy_run(dy_ptr + (p0 + q) * O + group * Og, Og, dy_block.get() + q * Og);
          }
          a = dy_block.get();
          lda = Og;
        }
        cpu::gemm<acc_t>(true, false, Og, k1 - k0, count, acc_t(1), a, lda, b, ldb, acc_t(1),
                         dw + group * Og * Kg + k0, Kg);
      }
    }
  });
}

// dX [N, H, W, C] by phases of the input coordinates (see the top of the file).
template <typename scalar_t>
void channels_last_input_grad(const at::Tensor& dy, const at::Tensor& weight_ohwc,
                              const Conv2dGeometry& g, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t C = g.in_channels, O = g.out_channels;
  const int64_t Cg = C / g.groups, Og = O / g.groups;
  const int64_t KA = g.kernel_area();
  const acc_t* w_ptr = weight_ohwc.const_data_ptr<acc_t>();  // [O, kH, kW, Cg]
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  scalar_t* dx_ptr = grad_input.mutable_data_ptr<scalar_t>();
  const int64_t threads = team_size();
  const bool direct = same_type && is_pointwise(g);
  for (int64_t ph = 0; ph < std::min(g.stride_h, g.in_h); ++ph) {
    for (int64_t pw = 0; pw < std::min(g.stride_w, g.in_w); ++pw) {
      const std::vector<int64_t> taps_h =
          phase_taps(ph, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
      const std::vector<int64_t> taps_w =
          phase_taps(pw, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
      const int64_t taps = static_cast<int64_t>(taps_h.size() * taps_w.size());
      const PhasePixels pixels{ph, pw, (g.in_h - ph + g.stride_h - 1) / g.stride_h,
                               (g.in_w - pw + g.stride_w - 1) / g.stride_w, g.stride_h,
                               g.stride_w};
      const int64_t Q = pixels.count(g.batch);
      const int64_t Kt = taps * Og;
      // W' of the phase: [groups][taps * Og][Cg].
      std::vector<acc_t> wt(static_cast<size_t>(g.groups * Kt * Cg));
      for (int64_t group = 0; group < g.groups; ++group) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t kh = taps_h[t / taps_w.size()];
          const int64_t kw = taps_w[t % taps_w.size()];
          for (int64_t o = 0; o < Og; ++o) {
            const acc_t* src = w_ptr + ((group * Og + o) * KA + kh * g.kernel_w + kw) * Cg;
            std::copy_n(src, Cg, wt.data() + ((group * taps + t) * Og + o) * Cg);
          }
        }
      }
      const TileSchedule schedule = schedule_tiles(
          Kt + Cg, sizeof(acc_t), Q, threads, Kt * Cg * static_cast<int64_t>(sizeof(acc_t)));
      const int64_t tile = schedule.tile;
      // One phase at stride 1: its pixels are the image's, rows of dX in memory order.
      const bool in_place = same_type && g.stride_h == 1 && g.stride_w == 1;
      schedule.run(Q, [&](int64_t begin, int64_t end) {
        auto rows = scratch<acc_t>(direct ? 0 : tile * Kt);
        auto block = scratch<acc_t>(in_place ? 0 : tile * Cg);
        for (int64_t t_index = begin; t_index < end; ++t_index) {
          const int64_t q0 = t_index * tile;
          const int64_t count = std::min(tile, Q - q0);
          for (int64_t group = 0; group < g.groups; ++group) {
            acc_t* out = nullptr;
            int64_t ldc = Cg;
            if (in_place) {
              out = reinterpret_cast<acc_t*>(dx_ptr) + q0 * C + group * Cg;
              ldc = C;
            } else {
              out = block.get();
            }
            if (taps == 0) {
              for (int64_t q = 0; q < count; ++q) zero_run(Cg, out + q * ldc);
            } else {
              const acc_t* a = nullptr;
              int64_t lda = Kt;
              if (direct) {
                a = reinterpret_cast<const acc_t*>(dy_ptr) + q0 * O + group * Og;
                lda = O;
              } else {
                schedule.spread(count, [&](int64_t first, int64_t last) {
                  for (int64_t q = first; q < last; ++q) {
                    int64_t n, ih, iw;
                    pixels.locate(q0 + q, &n, &ih, &iw);
                    acc_t* row = rows.get() + q * Kt;
                    for (int64_t t = 0; t < taps; ++t) {
                      const int64_t kh = taps_h[t / taps_w.size()];
                      const int64_t kw = taps_w[t % taps_w.size()];
                      const int64_t oh_scaled = ih + g.pad_h - kh * g.dilation_h;
                      const int64_t ow_scaled = iw + g.pad_w - kw * g.dilation_w;
                      const int64_t oh = oh_scaled / g.stride_h;
                      const int64_t ow = ow_scaled / g.stride_w;
                      if (oh_scaled >= 0 && oh < g.out_h && ow_scaled >= 0 && ow < g.out_w) {
                        copy_run(dy_ptr + ((n * g.out_h + oh) * g.out_w + ow) * O + group * Og,
                                 Og, row + t * Og);
                      } else {
                        zero_run(Og, row + t * Og);
                      }
                    }
                  }
                });
                a = rows.get();
              }
              cpu::gemm<acc_t>(false, false, count, Cg, Kt, acc_t(1), a, lda,
                               wt.data() + group * Kt * Cg, Cg, acc_t(0), out, ldc);
            }
            if (in_place) continue;
            schedule.spread(count, [&](int64_t first, int64_t last) {
              for (int64_t q = first; q < last; ++q) {
                int64_t n, ih, iw;
                pixels.locate(q0 + q, &n, &ih, &iw);
                scalar_t* dst = dx_ptr + ((n * g.in_h + ih) * g.in_w + iw) * C + group * Cg;
                const acc_t* src = out + q * Cg;
#pragma omp simd
                for (int64_t c = 0; c < Cg; ++c) dst[c] = static_cast<scalar_t>(src[c]);
              }
            });
          }
        }
      });
    }
  }
}

template <typename scalar_t>
void channels_last_backward(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor& weight_ohwc, const Conv2dGeometry& g,
                            bool need_input_grad, bool need_weight_grad, at::Tensor& grad_input,
                            at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (need_input_grad) channels_last_input_grad<scalar_t>(dy, weight_ohwc, g, grad_input);
  if (!need_weight_grad) return;
  const int64_t O = g.out_channels;
  const int64_t Cg = g.in_channels / g.groups;
  // dW in the columns' order [O, kH, kW, C/groups], then into the accumulator's [O, C/g, kH, kW].
  at::Tensor dw = at::zeros({O, g.kernel_area(), Cg}, grad_weight_acc.options());
  channels_last_weight_grad<scalar_t>(dy, x, g, dw.mutable_data_ptr<acc_t>());
  grad_weight_acc.view({O, Cg, g.kernel_area()}).add_(dw.transpose(1, 2));
}

// The bias gradient of a channels-last dY: column sums over all positions, blocks of rows in
// acc_t, the blocks in double in order.
template <typename scalar_t>
void channels_last_bias_grad(const at::Tensor& dy, const Conv2dGeometry& g, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlockRows = 256;
  const int64_t O = g.out_channels;
  const int64_t P = g.batch * g.out_area();
  const int64_t blocks = (P + kBlockRows - 1) / kBlockRows;
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  std::vector<acc_t> partial(static_cast<size_t>(blocks * O), acc_t(0));
  parallel_for(0, blocks, grain_for(kBlockRows * O), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      acc_t* sums = partial.data() + block * O;
      const int64_t p1 = std::min(P, (block + 1) * kBlockRows);
      for (int64_t p = block * kBlockRows; p < p1; ++p) {
        const scalar_t* row = dy_ptr + p * O;
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) sums[o] += static_cast<acc_t>(row[o]);
      }
    }
  });
  std::vector<double> total(static_cast<size_t>(O), 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t o = 0; o < O; ++o) total[o] += static_cast<double>(partial[block * O + o]);
  }
  for (int64_t o = 0; o < O; ++o) grad_bias[o] = static_cast<scalar_t>(total[o]);
}

#define CONVKIT_INSTANTIATE_CHANNELS_LAST(T)                                                   \
  template void channels_last_forward<T>(const at::Tensor&, const at::Tensor&,                 \
                                         const at::Tensor&, const Conv2dGeometry&, at::Tensor&); \
  template void channels_last_backward<T>(const at::Tensor&, const at::Tensor&,                \
                                          const at::Tensor&, const Conv2dGeometry&, bool, bool, \
                                          at::Tensor&, at::Tensor&);                           \
  template void channels_last_bias_grad<T>(const at::Tensor&, const Conv2dGeometry&, T*);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_CHANNELS_LAST)
#undef CONVKIT_INSTANTIATE_CHANNELS_LAST

}  // namespace convkit::cpu_conv2d
