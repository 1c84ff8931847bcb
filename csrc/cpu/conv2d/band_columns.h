// The band path's column matrix of a tile (im2col) and its gradient's way back (col2im), row by
// row of the band's output rows (bands.cpp; the images path's 1x1 stride-1 tiles use
// tile_columns too).
//
// im2col writes through a destination: a row-major [K, n] matrix (RowMajorColumns), or the
// packed GEMM's B panels (ColumnPanels: 32 columns each, [K][32], the layout
// packed_gemm::pack_b makes), so that the forward's GEMM reads the columns where im2col wrote
// them instead of copying them into panels again (pack_b's second pass over the column
// matrix; docs/performance-notes.md). The forward writes a block of channels at a time
// (tile_gemms.h: output_by_column_panels), so a block's columns are still in L2 when its
// product reads them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../../conv2d.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

// A "same" conv of unit stride and dilation (out_w == in_w: ResNet's 3x3 pad-1 layers): tap
// (kh, kw)'s column row over consecutive output rows is the plane itself shifted by (kh -
// pad_h) * W + (kw - pad_w), except at the entries whose input column falls off the row's
// edge, which that shift would read from the neighbouring row and which must be zero.
inline bool shifted_plane_columns(const Conv2dGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.out_w == g.in_w;
}

// Tap (kh, kw) of a shifted_plane_columns conv over output rows [oh_begin, oh_end): its
// column entry e (flat output index oh * W + ow) pairs with plane[e + shift]. Output rows
// [valid_begin, valid_end) have their input row inside the image; within them the entries
// [first, last) have their plane index inside the plane, and the edge entries (output columns
// [0, left) and [right, W): the input column ow + dw is off the row) pair with nothing, the
// shift reading them from the neighbouring row. [first, last) leaves out only edge entries.
struct ShiftedTap {
  int64_t valid_begin, valid_end, shift, first, last, left, right;
  bool empty() const { return valid_begin >= valid_end; }
};

inline ShiftedTap shifted_tap(const Conv2dGeometry& g, int64_t kh, int64_t kw, int64_t oh_begin,
                              int64_t oh_end) {
  const int64_t W = g.in_w;
  const int64_t dh = kh - g.pad_h;
  const int64_t dw = kw - g.pad_w;
  ShiftedTap t;
  t.valid_begin = std::max(oh_begin, -dh);
  t.valid_end = std::min(oh_end, g.in_h - dh);
  t.shift = dh * W + dw;
  t.first = std::max(t.valid_begin * W, -t.shift);
  t.last = std::min(t.valid_end * W, g.in_area() - t.shift);
  t.left = std::min(std::max<int64_t>(-dw, 0), W);
  t.right = std::max<int64_t>(std::min(W - dw, W), 0);
  return t;
}

// fn(e) for each of the tap's edge entries e (flat output index). Column by column down the
// rows: a loop along a row of 1-2 entries would be a memset call each (GCC's loop
// distribution), which cost more than the copy.
template <typename Fn>
void for_each_edge_entry(const ShiftedTap& t, int64_t W, const Fn& fn) {
  for (int64_t ow = 0; ow < t.left; ++ow) {
    for (int64_t oh = t.valid_begin; oh < t.valid_end; ++oh) fn(oh * W + ow);
  }
  for (int64_t ow = t.right; ow < W; ++ow) {
    for (int64_t oh = t.valid_begin; oh < t.valid_end; ++oh) fn(oh * W + ow);
  }
}

// dst[i] = src[i * stride] for i < count, converted to acc_t.
template <typename scalar_t, typename acc_t>
inline void copy_strided(const scalar_t* __restrict src, int64_t stride, int64_t count,
                         acc_t* __restrict dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[i]);
  } else if (stride == 2) {
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[2 * i]);
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[i * stride]);
  }
}

// im2col's destinations: entry (k, j) is row k (c * kernel_area + tap) of column j (an output
// position of the tile). copy(k, j, count, src, stride) writes entries j .. j + count - 1 of
// row k from src[0], src[stride], ...; zero(k, j, count) zeroes them; zero_entry(k, j) one.
// A row-major [K, n] matrix with leading dimension ld ...
template <typename acc_t>
struct RowMajorColumns {
  acc_t* data;
  int64_t ld;
  acc_t* at(int64_t k, int64_t j) const { return data + k * ld + j; }
  template <typename scalar_t>
  void copy(int64_t k, int64_t j, int64_t count, const scalar_t* src, int64_t stride) const {
    copy_strided(src, stride, count, at(k, j));
  }
  void zero(int64_t k, int64_t j, int64_t count) const { std::fill_n(at(k, j), count, acc_t(0)); }
  void zero_entry(int64_t k, int64_t j) const { *at(k, j) = acc_t(0); }
};

// Columns per panel of ColumnPanels: packed_gemm::kPanelColumns (checked in tile_gemms.h).
constexpr int64_t kColumnPanelWidth = 32;

// ... or panels of kColumnPanelWidth columns, column j's panel at data + (j /
// kColumnPanelWidth) * panel_stride, [K][kColumnPanelWidth] (panel_stride = K *
// kColumnPanelWidth): runs of a row are cut at the panels' edges.
template <typename acc_t>
struct ColumnPanels {
  acc_t* data;
  int64_t panel_stride;
  acc_t* at(int64_t k, int64_t j) const {
    return data + (j / kColumnPanelWidth) * panel_stride + k * kColumnPanelWidth +
           j % kColumnPanelWidth;
  }
  // fn(out, done, run) for each piece of entries j .. j + count - 1 of row k within one panel:
  // `run` entries at `out`, the first of them entry j + done.
  template <typename Fn>
  void for_panel_runs(int64_t k, int64_t j, int64_t count, const Fn& fn) const {
    for (int64_t done = 0; done < count;) {
      const int64_t run =
          std::min(count - done, kColumnPanelWidth - (j + done) % kColumnPanelWidth);
      fn(at(k, j + done), done, run);
      done += run;
    }
  }
  template <typename scalar_t>
  void copy(int64_t k, int64_t j, int64_t count, const scalar_t* src, int64_t stride) const {
    for_panel_runs(k, j, count, [&](acc_t* panel_row, int64_t done, int64_t run) {
      const scalar_t* from = src + done * stride;
      if (run == kColumnPanelWidth && stride == 1) {
        // A whole panel row, a fixed-size copy (vector moves: the run-length loop became a
        // memmove call per panel row).
        acc_t* __restrict out = panel_row;
        const scalar_t* __restrict in = from;
        for (int64_t i = 0; i < kColumnPanelWidth; ++i) out[i] = static_cast<acc_t>(in[i]);
      } else {
        copy_strided(from, stride, run, panel_row);
      }
    });
  }
  void zero(int64_t k, int64_t j, int64_t count) const {
    for_panel_runs(k, j, count,
                   [](acc_t* out, int64_t, int64_t run) { std::fill_n(out, run, acc_t(0)); });
  }
  void zero_entry(int64_t k, int64_t j) const { *at(k, j) = acc_t(0); }
};

// Floats of a ColumnPanels destination for K rows and n columns (whole panels).
inline int64_t column_panel_floats(int64_t K, int64_t n) {
  return (n + kColumnPanelWidth - 1) / kColumnPanelWidth * kColumnPanelWidth * K;
}

// im2col_band's rows for shifted_plane_columns geometries: per tap, one run over all its
// valid output rows (a copy of the shifted plane), then the edge entries set to zero. Short
// rows (8x8 maps) made the row-by-row copy's bookkeeping cost as much as its GEMM.
template <typename scalar_t, typename Columns>
void im2col_band_shifted(const scalar_t* plane, const Conv2dGeometry& g, int64_t oh_begin,
                         int64_t oh_end, const Columns& dst, int64_t row0, int64_t col0) {
  const int64_t W = g.in_w;
  const int64_t entries = (oh_end - oh_begin) * W;
  // Flat output index e is column col0 + e - base.
  const int64_t base = oh_begin * W;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t k = row0 + kh * g.kernel_w + kw;
      const ShiftedTap t = shifted_tap(g, kh, kw, oh_begin, oh_end);
      if (t.empty()) {
        dst.zero(k, col0, entries);
        continue;
      }
      dst.zero(k, col0, t.valid_begin * W - base);
      dst.zero(k, col0 + t.valid_end * W - base, (oh_end - t.valid_end) * W);
      dst.copy(k, col0 + t.first - base, t.last - t.first, plane + t.shift + t.first, 1);
      for_each_edge_entry(t, W, [&](int64_t e) { dst.zero_entry(k, col0 + e - base); });
    }
  }
}

// Writes the column rows of channel c for output rows [oh_begin, oh_end) of one image into
// dst, rows row0 .. row0 + kernel_area - 1 from column col0 on, converting to the
// destination's type.
template <typename scalar_t, typename Columns>
void im2col_band(const scalar_t* image, const Conv2dGeometry& g, int64_t c, int64_t oh_begin,
                 int64_t oh_end, const Columns& dst, int64_t row0, int64_t col0) {
  const scalar_t* plane = image + c * g.in_area();
  if (shifted_plane_columns(g)) {
    im2col_band_shifted(plane, g, oh_begin, oh_end, dst, row0, col0);
    return;
  }
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t k = row0 + kh * g.kernel_w + kw;
      int64_t ow_begin = 0, ow_end = 0;
      conv_valid_output_range(g.in_w, g.out_w, kw, g.stride_w, g.pad_w, g.dilation_w, &ow_begin,
                              &ow_end);
      const int64_t iw0 = conv_input_coordinate(ow_begin, kw, g.stride_w, g.pad_w, g.dilation_w);
      for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
        const int64_t j = col0 + (oh - oh_begin) * g.out_w;
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        if (ih < 0 || ih >= g.in_h) {
          dst.zero(k, j, g.out_w);
          continue;
        }
        dst.zero(k, j, ow_begin);
        dst.copy(k, j + ow_begin, ow_end - ow_begin, plane + ih * g.in_w + iw0, g.stride_w);
        dst.zero(k, j + ow_end, g.out_w - ow_end);
      }
    }
  }
}

// col2im_band_add for shifted_plane_columns geometries, the transpose of im2col_band_shifted:
// per tap, the edge entries of its column-gradient row (padding: no input element receives
// them) are set to zero, then the row's valid output rows are added into the plane shifted,
// as one run. Each input element still receives its terms in tap order.
template <typename acc_t>
void col2im_band_add_shifted(acc_t* src, int64_t ld, const Conv2dGeometry& g, int64_t oh_begin,
                             int64_t oh_end, acc_t* plane) {
  const int64_t W = g.in_w;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const ShiftedTap t = shifted_tap(g, kh, kw, oh_begin, oh_end);
      if (t.empty()) continue;
      acc_t* run = src + (kh * g.kernel_w + kw) * ld - oh_begin * W;
      for_each_edge_entry(t, W, [run](int64_t e) { run[e] = acc_t(0); });
      acc_t* __restrict dst = plane + t.shift;
      const acc_t* __restrict terms = run;
      for (int64_t e = t.first; e < t.last; ++e) dst[e] += terms[e];
    }
  }
}

// The column gradient of output rows [oh_begin, oh_end) of one image, channel c (row r at
// src + r * ld), added into that channel's input-gradient plane: the transpose of
// im2col_band, element by element in a fixed order. src is scratch: its padding entries may
// be overwritten.
template <typename acc_t>
void col2im_band_add(acc_t* src, int64_t ld, const Conv2dGeometry& g, int64_t oh_begin,
                     int64_t oh_end, acc_t* plane) {
  if (shifted_plane_columns(g)) {
    col2im_band_add_shifted(src, ld, g, oh_begin, oh_end, plane);
    return;
  }
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const acc_t* src_row = src + (kh * g.kernel_w + kw) * ld;
      int64_t ow_begin = 0, ow_end = 0;
      conv_valid_output_range(g.in_w, g.out_w, kw, g.stride_w, g.pad_w, g.dilation_w, &ow_begin,
                              &ow_end);
      const int64_t iw0 = conv_input_coordinate(ow_begin, kw, g.stride_w, g.pad_w, g.dilation_w);
      const int64_t n = ow_end - ow_begin;
      for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        if (ih < 0 || ih >= g.in_h) continue;
        const acc_t* run = src_row + (oh - oh_begin) * g.out_w + ow_begin;
        acc_t* dst = plane + ih * g.in_w + iw0;
        if (g.stride_w == 1) {
          for (int64_t i = 0; i < n; ++i) dst[i] += run[i];
        } else {
          for (int64_t i = 0; i < n; ++i) dst[i * g.stride_w] += run[i];
        }
      }
    }
  }
}

// Rows [c_begin * kernel_area, (c_begin + channels) * kernel_area) of tile t's column matrix
// (input channels c_begin .. c_begin + channels - 1) into dst, their first row at dst's row 0,
// image i of the tile at columns [i * per_image, (i + 1) * per_image).
template <typename scalar_t, typename Columns>
void im2col_tile_channels(const scalar_t* input, const Conv2dGeometry& g, const Tile& t,
                          int64_t c_begin, int64_t channels, const Columns& dst) {
  const int64_t per_image = (t.oh_end - t.oh_begin) * g.out_w;
  for (int64_t i = 0; i < t.count; ++i) {
    const scalar_t* image = input + (t.first + i) * g.in_channels * g.in_area();
    for (int64_t c = 0; c < channels; ++c) {
      im2col_band(image, g, c_begin + c, t.oh_begin, t.oh_end, dst, c * g.kernel_area(),
                  i * per_image);
    }
  }
}

// The column matrix of a tile in `buffer` ([K, n], ld n), or, for a 1x1 stride-1 conv on a
// band of one image in the compute type, the input itself (ld = H*W). Returns the matrix
// and its leading dimension.
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> tile_columns(const scalar_t* input, const Conv2dGeometry& g,
                                              const Tile& t, acc_t* buffer) {
  const int64_t C = g.in_channels;
  const int64_t L = g.out_area();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (t.count == 1 && reads_input_as_columns(g)) {
      return {input + t.first * C * L + t.oh_begin * g.out_w, L};
    }
  }
  const int64_t n = t.columns(g);
  if (reads_input_as_columns(g)) {
    // The tile's input planes side by side: plain copies (im2col_band's per-tap bookkeeping
    // costs more than a 4x4 map's 16 values).
    load_tile_runs(input, tile_runs(g, t, C), t.first, t.count, buffer);
    return {buffer, n};
  }
  im2col_tile_channels(input, g, t, 0, C, RowMajorColumns<acc_t>{buffer, n});
  return {buffer, n};
}

// Rows per block of the forward's column panels: packed_gemm::kDepthBlock (checked in
// tile_gemms.h).
constexpr int64_t kColumnPanelBlockRows = 256;

// Channels per block of the forward's column panels (tile_column_panels): about one depth
// block of the packed GEMM, whole channels.
inline int64_t column_panel_block_channels(const Conv2dGeometry& g) {
  return std::max<int64_t>(1, kColumnPanelBlockRows / std::max<int64_t>(g.kernel_area(), 1));
}

// Rows [c_begin * kernel_area, (c_begin + channels) * kernel_area) of the tile's column matrix
// (input channels c_begin .. c_begin + channels - 1) as ColumnPanels at `panels`
// (column_panel_floats(channels * kernel_area, n) floats), the last panel's columns past n
// zeroed (the micro-kernel multiplies whole panels). Not for reads_input_as_columns
// geometries, whose columns are the input's planes.
template <typename scalar_t, typename acc_t>
void tile_column_panels(const scalar_t* input, const Conv2dGeometry& g, const Tile& t,
                        int64_t c_begin, int64_t channels, acc_t* panels) {
  const int64_t rows = channels * g.kernel_area();
  const int64_t n = t.columns(g);
  const ColumnPanels<acc_t> dst{panels, rows * kColumnPanelWidth};
  im2col_tile_channels(input, g, t, c_begin, channels, dst);
  const int64_t padding = column_panel_floats(1, n) - n;
  for (int64_t k = 0; padding > 0 && k < rows; ++k) dst.zero(k, n, padding);
}

}  // namespace convkit::cpu_conv2d
