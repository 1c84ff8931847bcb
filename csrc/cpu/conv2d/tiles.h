// How the CPU conv kernels cut their work: tiles of output columns (whole images, or bands of
// output rows of one image), planned so that a tile's columns stay in L2 next to its output
// and all threads' tiles together within CONVKIT_COLUMN_BUDGET_MB. Every thread owns whole
// tiles. The band path's row-wise im2col/col2im of a tile: band_columns.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../../column_buffer.h"
#include "../../conv2d.h"
#include "../block_cache.h"
#include "../gemm.h"
#include "../parallel.h"

namespace convkit::cpu_conv2d {

// Aim for parallel tasks of at least this many elements, so thread start-up stays small.
constexpr int64_t kParallelGrainElements = int64_t(1) << 15;

inline int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(elements_per_task, 1));
}

// Scratch memory of the compute type for `elems` values; callers carve per-thread slices
// out of it (parallel_for_slots names the calling thread's slice).
template <typename acc_t>
at::Tensor scratch(const at::Tensor& like, int64_t elems) {
  return cached_empty({elems}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// A thread's column tile: small enough to stay in L2 next to the output tile (L2 is 512 KiB-
// 2 MiB per core on current x86 server parts) ...
constexpr int64_t kTileBytes = int64_t(384) << 10;
// ... but at least this many columns, so that each weight the GEMM loads is used often
// enough to hide its load: layers with large weight matrices (ResNet's 256-512 channels)
// would otherwise stream megabytes of weights for a few dozen columns.
constexpr int64_t kMinTileColumns = 384;

// How the output columns are cut into tiles.
struct TilePlan {
  int64_t images_per_tile;  // whole images per tile (the image path), or 1 (the band path)
  int64_t rows_per_tile;    // output rows per tile: out_h on the image path
  int64_t bands;            // tiles per image: 1 on the image path
  int64_t image_groups;     // ceil(batch / images_per_tile)
  int64_t columns;          // most columns in one tile
  int64_t threads;          // per-thread buffers to allocate
  bool whole_images() const { return bands == 1; }
  // Image group `group`'s first image and image count: the batch cut into image_groups runs
  // whose sizes differ by at most one (at most images_per_tile), so that threads owning equal
  // numbers of groups own equal numbers of images (to within one).
  int64_t group_first(int64_t group, int64_t batch) const { return group * batch / image_groups; }
  int64_t group_count(int64_t group, int64_t batch) const {
    return group_first(group + 1, batch) - group_first(group, batch);
  }
};

// Tiles for `threads` threads (each has its own buffers).
inline TilePlan plan_tiles(const Conv2dGeometry& g, int64_t acc_size, int64_t threads) {
  TilePlan p;
  p.threads = threads;
  const int64_t L = g.out_area();
  const int64_t column_bytes = std::max<int64_t>(g.column_rows() * acc_size, 1);
  // The column budget (CONVKIT_COLUMN_BUDGET_MB) bounds all threads' tiles together and
  // wins over the preferences above.
  const int64_t budget_columns = column_budget_bytes() / p.threads / column_bytes;
  const int64_t preferred = std::max(kTileBytes / column_bytes, kMinTileColumns);
  const int64_t target = std::max<int64_t>(1, std::min(preferred, budget_columns));
  if (L <= target) {
    // Balance: each thread gets the fewest tiles that keep a tile within the target, and the
    // images are spread evenly over all the tiles (group_first): the threads' shares differ by
    // at most one image. (Taking the largest tile that fits, 21 of 64 images for the 8->16
    // layer, left one thread 42 images and the other 22; tiles of one size with a short last
    // one, 6 + 6 + 6 against 6 + 6 + 2 images of ResNet-18's 128-channel 8x8 layer at N=32,
    // left one thread idle for a fifth of the layer.)
    const int64_t per_thread_images = (g.batch + p.threads - 1) / p.threads;
    const int64_t target_images = std::max<int64_t>(1, target / L);
    const int64_t tiles_per_thread = (per_thread_images + target_images - 1) / target_images;
    const int64_t tiles = std::max<int64_t>(1, std::min(g.batch, p.threads * tiles_per_thread));
    p.images_per_tile = std::max<int64_t>(1, (g.batch + tiles - 1) / tiles);
    p.image_groups = std::min(tiles, g.batch);
    p.rows_per_tile = g.out_h;
  } else {
    p.images_per_tile = 1;
    p.image_groups = g.batch;
    p.rows_per_tile = std::max<int64_t>(1, std::min(g.out_h, target / g.out_w));
  }
  p.bands = (g.out_h + p.rows_per_tile - 1) / p.rows_per_tile;
  p.columns = p.images_per_tile * p.rows_per_tile * g.out_w;
  return p;
}

// The images each thread's tiles hold when parallel_for_slots hands the image groups out
// (one entry per thread that gets work): what the plans above balance.
inline std::vector<int64_t> thread_images(const TilePlan& p, int64_t batch) {
  const int64_t workers = std::max<int64_t>(1, std::min(p.threads, p.image_groups));
  std::vector<int64_t> images;
  for (int64_t slot = 0; slot < workers; ++slot) {
    const auto [first, last] = slot_chunk(0, p.image_groups, workers, slot);
    if (first < last) images.push_back(p.group_first(last, batch) - p.group_first(first, batch));
  }
  return images;
}

// Along one axis of a stride-1, dilation-1 conv: a run [begin, end) of consecutive outputs
// whose valid kernel indices (those that read the input, not padding) are the same
// [k_begin, k_end) (output o reads input o - pad + k). The runs cover [0, out) in order.
struct AxisGroup {
  int64_t begin, end, k_begin, k_end;
};

inline std::vector<AxisGroup> axis_groups(int64_t out, int64_t in, int64_t kernel, int64_t pad) {
  std::vector<AxisGroup> groups;
  for (int64_t o = 0; o < out; ++o) {
    const int64_t k_begin = std::clamp<int64_t>(pad - o, 0, kernel);
    const int64_t k_end = std::clamp<int64_t>(in + pad - o, k_begin, kernel);
    if (!groups.empty() && groups.back().k_begin == k_begin && groups.back().k_end == k_end) {
      ++groups.back().end;
    } else {
      groups.push_back({o, o + 1, k_begin, k_end});
    }
  }
  return groups;
}

// The input gradient of a stride-1, dilation-1, ungrouped conv as a conv: dX = the conv of dY
// ([batch, O, out_h, out_w]) with weight'[c, o, kh, kw] = weight[o, c, kH - 1 - kh, kW - 1 - kw]
// and padding k - 1 - pad (>= 0 when pad < k), whose output is the input's size.
inline Conv2dGeometry transposed_geometry(const Conv2dGeometry& g) {
  Conv2dGeometry t = g;
  t.in_channels = g.out_channels;
  t.in_h = g.out_h;
  t.in_w = g.out_w;
  t.out_channels = g.in_channels;
  t.pad_h = g.kernel_h - 1 - g.pad_h;
  t.pad_w = g.kernel_w - 1 - g.pad_w;
  t.out_h = g.in_h;
  t.out_w = g.in_w;
  return t;
}

// The GEMM work of a stride-1, dilation-1 conv's tap classes (tap_classes.cpp: one product
// per class of positions with the same valid taps, over only those taps) against im2col's
// (every tap at every position), for tiles of `images` images: the micro-kernel computes
// columns in vectors of 16, so a class of n columns costs its taps times n rounded up to 16.
// Below 1 by the padding products skipped (56% of a 3x3 pad 1's at 2x2, 31% at 4x4), above
// when small classes of few images waste most of their lanes.
inline double tap_class_work_share(const Conv2dGeometry& g, int64_t images) {
  auto lanes = [](int64_t columns) { return (columns + 15) / 16 * 16; };
  const std::vector<AxisGroup> rows = axis_groups(g.out_h, g.in_h, g.kernel_h, g.pad_h);
  const std::vector<AxisGroup> cols = axis_groups(g.out_w, g.in_w, g.kernel_w, g.pad_w);
  double work = 0.0;
  for (const AxisGroup& r : rows) {
    for (const AxisGroup& c : cols) {
      const int64_t taps = (r.k_end - r.k_begin) * (c.k_end - c.k_begin);
      if (taps > 0) work += double(taps) * double(lanes(images * (r.end - r.begin) * (c.end - c.begin)));
    }
  }
  const double im2col = double(g.kernel_area()) * double(lanes(images * g.out_area()));
  return im2col > 0.0 ? work / im2col : 1.0;
}

inline bool reads_input_as_columns(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h == 0 && g.pad_w == 0;
}

// The band path's tiles, from plan_tiles' `tiles`: one whole image per tile instead of
// several for a reads_input_as_columns conv in the compute type (same_type), whose GEMMs then
// read the input and dY and write the output and the input gradient in place. Tiles of
// several images copy all four ([O, n] output tiles copied back plane by plane): MobileNetV2's
// 24 -> 144 expansion at 16x16 took 1.7x oneDNN's time so.
inline TilePlan band_tiles(const Conv2dGeometry& g, const TilePlan& tiles, bool same_type) {
  if (!same_type || !reads_input_as_columns(g) || tiles.images_per_tile == 1) return tiles;
  TilePlan p = tiles;
  p.images_per_tile = 1;
  p.rows_per_tile = g.out_h;
  p.bands = 1;
  p.image_groups = g.batch;
  p.columns = g.out_area();
  return p;
}

// One tile of the output columns: images [first, first + count), output rows [oh_begin,
// oh_end) of each (all rows when count > 1).
struct Tile {
  int64_t first, count, oh_begin, oh_end;
  int64_t columns(const Conv2dGeometry& g) const { return count * (oh_end - oh_begin) * g.out_w; }
};

// Planes side by side: a tile's [channels, n] matrix over NCHW planes of `plane` values, row c
// holding plane c's run [offset, offset + run) of the tile's image i at column i * run
// (n = count * run). So are a tile's dY, output and input gradient on the output's planes,
// and a 1x1 stride-1 conv's columns on the input's (its input and output planes coincide).
struct PlaneRuns {
  int64_t channels, plane, offset, run;
};

inline PlaneRuns tile_runs(const Conv2dGeometry& g, const Tile& t, int64_t channels) {
  return {channels, g.out_area(), t.oh_begin * g.out_w, (t.oh_end - t.oh_begin) * g.out_w};
}

// Whole planes: a tile of whole images.
inline PlaneRuns image_runs(const Conv2dGeometry& g, int64_t channels) {
  return {channels, g.out_area(), 0, g.out_area()};
}

// Image `image`'s runs into the tile's columns [column, column + run).
template <typename scalar_t, typename acc_t>
inline void load_runs(const scalar_t* tensor, const PlaneRuns& r, int64_t image, acc_t* tile,
                      int64_t n, int64_t column) {
  for (int64_t c = 0; c < r.channels; ++c) {
    const scalar_t* __restrict src = tensor + (image * r.channels + c) * r.plane + r.offset;
    acc_t* __restrict dst = tile + c * n + column;
    for (int64_t e = 0; e < r.run; ++e) dst[e] = static_cast<acc_t>(src[e]);
  }
}

// ... and back into the planes, bias[c] added to row c when bias is given.
template <typename acc_t, typename scalar_t>
inline void store_runs(const acc_t* tile, int64_t n, int64_t column, const PlaneRuns& r,
                       int64_t image, const acc_t* bias, scalar_t* tensor) {
  for (int64_t c = 0; c < r.channels; ++c) {
    const acc_t* __restrict src = tile + c * n + column;
    scalar_t* __restrict dst = tensor + (image * r.channels + c) * r.plane + r.offset;
    const acc_t b = bias != nullptr ? bias[c] : acc_t(0);
    for (int64_t e = 0; e < r.run; ++e) dst[e] = static_cast<scalar_t>(src[e] + b);
  }
}

// The whole tile of images [first, first + count) in and out.
template <typename scalar_t, typename acc_t>
void load_tile_runs(const scalar_t* tensor, const PlaneRuns& r, int64_t first, int64_t count,
                    acc_t* tile) {
  for (int64_t i = 0; i < count; ++i) load_runs(tensor, r, first + i, tile, count * r.run, i * r.run);
}

template <typename acc_t, typename scalar_t>
void store_tile_runs(const acc_t* tile, const PlaneRuns& r, int64_t first, int64_t count,
                     const acc_t* bias, scalar_t* tensor) {
  for (int64_t i = 0; i < count; ++i) store_runs(tile, count * r.run, i * r.run, r, first + i, bias, tensor);
}

// The tiles of image group `group` (bands when one image per tile).
template <typename Fn>
void for_each_tile(const Conv2dGeometry& g, const TilePlan& p, int64_t group, Fn&& fn) {
  const int64_t first = p.group_first(group, g.batch);
  const int64_t count = p.group_count(group, g.batch);
  for (int64_t band = 0; band < p.bands; ++band) {
    const int64_t oh_begin = band * p.rows_per_tile;
    const int64_t oh_end = std::min(g.out_h, oh_begin + p.rows_per_tile);
    fn(Tile{first, count, oh_begin, oh_end});
  }
}
// The shared tiles' plan (one tile at a time for all threads): whole images per tile, all
// threads' share of the column budget in one tile, the images spread evenly over the tiles
// (a short last tile is a thin GEMM).
inline TilePlan plan_shared_tiles(const Conv2dGeometry& g, int64_t acc_size, int64_t threads) {
  TilePlan p;
  p.threads = threads;
  const int64_t L = std::max<int64_t>(g.out_area(), 1);
  const int64_t column_bytes = std::max<int64_t>(g.column_rows() * acc_size, 1);
  const int64_t budget_columns = column_budget_bytes() / column_bytes;
  const int64_t preferred = p.threads * std::max(kTileBytes / column_bytes, kMinTileColumns);
  const int64_t target_images = std::max<int64_t>(1, std::min(preferred, budget_columns) / L);
  const int64_t tiles = (g.batch + target_images - 1) / target_images;
  p.images_per_tile = std::max<int64_t>(1, (g.batch + tiles - 1) / std::max<int64_t>(tiles, 1));
  p.rows_per_tile = g.out_h;
  p.bands = 1;
  p.image_groups = tiles;
  p.columns = p.images_per_tile * L;
  return p;
}

}  // namespace convkit::cpu_conv2d
