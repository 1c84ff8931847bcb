// The bands path: im2col + GEMM for any geometry, and the fallback of every other path (large
// images, groups, dilation). A tile is a band of output rows of one image (or whole images
// when they are small), its [K, n] columns copied row-wise (vectorised runs, band_columns.h),
// one GEMM per group straight into the output (ldc = oH*oW) when the output is of the compute
// type; 1x1 stride-1 convs read the input as their columns. Where the weight is packed, the
// forward's im2col writes the columns as the GEMM's B panels, a block of channels at a time
// (uses_column_panels). Backward per band: the columns rebuilt (cheaper than storing them),
// dW += dY @ columns^T, dcolumns = W^T @ dY added back row-wise into the image's input
// gradient. The weight (W for the output, W^T for dcolumns)
// is packed for the GEMM once per call, not once per band (tile_gemms.h).
// Each thread owns whole tiles and calls a single-threaded GEMM (gemm.h); weight-gradient
// partial sums are per thread, added in thread order: deterministic for a thread count.
// Floor: the GEMM's rate at the layer's shape (45-95 GFLOP/s per core for K = 25-576, O =
// 8-64 measured here), plus one pass of the column matrix through L2.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../column_buffer.h"
#include "../gemm.h"
#include "../parallel.h"
#include "band_columns.h"
#include "kernels.h"
#include "tile_gemms.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

template <typename scalar_t>
void bands_forward(const at::Tensor& x, const at::Tensor& weight_acc, const at::Tensor& bias_acc,
                   const Conv2dGeometry& g, const TilePlan& p, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  // A band of one image goes straight into the output when scalar_t is the compute type;
  // otherwise the tile's result lands in a buffer first.
  const bool into_output = p.images_per_tile == 1 && std::is_same_v<scalar_t, acc_t>;
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const PackedWeight packed_weight = pack_weight_panels(x, w_ptr, g, false);
  // im2col writes the GEMM's B panels straight away where the weight is packed.
  const bool column_panels = uses_column_panels(packed_weight, g);
  int64_t column_elems = 0;
  if (column_panels) {
    column_elems = column_panel_buffer_floats(g, p.columns);
  } else if (!reads_input_as_columns(g) || !into_output) {
    column_elems = K * p.columns;
  }
  const int64_t out_elems = into_output ? 0 : O * p.columns;
  // Each thread's slice starts 64-byte aligned (the B panels' aligned loads).
  const int64_t per_thread = (column_elems + out_elems + 15) / 16 * 16;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_buffer = buffer_base + thread * per_thread;
    acc_t* out_buffer = columns_buffer + column_elems;
    for (int64_t group = begin; group < end; ++group) {
      for_each_tile(g, p, group, [&](const Tile& t) {
        const int64_t n = t.columns(g);
        acc_t* out;
        int64_t ldc;
        if (into_output) {
          out = reinterpret_cast<acc_t*>(y_ptr) + t.first * O * L + t.oh_begin * g.out_w;
          ldc = L;
        } else {
          out = out_buffer;
          ldc = n;
        }
        if (column_panels) {
          output_by_column_panels(x_ptr, g, t, columns_buffer, out, ldc, packed_weight);
        } else {
          const auto [cols, ld] = tile_columns<scalar_t, acc_t>(x_ptr, g, t, columns_buffer);
          output_from_columns(g, n, w_ptr, cols, ld, out, ldc, &packed_weight);
        }
        if (into_output) {
          if (bias_ptr != nullptr) {
            for (int64_t o = 0; o < O; ++o) {
              acc_t* row = out + o * ldc;
              const acc_t b = bias_ptr[o];
              for (int64_t i = 0; i < n; ++i) row[i] += b;
            }
          }
          return;
        }
        store_tile_runs(out_buffer, tile_runs(g, t, O), t.first, t.count, bias_ptr, y_ptr);
      });
    }
  });
}

template <typename scalar_t>
void bands_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                    const Conv2dGeometry& g, const TilePlan& p, bool need_input_grad,
                    bool need_weight_grad, at::Tensor& grad_input, at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t O = g.out_channels;
  const int64_t C = g.in_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Kg = K / g.groups;
  const int64_t image_elems = C * g.in_area();
  const bool one_image = p.images_per_tile == 1;
  // With one image per tile (and no conversion) dY's band is used in place (ld = L), a 1x1
  // stride-1 conv reads its columns from the input and writes its input gradient directly.
  const bool dy_in_place = one_image && same_type;
  const bool input_as_columns = dy_in_place && reads_input_as_columns(g);
  const int64_t column_elems = input_as_columns ? 0 : K * p.columns;
  const int64_t dy_elems = dy_in_place ? 0 : O * p.columns;
  // The input gradient of the thread's images accumulates in acc_t: in grad_input itself
  // when it is acc_t, else in a per-thread buffer rounded once per image group.
  const int64_t grad_acc_elems = (need_input_grad && !same_type) ? p.images_per_tile * image_elems : 0;
  const int64_t weight_acc_elems = need_weight_grad ? O * Kg : 0;
  const int64_t per_thread = column_elems + dy_elems + grad_acc_elems + weight_acc_elems;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));
  // Only the weight-gradient accumulators (the end of each thread's slice) need zeros.
  for (int64_t thread = 0; thread < p.threads; ++thread) {
    acc_t* weight_grad = buffers.mutable_data_ptr<acc_t>() + (thread + 1) * per_thread - weight_acc_elems;
    std::fill(weight_grad, weight_grad + weight_acc_elems, acc_t(0));
  }

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  scalar_t* dx_ptr = need_input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const PackedWeight packed_weight =
      need_input_grad ? pack_weight_panels(x, w_ptr, g, true) : PackedWeight{};

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_buffer = buffer_base + thread * per_thread;
    acc_t* dy_buffer = columns_buffer + column_elems;
    acc_t* grad_acc = dy_buffer + dy_elems;
    acc_t* weight_grad = grad_acc + grad_acc_elems;
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = p.group_first(group, g.batch);
      const int64_t count = p.group_count(group, g.batch);
      // Where this group's input gradient accumulates.
      acc_t* dx_acc = nullptr;
      if (need_input_grad) {
        if constexpr (same_type) {
          dx_acc = dx_ptr + first * image_elems;
        } else {
          dx_acc = grad_acc;
        }
        if (!input_as_columns) std::fill(dx_acc, dx_acc + count * image_elems, acc_t(0));
      }
      for_each_tile(g, p, group, [&](const Tile& t) {
        const int64_t n = t.columns(g);
        const int64_t per_image = (t.oh_end - t.oh_begin) * g.out_w;
        // dY of the tile as an [O, n] matrix.
        const acc_t* dy_tile;
        int64_t ld_dy;
        if constexpr (same_type) {
          if (dy_in_place) {
            dy_tile = dy_ptr + t.first * O * L + t.oh_begin * g.out_w;
            ld_dy = L;
          }
        }
        if (!dy_in_place) {
          load_tile_runs(dy_ptr, tile_runs(g, t, O), t.first, t.count, dy_buffer);
          dy_tile = dy_buffer;
          ld_dy = n;
        }
        if (need_weight_grad) {
          const auto [cols, ld] = tile_columns<scalar_t, acc_t>(x_ptr, g, t, columns_buffer);
          add_weight_grad_from_columns(g, n, dy_tile, ld_dy, cols, ld, weight_grad);
        }
        if (!need_input_grad) return;
        if (input_as_columns) {
          // 1x1 stride 1: the column gradient is the input gradient (no overlap, no adds).
          acc_t* dst = reinterpret_cast<acc_t*>(dx_ptr) + t.first * image_elems + t.oh_begin * g.out_w;
          column_grad_from_dy(g, n, w_ptr, dy_tile, ld_dy, dst, L,
                              &packed_weight);
          return;
        }
        column_grad_from_dy(g, n, w_ptr, dy_tile, ld_dy, columns_buffer, n, &packed_weight);
        for (int64_t i = 0; i < t.count; ++i) {
          acc_t* image_grad = dx_acc + (t.first - first + i) * image_elems;
          for (int64_t c = 0; c < C; ++c) {
            col2im_band_add(columns_buffer + c * g.kernel_area() * n + i * per_image, n, g,
                            t.oh_begin, t.oh_end, image_grad + c * g.in_area());
          }
        }
      });
      if constexpr (!same_type) {
        if (need_input_grad) {
          scalar_t* dst = dx_ptr + first * image_elems;
          for (int64_t e = 0; e < count * image_elems; ++e) dst[e] = static_cast<scalar_t>(dx_acc[e]);
        }
      }
    }
  });

  if (need_weight_grad) {
    // Thread accumulators summed in thread order.
    acc_t* total = grad_weight_acc.mutable_data_ptr<acc_t>();
    for (int64_t thread = 0; thread < p.threads; ++thread) {
      const acc_t* part = buffer_base + thread * per_thread + column_elems + dy_elems + grad_acc_elems;
      for (int64_t e = 0; e < O * Kg; ++e) total[e] += part[e];
    }
  }
}

#define CONVKIT_INSTANTIATE_BANDS(scalar_t)                                                   \
  template void bands_forward<scalar_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                        const Conv2dGeometry&, const TilePlan&, at::Tensor&);   \
  template void bands_backward<scalar_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                         const Conv2dGeometry&, const TilePlan&, bool, bool,      \
                                         at::Tensor&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_BANDS)
#undef CONVKIT_INSTANTIATE_BANDS

}  // namespace convkit::cpu_conv2d
