// The shared tiles path: image-family layers whose weight matrix is >= 2 MiB (ResNet's
// 512-channel 3x3 convs) on more than one thread. Per-thread tiles would each stream the
// weights through their core's cache for a few hundred columns; here all threads work on one
// tile at a time: the gather and the scatter split over its images, and one GEMM outside any
// parallel region, which runs threaded on the weight packed once per call (tile_gemms.h).
// Floor: the threaded GEMM's rate (~190 GFLOP/s on two cores sharing one packed weight,
// against ~145 as two independent GEMMs: docs/performance-notes.md).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../../column_buffer.h"
#include "../gemm.h"
#include "../parallel.h"
#include "kernels.h"
#include "relayout.h"
#include "tile_gemms.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

template <typename scalar_t>
void shared_tiles_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                          const at::Tensor& bias_acc, const Conv2dGeometry& g,
                          const TilePlan& p, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / g.groups;
  const int64_t Kg = K / g.groups;
  const int64_t image_elems = g.in_channels * g.in_area();
  const GatherTable table = make_gather_table(g);
  const int64_t column_elems = K * p.columns;
  const int64_t plane_elems = g.in_channels * table.plane_stride;
  at::Tensor buffers = scratch<acc_t>(x, column_elems + O * p.columns + p.threads * plane_elems);
  record_column_buffer(column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* columns_t = buffers.mutable_data_ptr<acc_t>();
  acc_t* out = columns_t + column_elems;
  acc_t* planes = out + O * p.columns;
  const PackedWeight packed_weight = pack_weight_panels(x, w_ptr, g, false);
  for (int64_t group = 0; group < p.image_groups; ++group) {
    const int64_t first = p.group_first(group, g.batch);
    const int64_t count = p.group_count(group, g.batch);
    const int64_t n = count * L;
    parallel_for_slots(0, count, 1, p.threads,
                         [&](int64_t begin, int64_t end, int64_t thread) {
      acc_t* image_copy = planes + thread * plane_elems;
      for (int64_t i = begin; i < end; ++i) {
        copy_planes(x_ptr + (first + i) * image_elems, g, image_copy);
        gather_image_columns(image_copy, g, table, columns_t + i * L * K);
      }
    });
    // Outside any parallel region: the GEMM runs on all threads.
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      if (multiply_packed_weight(&packed_weight, grp, n, columns_t + grp * Kg, K, true,
                                 out + grp * Og * n, n)) {
        continue;
      }
      cpu::gemm<acc_t>(false, true, Og, n, Kg, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                       columns_t + grp * Kg, K, acc_t(0), out + grp * Og * n, n);
    }
    const PlaneRuns runs = image_runs(g, O);
    parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) store_runs(out, n, i * L, runs, first + i, bias_ptr, y_ptr);
    });
  }
}

template <typename scalar_t>
void shared_tiles_backward(const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& weight_acc, const Conv2dGeometry& g,
                           const TilePlan& p, bool need_input_grad, bool need_weight_grad,
                           at::Tensor& grad_input, at::Tensor& grad_weight_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const GatherTable table = make_gather_table(g);
  const InputGradientPlan<acc_t> dx_plan =
      make_input_gradient_plan<acc_t>(g, table, weight_acc, need_input_grad);
  const int64_t column_elems = K * p.columns;
  const int64_t plane_elems = g.in_channels * table.plane_stride;
  at::Tensor buffers = scratch<acc_t>(x, column_elems + O * p.columns + p.threads * plane_elems);
  record_column_buffer(column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  scalar_t* dx_ptr = need_input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  // The weight gradient accumulates tile after tile in one GEMM output (zeroed by the caller).
  acc_t* weight_grad = need_weight_grad ? grad_weight_acc.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* columns_t = buffers.mutable_data_ptr<acc_t>();
  acc_t* dy_tile = columns_t + column_elems;
  acc_t* planes = dy_tile + O * p.columns;
  const PlaneRuns dy_runs = image_runs(g, O);
  for (int64_t group = 0; group < p.image_groups; ++group) {
    const int64_t first = p.group_first(group, g.batch);
    const int64_t count = p.group_count(group, g.batch);
    const int64_t n = count * L;
    parallel_for_slots(0, count, 1, p.threads,
                         [&](int64_t begin, int64_t end, int64_t thread) {
      acc_t* image_copy = planes + thread * plane_elems;
      for (int64_t i = begin; i < end; ++i) {
        load_runs(dy_ptr, dy_runs, first + i, dy_tile, n, i * L);
        if (need_weight_grad) {
          copy_planes(x_ptr + (first + i) * image_elems, g, image_copy);
          gather_image_columns(image_copy, g, table, columns_t + i * L * K);
        }
      }
    });
    if (need_weight_grad) add_tile_weight_gradient(g, n, dy_tile, columns_t, weight_grad);
    if (!need_input_grad) continue;
    tile_column_gradient(g, n, dy_tile, dx_plan.weight_tap_major.data(), columns_t);
    parallel_for_slots(0, count, 1, p.threads,
                         [&](int64_t begin, int64_t end, int64_t thread) {
      acc_t* image_buffer = planes + thread * plane_elems;
      for (int64_t i = begin; i < end; ++i) {
        sum_image_columns(columns_t + i * L * K, g, dx_plan.sources, image_buffer,
                          dx_ptr + (first + i) * image_elems);
      }
    });
  }
}

#define CONVKIT_INSTANTIATE_SHARED_TILES(scalar_t)                                          \
  template void shared_tiles_forward<scalar_t>(const at::Tensor&, const at::Tensor&,         \
                                               const at::Tensor&, const Conv2dGeometry&,     \
                                               const TilePlan&, at::Tensor&);                \
  template void shared_tiles_backward<scalar_t>(const at::Tensor&, const at::Tensor&,        \
                                                const at::Tensor&, const Conv2dGeometry&,    \
                                                const TilePlan&, bool, bool, at::Tensor&,    \
                                                at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_SHARED_TILES)
#undef CONVKIT_INSTANTIATE_SHARED_TILES

}  // namespace convkit::cpu_conv2d
