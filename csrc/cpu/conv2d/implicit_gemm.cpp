// The implicit GEMM path's forward (the algorithm: implicit_gemm.h): per image, its planes
// copied once with a trailing zero each, the kernel over blocks of output channels, and the
// [L, O] result transposed into the output's planes with the bias.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../parallel.h"
#include "implicit_gemm.h"
#include "kernels.h"
#include "relayout.h"
#include "simd.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

template <typename scalar_t>
void implicit_gemm_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           const TilePlan& p, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const GatherTable table = make_gather_table(g);
  const ImplicitGemmLayout d = make_implicit_gemm_layout(g, table);
  const std::vector<acc_t> weight_t =
      weight_by_tap(weight_acc.const_data_ptr<acc_t>(), O, K, d.padded_o);
  const int64_t plane_elems = g.in_channels * table.plane_stride;
  const int64_t per_thread = plane_elems + d.padded_l * d.padded_o;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  parallel_for_slots(0, g.batch, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* planes = buffer_base + thread * per_thread;
    acc_t* out_t = planes + plane_elems;
    for (int64_t b = begin; b < end; ++b) {
      copy_planes(x_ptr + b * image_elems, g, planes);
      with_implicit_block(d.block, [&](auto block) {
        implicit_forward_image<acc_t, decltype(block)::value>(planes, d, K, L, weight_t.data(),
                                                            out_t);
      });
      store_output_image(out_t, O, L, d.padded_o, bias_ptr, y_ptr + b * O * L);
    }
  });
}

#define CONVKIT_INSTANTIATE_IMPLICIT_GEMM(scalar_t)                                      \
  template void implicit_gemm_forward<scalar_t>(const at::Tensor&, const at::Tensor&,     \
                                                const at::Tensor&, const Conv2dGeometry&, \
                                                const TilePlan&, at::Tensor&);
CONVKIT_FOR_EACH_CONV_TYPE(CONVKIT_INSTANTIATE_IMPLICIT_GEMM)
#undef CONVKIT_INSTANTIATE_IMPLICIT_GEMM

}  // namespace convkit::cpu_conv2d
