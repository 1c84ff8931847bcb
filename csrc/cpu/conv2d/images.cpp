// The images path, forward: tiles of whole images with narrow output rows (< 8, path.h).
// Each image's column matrix is written transposed, [L, K], by the branch-free gather of
// relayout.h (late layers have rows of 1-4 values, where the bands path's per-row
// bookkeeping costs more than the copy); one GEMM per group per tile reads it as a
// transposed operand. Each thread owns whole tiles (tiles.h balances the images over them).
// A 1x1 stride-1 conv (MobileNet's expansions and projections on 4x4 and 2x2 maps) skips the
// gather: its columns are the images' planes side by side, [K, images * L], one copy of each
// plane (tiles.h), which the GEMM reads as it is (the gather's two passes and the transposed
// operand's packing had cost as much as the GEMM: 384 -> 96 channels at 4x4).
// Floor: the GEMM's rate at [O, K] x [K, images * L]; the gather is one pass over the
// columns, in L2.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../../column_buffer.h"
#include "../gemm.h"
#include "../parallel.h"
#include "band_columns.h"
#include "kernels.h"
#include "relayout.h"
#include "tile_gemms.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

template <typename scalar_t>
void images_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                    const at::Tensor& bias_acc, const Conv2dGeometry& g,
                    const TilePlan& p, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / g.groups;
  const int64_t Kg = K / g.groups;
  const int64_t image_elems = g.in_channels * g.in_area();
  const bool planes_as_columns = reads_input_as_columns(g);
  const GatherTable table = planes_as_columns ? GatherTable{} : make_gather_table(g);
  const int64_t column_elems = K * p.columns;
  const int64_t copy_elems = planes_as_columns ? 0 : g.in_channels * table.plane_stride;
  const int64_t per_thread = column_elems + O * p.columns + copy_elems;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_t = buffer_base + thread * per_thread;
    acc_t* out = columns_t + column_elems;
    acc_t* image_copy = out + O * p.columns;
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = p.group_first(group, g.batch);
      const int64_t count = p.group_count(group, g.batch);
      const int64_t n = count * L;
      if (planes_as_columns) {
        // [K, n]: channel k's row holds the tile's images' planes k one after another (a
        // single image of the compute type is read in place, ld = L).
        const auto [columns, ld] =
            tile_columns<scalar_t, acc_t>(x_ptr, g, Tile{first, count, 0, g.out_h}, columns_t);
        output_from_columns(g, n, w_ptr, columns, ld, out, n);
      } else {
        for (int64_t i = 0; i < count; ++i) {
          copy_planes(x_ptr + (first + i) * image_elems, g, image_copy);
          gather_image_columns(image_copy, g, table, columns_t + i * L * K);
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::gemm<acc_t>(false, true, Og, n, Kg, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                           columns_t + grp * Kg, K, acc_t(0), out + grp * Og * n, n);
        }
      }
      store_tile_runs(out, image_runs(g, O), first, count, bias_ptr, y_ptr);
    }
  });
}

#define CONVKIT_INSTANTIATE_IMAGES(scalar_t)                                                    \
  template void images_forward<scalar_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                         const Conv2dGeometry&, const TilePlan&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_IMAGES)
#undef CONVKIT_INSTANTIATE_IMAGES

}  // namespace convkit::cpu_conv2d
