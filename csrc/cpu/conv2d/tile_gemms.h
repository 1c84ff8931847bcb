// The GEMMs on a tile's [K, n] column matrix (tiles.h: tile_columns), one per group, and the
// conv weight packed once per call for them.
//
// Why the packed weight: every tile of the bands and images paths multiplies the whole
// weight, and the packed GEMM (packed_gemm.h) packs its A operand for every product: a
// 256-channel 3x3 layer re-packed its 2.4 MB weight for each 14x14 image. Packed once per
// call (pack_weight_panels, panels in parallel) and read by every thread, the tiles' products
// start from the panels (multiply_prepacked); a product over all threads (the shared tiles',
// a single band's) shares one packed weight between them, where cpu::gemm has each thread
// pack it for its columns. Only for float on the packed GEMM; elsewhere the PackedWeight is
// empty and the GEMMs pack per product.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../conv2d.h"
#include "../gemm.h"
#include "../parallel.h"
#include "band_columns.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

// One group's weight as the A operand of its products, in the packed GEMM's row panels:
// W_g [Og, Kg] for the output, W_g^T [Kg, Og] for the column gradient; group g's panels at
// panels + g * packed_a_floats(rows, depth). Empty (panels undefined): not packed.
struct PackedWeight {
  at::Tensor panels;
  int64_t rows = 0;
  int64_t depth = 0;
  bool empty() const { return !panels.defined(); }
};

// The weight [O, Kg] packed as the output's A (transposed = false) or the column gradient's
// (transposed = true), when the products run on the packed GEMM; empty otherwise.
template <typename acc_t>
PackedWeight pack_weight_panels(const at::Tensor& like, const acc_t* weight,
                                const Conv2dGeometry& g, bool transposed) {
  PackedWeight packed;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (!cpu::use_packed_gemm()) return packed;
    namespace pg = cpu::packed_gemm;
    const int64_t Og = g.out_channels / g.groups;
    const int64_t Kg = g.column_rows() / g.groups;
    packed.rows = transposed ? Kg : Og;
    packed.depth = transposed ? Og : Kg;
    const int64_t group_floats = pg::packed_a_floats(packed.rows, packed.depth);
    packed.panels = scratch<float>(like, g.groups * group_floats);
    float* dst = packed.panels.mutable_data_ptr<float>();
    const int64_t panels = (packed.rows + pg::kPanelRows - 1) / pg::kPanelRows;
    parallel_for(0, g.groups * panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t grp = i / panels;
        const int64_t row0 = (i % panels) * pg::kPanelRows;
        const pg::Operand a{weight + grp * Og * Kg, Kg, transposed};
        pg::pack_a(a, row0, std::min(pg::kPanelRows, packed.rows - row0), 0, packed.depth,
                   dst + grp * group_floats + row0 * packed.depth);
      }
    });
  }
#endif
  (void)like, (void)weight, (void)g, (void)transposed;
  return packed;
}

// C [rows, n] (ldc) = A_grp @ op(B) (B [depth, n], or [n, depth] when transposed_b; ld ldb)
// with group grp's packed A: on the calling thread inside a parallel region (the tiles), over
// the caller's threads outside one (a single tile; the shared tiles), each taking a
// contiguous range of C's column panels, as cpu::gemm would. False (nothing done) where the
// weight is not packed.
template <typename acc_t>
bool multiply_packed_weight(const PackedWeight* packed, int64_t grp, int64_t n, const acc_t* b,
                            int64_t ldb, bool transposed_b, acc_t* c, int64_t ldc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (packed == nullptr || packed->empty()) return false;
    namespace pg = cpu::packed_gemm;
    const pg::DepthSegment whole{0, packed->depth};
    const float* panels = packed->panels.const_data_ptr<float>() +
                          grp * pg::packed_a_floats(packed->rows, packed->depth);
    auto columns = [&](int64_t col_begin, int64_t col_end) {
      const float* b_part = transposed_b ? b + col_begin * ldb : b + col_begin;
      pg::multiply_prepacked(packed->rows, col_end - col_begin, panels, packed->depth, &whole, 1,
                             pg::Operand{b_part, ldb, transposed_b}, c + col_begin, ldc);
    };
    cpu::for_column_panel_ranges(packed->rows, n, packed->depth, columns);
    return true;
  }
#endif
  (void)packed, (void)grp, (void)n, (void)b, (void)ldb, (void)transposed_b, (void)c, (void)ldc;
  return false;
}

// The output [O, n] = W @ columns (columns [K, n], ld `ld`); `packed`: the weight packed as
// the output's A (pack_weight_panels(..., false)), or null ...
template <typename acc_t>
void output_from_columns(const Conv2dGeometry& g, int64_t n, const acc_t* weight,
                         const acc_t* columns, int64_t ld, acc_t* out, int64_t ldc,
                         const PackedWeight* packed = nullptr) {
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = g.column_rows() / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    if (multiply_packed_weight(packed, grp, n, columns + grp * Kg * ld, ld, false,
                               out + grp * Og * ldc, ldc)) {
      continue;
    }
    cpu::gemm<acc_t>(false, false, Og, n, Kg, acc_t(1), weight + grp * Og * Kg, Kg,
                     columns + grp * Kg * ld, ld, acc_t(0), out + grp * Og * ldc, ldc);
  }
}

// Whether a tile's forward GEMM reads its columns as ColumnPanels written by im2col
// (output_by_column_panels): where the weight is packed (float on the packed GEMM) and the
// columns are a copy (not a 1x1 stride-1 conv's input planes).
inline bool uses_column_panels(const PackedWeight& packed, const Conv2dGeometry& g) {
  return !packed.empty() && !reads_input_as_columns(g);
}

// Floats of output_by_column_panels' panel buffer for tiles of up to `columns` columns.
inline int64_t column_panel_buffer_floats(const Conv2dGeometry& g, int64_t columns) {
  const int64_t channels = std::min(column_panel_block_channels(g), g.in_channels / g.groups);
  return column_panel_floats(channels * g.kernel_area(), columns);
}

// The output [O, n] of tile t (ldc), the weight packed as the output's A: block by block of
// column_panel_block_channels input channels, im2col writes that block's column rows as
// ColumnPanels into `panels` (column_panel_buffer_floats) and the GEMM adds their product
// (over the caller's threads outside a parallel region, as output_from_columns). A block's
// columns (<= ~384 KiB) stay in L2 between their im2col and their product, where the whole
// tile's (1.6 MiB at 1152 rows) went through L3.
template <typename scalar_t, typename acc_t>
void output_by_column_panels(const scalar_t* input, const Conv2dGeometry& g, const Tile& t,
                             acc_t* panels, acc_t* out, int64_t ldc, const PackedWeight& packed) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    namespace pg = cpu::packed_gemm;
    static_assert(kColumnPanelWidth == pg::kPanelColumns, "im2col writes the GEMM's B panels");
    static_assert(kColumnPanelBlockRows == pg::kDepthBlock, "a block is one GEMM depth block");
    const int64_t n = t.columns(g);
    const int64_t ka = g.kernel_area();
    const int64_t Cg = g.in_channels / g.groups;
    const int64_t Og = g.out_channels / g.groups;
    const int64_t Kg = Cg * ka;
    const int64_t block = column_panel_block_channels(g);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const float* a = packed.panels.const_data_ptr<float>() + grp * pg::packed_a_floats(Og, Kg);
      float* c = out + grp * Og * ldc;
      for (int64_t c0 = 0; c0 < Cg; c0 += block) {
        const int64_t channels = std::min(block, Cg - c0);
        const int64_t rows = channels * ka;
        const int64_t panel_stride = rows * kColumnPanelWidth;
        tile_column_panels(input, g, t, grp * Cg + c0, channels, panels);
        cpu::for_column_panel_ranges(Og, n, rows, [&](int64_t col_begin, int64_t col_end) {
          pg::multiply_packed_operands(Og, col_end - col_begin, rows, a + c0 * ka * pg::kPanelRows,
                                       Kg * pg::kPanelRows,
                                       panels + (col_begin / kColumnPanelWidth) * panel_stride,
                                       panel_stride, c + col_begin, ldc, c0 == 0);
        });
      }
    }
    return;
  }
#endif
  (void)input, (void)g, (void)t, (void)panels, (void)out, (void)ldc, (void)packed;
  TORCH_CHECK(false, "convkit: column panels need float on the packed GEMM (AVX-512)");
}

// ... the weight gradient [O, Kg] += dY @ columns^T (dY [O, n], ld ld_dy), ...
template <typename acc_t>
void add_weight_grad_from_columns(const Conv2dGeometry& g, int64_t n, const acc_t* dy,
                                  int64_t ld_dy, const acc_t* columns, int64_t ld,
                                  acc_t* weight_grad) {
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = g.column_rows() / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    cpu::gemm<acc_t>(false, true, Og, Kg, n, acc_t(1), dy + grp * Og * ld_dy, ld_dy,
                     columns + grp * Kg * ld, ld, acc_t(1), weight_grad + grp * Og * Kg, Kg);
  }
}

// ... and the column gradient [K, n] = W^T @ dY (a 1x1 stride-1 conv's: the input gradient);
// `packed`: the weight packed as the column gradient's A (pack_weight_panels(..., true)), or
// null.
template <typename acc_t>
void column_grad_from_dy(const Conv2dGeometry& g, int64_t n, const acc_t* weight, const acc_t* dy,
                         int64_t ld_dy, acc_t* column_grad, int64_t ldc,
                         const PackedWeight* packed = nullptr) {
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = g.column_rows() / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    if (multiply_packed_weight(packed, grp, n, dy + grp * Og * ld_dy, ld_dy, false,
                               column_grad + grp * Kg * ldc, ldc)) {
      continue;
    }
    cpu::gemm<acc_t>(true, false, Kg, n, Og, acc_t(1), weight + grp * Og * Kg, Kg,
                     dy + grp * Og * ld_dy, ld_dy, acc_t(0), column_grad + grp * Kg * ldc, ldc);
  }
}

}  // namespace convkit::cpu_conv2d
