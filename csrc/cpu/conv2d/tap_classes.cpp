// The tap classes path: the forward and the input gradient of a stride-1 conv on small maps
// (ResNet's 3x3 pad-1 layers at 4x4 and 2x2) without the products with padding zeros. im2col
// gives every output position all kH*kW taps, so on a 2x2 map 5 of a 3x3 kernel's 9 taps
// multiply padding (56% of the products; 31% at 4x4, 18% at 7x7), which oneDNN skips and our
// GEMM cannot.
//
// Output rows fall into groups of consecutive rows with the same valid kernel rows
// [kh_begin, kh_end) (for a 3x3 pad 1: the top row, the middle ones, the bottom row), columns
// likewise; a class is a row group times a column group: a rectangle of positions in every
// image, all with the same valid taps. Each class is one GEMM, out[O, class positions] =
// W[:, class taps] @ columns[class taps, class positions], over only the valid taps:
//   - the weight is re-laid tap-major (depth index (kh * kW + kw) * C + c) and packed once per
//     call into the packed GEMM's row panels (packed_gemm.h: multiply_prepacked), so a
//     class's taps are a few contiguous depth segments of it (one per valid kernel row, or
//     one in all when the class spans whole kernel rows): no per-class weight copy;
//   - its columns are copied from the input planes through an offset table per class
//     (ClassTable), rows in the class's tap order (no padding entries to write or multiply).
// All threads work on one tile of images at a time (the shared tiles' plan, tiles.h): the
// classes' columns channel by channel in parallel, then each thread a range of the weight's row
// panels against every class (the weight streams from memory once per tile, not once per
// thread: 5.4x its size for a 3x3 on 4x4 maps, over all classes), then the outputs into the
// planes with the bias, channels in parallel.
// The input gradient of such a conv is itself a stride-1 conv (transposed_geometry, tiles.h):
// of dY with the kernel turned half a circle and its channels swapped, padding k - 1 - pad;
// it runs on the same classes (ResNet's 3x3 pad 1: a 3x3 pad 1 again).
// float only, on AVX-512 builds with our packed GEMM (path.h: tap_classes_fit).
// Floor: the micro-kernel's rate on the valid products; the weight's packing (one pass,
// parallel) is the fixed cost per call.
#if defined(__AVX512F__)

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../column_buffer.h"
#include "../packed_gemm.h"
#include "../parallel.h"
#include "kernels.h"
#include "relayout.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

namespace {

using cpu::packed_gemm::DepthSegment;
using cpu::packed_gemm::kPanelRows;

// One class: the positions [row_begin, row_end) x [col_begin, col_end) of every image and
// the kernel rows and columns valid at all of them.
struct TapClass {
  AxisGroup rows, cols;
  int64_t positions() const { return (rows.end - rows.begin) * (cols.end - cols.begin); }
  int64_t taps() const { return (rows.k_end - rows.k_begin) * (cols.k_end - cols.k_begin); }
};

// The class's taps as depth segments of the tap-major weight (C channels per tap), merged
// where they touch.
std::vector<DepthSegment> class_segments(const TapClass& t, int64_t kernel_w, int64_t C) {
  std::vector<DepthSegment> segments;
  for (int64_t kh = t.rows.k_begin; kh < t.rows.k_end; ++kh) {
    const int64_t begin = (kh * kernel_w + t.cols.k_begin) * C;
    const int64_t length = (t.cols.k_end - t.cols.k_begin) * C;
    if (!segments.empty() && segments.back().begin + segments.back().length == begin) {
      segments.back().length += length;
    } else {
      segments.push_back({begin, length});
    }
  }
  return segments;
}

// The weight [O, C, kH, kW] re-laid tap-major and packed into row panels over the whole depth
// K = kH * kW * C (packed_a_floats(O, K) floats), panels in parallel: each panel's rows go
// through a per-thread [kPanelRows, K] buffer (L2), one pass over the weight.
// fill_row(row, dst) writes the conv's weight row `row` tap-major (K values) into dst.
template <typename FillRow>
void pack_weight_tap_major(int64_t rows_total, int64_t K, float* packed, const FillRow& fill_row) {
  const int64_t panels = (rows_total + kPanelRows - 1) / kPanelRows;
  parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kPanelRows * K);
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t width = std::min<int64_t>(kPanelRows, rows_total - panel * kPanelRows);
      for (int64_t r = 0; r < width; ++r) fill_row(panel * kPanelRows + r, rows.data() + r * K);
      cpu::packed_gemm::pack_a(cpu::packed_gemm::Operand{rows.data(), K, false}, 0, width, 0, K,
                               packed + panel * K * kPanelRows);
    }
  });
}

// A class's entries for the images of a tile: for each of its n = count * positions columns
// (image i at i * positions, its rectangle row-major) the offset of the position from the
// tile's first image, in the output (output_offsets) and, per tap, in the input at channel 0
// (input_offsets[j * n + e], taps kh-major): the copies below then run over whole rows of n
// entries instead of runs of the rectangle's width (1-2 values on 4x4 and 2x2 maps).
// int32 (path.h's tap_classes_fit bounds a tile's input and output below 2^31 values): half
// the table's bytes.
struct ClassTable {
  std::vector<int32_t> input_offsets, output_offsets;
};

ClassTable class_table(const Conv2dGeometry& g, const TapClass& t, int64_t count) {
  const int64_t n = count * t.positions();
  const int64_t input_image = g.in_channels * g.in_area();
  const int64_t output_image = g.out_channels * g.out_area();
  ClassTable table{std::vector<int32_t>(t.taps() * n), std::vector<int32_t>(n)};
  int64_t e = 0;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t oh = t.rows.begin; oh < t.rows.end; ++oh) {
      for (int64_t ow = t.cols.begin; ow < t.cols.end; ++ow, ++e) {
        table.output_offsets[e] = static_cast<int32_t>(i * output_image + oh * g.out_w + ow);
        int64_t j = 0;
        for (int64_t kh = t.rows.k_begin; kh < t.rows.k_end; ++kh) {
          for (int64_t kw = t.cols.k_begin; kw < t.cols.k_end; ++kw, ++j) {
            table.input_offsets[j * n + e] = static_cast<int32_t>(
                i * input_image + (oh - g.pad_h + kh) * g.in_w + (ow - g.pad_w + kw));
          }
        }
      }
    }
  }
  return table;
}

// Row j * C + c of a class's columns (channel c under the class's j-th tap) for the tile's
// images (x at its first image).
void class_column_row(const float* x, const Conv2dGeometry& g, const ClassTable& table,
                      int64_t n, int64_t j, int64_t c, float* __restrict dst) {
  const int32_t* __restrict offsets = table.input_offsets.data() + j * n;
  const float* __restrict plane = x + c * g.in_area();
  for (int64_t e = 0; e < n; ++e) dst[e] = plane[offsets[e]];
}

// Channels [o_begin, o_end) of a class's [O, n] output (nullptr: no valid taps, zeros) into
// the output planes (y at the tile's first image), bias added.
void store_class(const float* out, const Conv2dGeometry& g, const ClassTable& table, int64_t n,
                 const float* bias, int64_t o_begin, int64_t o_end, float* y) {
  const int32_t* __restrict offsets = table.output_offsets.data();
  for (int64_t o = o_begin; o < o_end; ++o) {
    const float b = bias != nullptr ? bias[o] : 0.0f;
    float* __restrict plane = y + o * g.out_area();
    if (out == nullptr) {
      for (int64_t e = 0; e < n; ++e) plane[offsets[e]] = b;
    } else {
      const float* __restrict src = out + o * n;
      for (int64_t e = 0; e < n; ++e) plane[offsets[e]] = src[e] + b;
    }
  }
}

// y = the conv of x (both NCHW, of g's shapes) with the weight packed tap-major in
// packed_weight (packed_a_floats(O, K) floats), bias added when given.
void run_tap_classes(const at::Tensor& like, const float* x_ptr, const float* packed_weight,
                     const Conv2dGeometry& g, const TilePlan& p, const float* bias_ptr,
                     float* y_ptr) {
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const std::vector<AxisGroup> row_groups = axis_groups(g.out_h, g.in_h, g.kernel_h, g.pad_h);
  const std::vector<AxisGroup> col_groups = axis_groups(g.out_w, g.in_w, g.kernel_w, g.pad_w);
  std::vector<TapClass> classes;
  std::vector<std::vector<DepthSegment>> segments;
  for (const AxisGroup& rows : row_groups) {
    for (const AxisGroup& cols : col_groups) {
      classes.push_back({rows, cols});
      segments.push_back(class_segments(classes.back(), g.kernel_w, g.in_channels));
    }
  }
  const int64_t C = g.in_channels;
  const int64_t column_elems = K * p.columns;
  at::Tensor buffers = scratch<float>(like, column_elems + O * p.columns);
  record_column_buffer(column_elems * int64_t(sizeof(float)));
  float* columns = buffers.mutable_data_ptr<float>();
  float* out = columns + column_elems;
  const int64_t classes_count = static_cast<int64_t>(classes.size());
  const int64_t panels = (O + kPanelRows - 1) / kPanelRows;
  for (int64_t group = 0; group < p.image_groups; ++group) {
    const int64_t first = p.group_first(group, g.batch);
    const int64_t count = p.group_count(group, g.batch);
    const float* x_tile = x_ptr + first * C * g.in_area();
    float* y_tile = y_ptr + first * O * g.out_area();
    // Each class's table, columns at column_start[k] and output at out_start[k].
    std::vector<ClassTable> tables;
    std::vector<int64_t> widths, column_start, out_start;
    int64_t column_total = 0, out_total = 0;
    for (const TapClass& t : classes) {
      tables.push_back(class_table(g, t, count));
      widths.push_back(count * t.positions());
      column_start.push_back(column_total);
      out_start.push_back(out_total);
      column_total += t.taps() * C * widths.back();
      out_total += O * widths.back();
    }
    // Channel by channel, every class's rows of it: the channel's planes (one cache line per
    // image on a 4x4 map) stay in L1 for all the taps that read them (row by row, they were
    // evicted by the column writes between taps: 18% of the 256-channel 4x4 layer's time).
    parallel_for(0, C, grain_for(K / C * count * g.out_area()), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t k = 0; k < classes_count; ++k) {
          for (int64_t j = 0; j < classes[k].taps(); ++j) {
            class_column_row(x_tile, g, tables[k], widths[k], j, c,
                             columns + column_start[k] + (j * C + c) * widths[k]);
          }
        }
      }
    });
    // Each thread its row panels of the weight against every class: the weight streams once
    // per tile whatever the thread count.
    parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      const int64_t r0 = begin * kPanelRows;
      const int64_t rows = std::min(O, end * kPanelRows) - r0;
      for (int64_t k = 0; k < classes_count; ++k) {
        if (classes[k].taps() == 0) continue;
        const int64_t n = widths[k];
        cpu::packed_gemm::multiply_prepacked(
            rows, n, packed_weight + begin * K * kPanelRows, K, segments[k].data(),
            static_cast<int64_t>(segments[k].size()),
            cpu::packed_gemm::Operand{columns + column_start[k], n, false},
            out + out_start[k] + r0 * n, n);
      }
    });
    parallel_for(0, O, grain_for(count * g.out_area()), [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < classes_count; ++k) {
        const float* class_out = classes[k].taps() == 0 ? nullptr : out + out_start[k];
        store_class(class_out, g, tables[k], widths[k], bias_ptr, begin, end, y_tile);
      }
    });
  }
}

}  // namespace

void tap_classes_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                         const at::Tensor& bias_acc, const Conv2dGeometry& g, const TilePlan& p,
                         at::Tensor& output) {
  const int64_t C = g.in_channels;
  const int64_t kA = g.kernel_area();
  const int64_t K = C * kA;
  at::Tensor packed = scratch<float>(x, cpu::packed_gemm::packed_a_floats(g.out_channels, K));
  const float* weight = weight_acc.const_data_ptr<float>();
  // Row o: the [C, kA] matrix transposed.
  pack_weight_tap_major(g.out_channels, K, packed.mutable_data_ptr<float>(),
                        [&](int64_t o, float* dst) {
    transpose_matrix<false>(weight + o * K, kA, C, kA, dst, C);
  });
  run_tap_classes(x, x.const_data_ptr<float>(), packed.const_data_ptr<float>(), g, p,
                  bias_acc.defined() ? bias_acc.const_data_ptr<float>() : nullptr,
                  output.mutable_data_ptr<float>());
}

void tap_classes_input_grad(const at::Tensor& dy, const at::Tensor& weight_acc,
                            const Conv2dGeometry& g, at::Tensor& grad_input) {
  const Conv2dGeometry t = transposed_geometry(g);
  const int64_t O = g.out_channels;
  const int64_t C = g.in_channels;
  const int64_t kA = g.kernel_area();
  const int64_t K = O * kA;
  at::Tensor packed = scratch<float>(dy, cpu::packed_gemm::packed_a_floats(C, K));
  const float* weight = weight_acc.const_data_ptr<float>();
  // Row c, tap t' (the kernel turned half a circle: tap kA - 1 - t'), channel o.
  pack_weight_tap_major(C, K, packed.mutable_data_ptr<float>(), [&](int64_t c, float* dst) {
    for (int64_t o = 0; o < O; ++o) {
      const float* taps = weight + (o * C + c) * kA;
      for (int64_t tap = 0; tap < kA; ++tap) dst[tap * O + o] = taps[kA - 1 - tap];
    }
  });
  run_tap_classes(dy, dy.const_data_ptr<float>(), packed.const_data_ptr<float>(), t,
                  plan_shared_tiles(t, sizeof(float), team_size()), nullptr,
                  grad_input.mutable_data_ptr<float>());
}

}  // namespace convkit::cpu_conv2d

#endif  // __AVX512F__
