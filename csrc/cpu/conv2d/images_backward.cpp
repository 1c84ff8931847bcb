// The image family's backward pass: the images path's (GEMMs on gathered columns) and the
// implicit GEMM's (no columns), chosen per gradient by choose_backward (path.h).
//   weight gradient  images: dW += dY @ columns, the columns gathered as in the forward (a
//                    1x1 stride-1 conv's are the tile's input planes side by side, as there);
//                    implicit_gemm: dY transposed to [L, padded_o] rows, then
//                    implicit_weight_grad_image over chunks of whole images (sums in
//                    registers, the bias gradient summed from dY's rows on the way).
//   input gradient   images: dcolumns = dY^T @ W (W's rows tap-major), summed back in gather
//                    form (relayout.h: sum_image_columns); a 1x1 stride-1 conv's dcolumns =
//                    W^T @ dY, [C, n], is the input gradient's planes side by side, copied out
//                    (on 4x4 and 2x2 maps the gather and the sums cost more than the GEMMs);
//                    transposed_implicit_gemm: from the same dY rows, no columns
//                    (transposed_input_grad.h).
// Each thread owns whole tiles of images; weight-gradient partial sums are per thread, the
// bias gradient per (image, channel), both totalled in a fixed order: deterministic for a
// thread count.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../column_buffer.h"
#include "../parallel.h"
#include "band_columns.h"
#include "implicit_gemm.h"
#include "kernels.h"
#include "relayout.h"
#include "simd.h"
#include "tile_gemms.h"
#include "tiles.h"
#include "transposed_input_grad.h"

namespace convkit::cpu_conv2d {

template <typename scalar_t>
bool image_family_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                           const Conv2dGeometry& g, const ConvPlan& plan, at::Tensor& grad_input,
                           at::Tensor& grad_weight_acc, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Kg = K / g.groups;
  const int64_t area = g.in_area();
  const int64_t image_elems = g.in_channels * area;
  const TilePlan& p = plan.tiles;
  const bool need_input_grad = plan.input_grad != ConvPath::kNone;
  const bool need_weight_grad = plan.weight_grad != ConvPath::kNone;
  const GatherTable table = make_gather_table(g);
  const bool planes_as_columns = reads_input_as_columns(g);
  // On an implicit GEMM layer (plan.implicit_gemm_layout) the weight gradient's chunk of
  // images sizes the dY buffer even when only the input gradient is wanted.
  const bool implicit = plan.implicit_gemm_layout;
  const bool transposed = plan.input_grad == ConvPath::kTransposedImplicitGemm;
  const bool gemm_input_grad = plan.input_grad == ConvPath::kImages;
  const bool implicit_weight_grad = plan.weight_grad == ConvPath::kImplicitGemm;
  const InputGradientPlan<acc_t> dx_plan =
      make_input_gradient_plan<acc_t>(g, table, weight_acc, gemm_input_grad && !planes_as_columns);
  const ImplicitGemmLayout d = implicit_weight_grad ? make_implicit_gemm_layout(g, table) : ImplicitGemmLayout{};
  // dY transposed to rows of padded_o channels (both implicit GEMMs read it so).
  const bool dy_rows = implicit_weight_grad || transposed;
  const int64_t padded_o = implicit_weight_grad ? d.padded_o : (O + 15) / 16 * 16;
  const bool gemm_tiles = gemm_input_grad || (need_weight_grad && !implicit);
  const int64_t column_elems = gemm_tiles ? K * p.columns : 0;
  const int64_t dy_elems = gemm_tiles ? O * p.columns : 0;
  // The implicit weight gradient takes the narrow layers' images (< kMinImplicitPositions
  // positions each) in chunks of about kImplicitChunkPositions positions; wider images one at a
  // time (chunks measured no faster there: 16->32 at N=512 0.55 -> 0.57 ms). dY is transposed
  // a chunk at a time, the larger of that and the transposed input gradient's.
  const int64_t weight_chunk = implicit && L < kMinImplicitPositions
                                   ? std::clamp<int64_t>(kImplicitChunkPositions / L, 1, p.images_per_tile)
                                   : 1;
  const int64_t chunk =
      transposed ? std::max(weight_chunk, transposed_chunk_images(g, p.images_per_tile))
                 : weight_chunk;
  // One image's dY rows and a zero row after them (read by taps outside dY).
  const int64_t dy_stride = (L + 1) * padded_o;
  const TransposedLayout tl =
      transposed ? make_transposed_layout(g, padded_o, dy_stride, chunk) : TransposedLayout{};
  const std::vector<acc_t> transposed_weight =
      transposed ? weight_for_transposed(weight_acc.const_data_ptr<acc_t>(), g, tl.padded_c)
                 : std::vector<acc_t>{};
  const int64_t dy_t_elems = dy_rows ? chunk * dy_stride : 0;
  const int64_t sums_elems = transposed ? chunk * area * tl.padded_c : 0;
  const int64_t plane_elems = g.in_channels * table.plane_stride;
  const bool copies_planes =
      implicit_weight_grad || (!planes_as_columns && (need_weight_grad || gemm_input_grad));
  const int64_t image_buffer_elems = copies_planes ? weight_chunk * plane_elems : 0;
  const int64_t weight_grad_elems =
      need_weight_grad ? (implicit ? d.padded_k * d.padded_o : O * Kg) : 0;
  const int64_t per_thread = column_elems + dy_elems + dy_t_elems + sums_elems +
                             image_buffer_elems + weight_grad_elems;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  scalar_t* dx_ptr = need_input_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  auto weight_grad_of = [&](int64_t thread) {
    return buffer_base + thread * per_thread + column_elems + dy_elems + dy_t_elems +
           sums_elems + image_buffer_elems;
  };
  // Only the weight-gradient accumulators and dY's zero rows need zeros; the rest is written
  // before it is read.
  for (int64_t thread = 0; thread < p.threads; ++thread) {
    std::fill(weight_grad_of(thread), weight_grad_of(thread) + weight_grad_elems, acc_t(0));
    acc_t* dy_t = buffer_base + thread * per_thread + column_elems + dy_elems;
    for (int64_t j = 0; dy_rows && j < chunk; ++j) {
      std::fill_n(dy_t + j * dy_stride + L * padded_o, padded_o, acc_t(0));
    }
  }
  // Per (image, channel) sums of dY, totalled in image order below: the same bias gradient on
  // any number of threads.
  const bool bias_from_dy_t = grad_bias != nullptr && implicit_weight_grad;
  std::vector<double> plane_sums(bias_from_dy_t ? g.batch * O : 0);

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_t = buffer_base + thread * per_thread;
    acc_t* dy_tile = columns_t + column_elems;
    acc_t* dy_t = dy_tile + dy_elems;
    acc_t* sums = dy_t + dy_t_elems;
    acc_t* image_buffer = sums + sums_elems;
    acc_t* weight_grad = weight_grad_of(thread);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = p.group_first(group, g.batch);
      const int64_t count = p.group_count(group, g.batch);
      const int64_t n = count * L;
      if (dy_elems > 0) load_tile_runs(dy_ptr, image_runs(g, O), first, count, dy_tile);
      if (dy_rows) {
        for (int64_t i0 = 0; i0 < count; i0 += chunk) {
          const int64_t images = std::min(chunk, count - i0);
          for (int64_t j = 0; j < images; ++j) {
            const int64_t image = first + i0 + j;
            transpose_dy_image(dy_ptr + image * O * L, O, L, padded_o, dy_t + j * dy_stride,
                               bias_from_dy_t ? plane_sums.data() + image * O : nullptr);
          }
          for (int64_t w0 = 0; implicit_weight_grad && w0 < images; w0 += weight_chunk) {
            const int64_t weight_images = std::min(weight_chunk, images - w0);
            for (int64_t j = 0; j < weight_images; ++j) {
              copy_planes(x_ptr + (first + i0 + w0 + j) * image_elems, g,
                          image_buffer + j * plane_elems);
            }
            with_implicit_block(d.block, [&](auto block) {
              implicit_weight_grad_image<acc_t, decltype(block)::value>(
                  image_buffer, plane_elems, weight_images, d, L, dy_t + w0 * dy_stride,
                  dy_stride, weight_grad);
            });
          }
          if (transposed) {
            transposed_input_grad_chunk(tl, images, dy_t, O, transposed_weight.data(), sums);
            for (int64_t j = 0; j < images; ++j) {
              store_output_image(sums + j * area * tl.padded_c, g.in_channels, area,
                                 tl.padded_c, static_cast<const acc_t*>(nullptr),
                                 dx_ptr + (first + i0 + j) * image_elems);
            }
          }
        }
      }
      if (need_weight_grad && !implicit && planes_as_columns) {
        const auto [columns, ld] =
            tile_columns<scalar_t, acc_t>(x_ptr, g, Tile{first, count, 0, g.out_h}, columns_t);
        add_weight_grad_from_columns(g, n, dy_tile, n, columns, ld, weight_grad);
      } else if (need_weight_grad && !implicit) {
        for (int64_t i = 0; i < count; ++i) {
          copy_planes(x_ptr + (first + i) * image_elems, g, image_buffer);
          gather_image_columns(image_buffer, g, table, columns_t + i * L * K);
        }
        add_tile_weight_gradient(g, n, dy_tile, columns_t, weight_grad);
      }
      if (gemm_input_grad && planes_as_columns) {
        column_grad_from_dy(g, n, w_ptr, dy_tile, n, columns_t, n);
        store_tile_runs(columns_t, image_runs(g, g.in_channels), first, count,
                        static_cast<const acc_t*>(nullptr), dx_ptr);
      } else if (gemm_input_grad) {
        tile_column_gradient(g, n, dy_tile, dx_plan.weight_tap_major.data(), columns_t);
        for (int64_t i = 0; i < count; ++i) {
          sum_image_columns(columns_t + i * L * K, g, dx_plan.sources, image_buffer,
                            dx_ptr + (first + i) * image_elems);
        }
      }
    }
  });

  if (need_weight_grad) {
    acc_t* total = grad_weight_acc.mutable_data_ptr<acc_t>();
    for (int64_t thread = 0; thread < p.threads; ++thread) {
      const acc_t* part = weight_grad_of(thread);
      if (implicit) {
        add_tap_major(part, O, K, d.padded_o, total);
      } else {
        for (int64_t e = 0; e < O * Kg; ++e) total[e] += part[e];
      }
    }
  }
  if (!bias_from_dy_t) return false;
  for (int64_t o = 0; o < O; ++o) {
    double sum = 0.0;
    for (int64_t b = 0; b < g.batch; ++b) sum += plane_sums[b * O + o];
    grad_bias[o] = static_cast<scalar_t>(sum);
  }
  return true;
}

#define CONVKIT_INSTANTIATE_IMAGE_FAMILY_BACKWARD(scalar_t)                             \
  template bool image_family_backward<scalar_t>(const at::Tensor&, const at::Tensor&,    \
                                                const at::Tensor&, const Conv2dGeometry&, \
                                                const ConvPlan&, at::Tensor&, at::Tensor&, \
                                                scalar_t*);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_IMAGE_FAMILY_BACKWARD)
#undef CONVKIT_INSTANTIATE_IMAGE_FAMILY_BACKWARD

}  // namespace convkit::cpu_conv2d
