// conv2d on the CPU: im2col + GEMM in cache-sized tiles, with implicit-GEMM and direct
// kernels for the small-channel layers where a materialised column matrix cannot win; and
// F.unfold/F.fold-like ops.
//
// Paths, chosen per call from the shape (each is forced and checked by
// tests/test_conv2d_paths.py):
//  0. Window (one output position per image, from an image no larger than the kernel: the
//     chapter's last layer, 2x2 -> 1x1): the image's values are its column, in another order,
//     so the weight is re-laid once per call to match them and forward, input gradient and
//     weight gradient are each one GEMM over the images read in place (float and double).
//  1. Rows (first layers: C*kH*kW <= 64, O <= 16, output rows >= 8 wide, groups 1): direct
//     convolution with 16 consecutive output positions of a row in the vector lanes. The
//     image is copied once, zero-padded and split by the column stride into phase planes,
//     so each tap's inputs for a run of positions are contiguous: one load feeds O FMAs.
//     Forward and, when no input gradient is wanted (a network's first layer), the weight
//     gradient (per tap, dot products of input runs with dY's rows).
//  2. Implicit GEMM (groups 1; O <= 32 with >= 16 positions per image, or O <= 64 on outputs
//     narrower than 8 with >= 4 positions): output channels in the lanes; every output
//     position's K inputs are read from the image's plane copy through an offset table (no
//     column matrix). Forward and weight gradient; the input gradient, for 9-32 input
//     channels, by the transposed implicit GEMM: input channels in the lanes, the input
//     positions grouped by their phase modulo the stride so that each group shares its taps
//     (no column matrix either); for <= 8 or > 32 input channels, path 3's GEMM and gather.
//  3. Image path (whole images per tile, output rows < 8 wide): each image's column matrix
//     written transposed, [L, K], by a branch-free gather through a table shared by all
//     channels (late layers have rows of 1-4 values, where per-row bookkeeping costs more
//     than the copy); one BLAS GEMM per group per tile of images reads it as a transposed
//     operand. Backward: dW += dY @ columns, dcolumns = dY^T @ W (W's rows tap-major) summed
//     back in gather form: each input element adds its <= 4 runs of channels as vectors (in a
//     fixed order, deterministic). Weight matrices of >= 2 MiB (ResNet's 512-channel layers) take
//     shared tiles instead: one tile at a time for all threads, the gather and scatter split
//     over images, one BLAS-threaded GEMM that shares its packed weights.
//  4. Band path (everything else: large images): a tile is a band of output rows of one
//     image, its [K, n] columns copied row-wise (vectorised runs), one GEMM per group straight
//     into the output (ldc = oH*oW); 1x1 stride-1 convs read the input as their columns.
//     Backward per band: columns rebuilt (cheaper than storing them), dW += dY @ columns^T,
//     dcolumns = W^T @ dY added back row-wise into the image's input gradient.
// Tiles hold ~384 KiB of columns (L2) but at least 384 columns, so that large weight
// matrices (ResNet's 256-512 channels) are reused enough per load; CONVKIT_COLUMN_BUDGET_MB
// bounds all threads' tiles together (down to one output row). Each thread owns whole tiles
// and calls a single-threaded GEMM on raw pointers (csrc/cpu/gemm.h: our packed GEMM for
// float on AVX-512 hosts, csrc/cpu/packed_gemm.h; MKL's sgemm_/dgemm_ otherwise);
// weight-gradient partial sums are per thread, added in thread order (deterministic for a
// given thread count). float16/bfloat16 are widened to float as tiles are written: every
// product accumulates in float and each result is rounded once.
//
// Floors, chapter CNN at N=512, fp32 (FLOPs of the forward; the weight and input gradients
// cost as much each; "MB" = input + output read/written once):
//   layer           GFLOP fwd   MB fwd   columns (im2col, paths 3-4)   path
//   1->8, 5x5 s2      0.040       4.8       10.0 MB                     1 (rows)
//   8->16, 3x3 s2     0.058       4.8        7.2 MB                     2 (implicit GEMM)
//   16->32, 3x3 s2    0.075       2.6        4.7 MB                     2
//   32->64, 3x3 s2    0.075       1.3        2.4 MB                     2 (blocks of 64)
//   64->10, 3x3 s2    0.006       0.6        1.2 MB                     0 (window: 0.003
//                                                                       GFLOP, no columns)
// Two Zen 4 cores at ~2.6 GHz do one 16-lane fp32 FMA per cycle each: 166 GFLOP/s, so the
// forward floors are 0.24-0.45 ms per layer (0.04 ms for the last), memory ~0.1 ms at the
// measured 40 GB/s copy bandwidth. BLAS reaches 45-95 GFLOP/s per core on paths 3-4's
// shapes (measured, K=25..576, O=8..64), which is why paths 1-2 exist.
//
// Version 1: one im2col of a chunk of images (up to a 64 MiB buffer) and one at::mm per group
//   per chunk, BLAS-threaded; col2im by gather. Chapter N=512, 2 threads: forward 2.5-8x
//   oneDNN (the 64->10 layer 1.8 ms for 6 MFLOP); training step 1.70x torch.
// Version 2: cache-sized tiles, one thread per tile, BLAS on raw pointers, row-wise col2im,
//   1x1 without im2col: fwd+bwd 0.4-1.3x oneDNN per chapter layer, step 1.03x.
// Version 3: path 3 (gather table) for narrow outputs, >= 384 columns per tile: the 64->10
//   forward 2.3 -> 0.18 ms; ResNet-18 layer4 fwd+bwd 4.2x -> 1.5x oneDNN.
// Version 4: paths 1 and 2, built for the host CPU (-march=native): chapter forwards
//   1.0-0.6 ms -> 0.66/0.46/0.88 ms (layers 1-3); step 0.73-0.89x torch.
// Version 5: path 1 without bookkeeping in its inner loops: per-tap offsets
//   built once per call (the shift's division by the stride was an idiv per tap), masked
//   AVX-512 loads/stores for rows' partial last vectors (14 of 16 lanes in the first layer;
//   the scalar stores were a third of the forward), phase planes zeroed once per call and
//   de-interleaved with a compile-time stride, the bias gradient summed from the dY rows the
//   weight gradient copies anyway. First layer at N=512, 2 threads: forward 0.72 -> 0.39 ms
//   (oneDNN 0.52), weight+bias gradient 0.76 -> 0.63 ms (oneDNN 0.59); its kernels now run
//   at one 16-lane FMA per cycle, the floor above with 14 of 16 lanes used. Shared tiles for
//   large weight matrices (path 3): ResNet-18 layer4 at N=32 forward 51 -> 46 ms, backward
//   110 -> 87-96 ms (MKL's GEMM alone: ~100 GFLOP/s on one core, ~190 on both sharing one
//   GEMM, ~145 as two independent GEMMs; oneDNN's own convolution reaches ~260).
// Version 6: path 2's float kernels in AVX-512 intrinsics with their weight (or
//   dY) vectors held in registers: GCC had folded those loads into every FMA, one zmm load
//   per FMA where Zen 4 loads one zmm a cycle. 8 positions per step for 16-32 channels, and
//   blocks of 64 channels (4 positions a step) that bring the chapter's 32->64 layer (2x2
//   outputs) onto path 2. Chapter N=512, 2 threads: forward of 16->32 0.82 -> 0.45-0.50 ms,
//   32->64 0.71-0.77 -> 0.48 ms (oneDNN 0.37-0.45 and 0.46-0.54). The GEMMs of paths 3-4 go
//   to our own packed GEMM (csrc/cpu/packed_gemm.h). The input gradient's col2im of paths 2-3
//   in gather form (it was a scalar read-modify-write scatter): 8->16 and 16->32 fwd+bwd at
//   N=512 2.2-2.4 -> 1.8 ms. Path 2's weight gradient over chunks of ~64 positions of whole
//   images with its sums in registers (32->64 at N=512: 0.67 -> 0.57 ms). Measurements in
//   BENCHMARKS.md.
// Version 7: path 0. The 64->10 layer on path 3 spent 62% of its forward in the
//   gather (576-value columns, 5 of 9 taps reading padding) and ran its GEMMs on 10 output
//   channels; as one GEMM per call over the images in place, at N=512 (2 threads) its forward
//   takes 0.205 -> 0.035 ms, its backward op 0.40 -> 0.09 ms, fwd+bwd 0.74 -> 0.20 ms
//   (slow_conv2d 3.6 ms, oneDNN 0.75). Path 1's weight gradient in AVX-512 intrinsics
//   (GCC had folded the dY loads into the FMAs: 18 loads per 16 FMAs; now 3 input runs and 8
//   dY vectors per 24 FMAs) and its dY copy in registers: the first layer's backward op at
//   N=512 0.62-0.65 -> 0.44 ms (oneDNN's 0.58), at N=64 84-93 -> 63-74 us.
// Version 8: path 2 moves dY into its [L, O] layout (weight gradient) and its
//   output out of it (forward) through 16 x 16 register transposes, with the bias gradient
//   summed on the way (a scalar copy, 64 bytes between stores, had been a sixth of the 8->16
//   weight gradient); the forward computes the last L % 8 positions in a step of their own
//   (8->16: 49 positions, 56 computed before). Chapter N=512, 2 threads: 8->16 backward op
//   1.22 -> 1.09 ms, forward 0.42 -> 0.40 ms; with packed GEMM v2 (a narrow last column panel)
//   its input gradient 0.71 -> 0.62 ms. Their kernels now run at 184-206 GFLOP/s.
// Version 9: per-call set-up without divisions or cache-hostile strides. The
//   gather table and path 2's offset table walked their entries by coordinates instead of
//   dividing each index; the weight's tap-major layouts and the weight gradient's way back go
//   through 16 x 16 transposes (strided scalar stores had missed L1 on every value); the input
//   gradient alone no longer builds the weight gradient's layout. A call's fixed cost (N=2, one
//   thread): 8->16 forward 17.4 -> 9.4 us, backward 26 -> 18; 16->32 14.3 -> 9.0 and 24 -> 18.5;
//   32->64 22.5 -> 11 and 38.7 -> 25. At N=64 (2 threads) 8->16 forward 66 -> 59 us and
//   backward 185 -> 177; 32->64 78 -> 73 and 163 -> 141-150. The input gradient's gather for
//   <= 8 channels (the 8->16 layer) holds two elements per register and transposes them as
//   two 8 x 8 blocks (24 shuffles per 16 elements instead of 64): that pass 0.55 -> 0.30 of
//   the GEMM's time beside it (perf samples, N=512, one thread), the layer's input gradient
//   ~15% faster.
// Version 10: image-path tiles balanced over the threads by images, not by tile
//   count. v9 took the largest tile within the target (21 of 64 images for 8->16) and then
//   made the tile count a multiple of the threads (4 tiles: 21, 21, 21, 1), so one thread had
//   42 images and the other 22; now each thread gets the fewest tiles within the target and
//   the images are spread over them (4 tiles of 16). 8->16 backward op at N=64 (2 threads)
//   166 -> 130 us, at N=100 207-222 -> 194 us; 16->32 at N=512 (273 and 239 images per
//   thread before, 259 and 253 now) 1067-1098 -> 997-1039 us.
// Version 11: path 2's input gradient as a transposed implicit GEMM for 9-32
//   input channels (the image path's GEMM at a depth of O and its gather ran at ~120 GFLOP/s
//   on the 16->32 layer). 16->32 input gradient (2 threads): N=64 78-95 -> 57-58 us, N=512
//   536-686 -> 358-408 us; 32->64 at N=64 81-92 -> 77-78 us. The 8->16 layer keeps the GEMM:
//   in 8 lanes this kernel was 1.15-1.3x slower there (one thread).
// Version 12 (this file): outputs, input gradients and scratch come from the CPU block cache
//   (block_cache.cpp), which keeps freed blocks mapped: at batch 512 the 8->16 layer's fwd+bwd
//   had faulted 120-560 times a call on fresh pages (1-2 us each here). The chapter layers'
//   fwd+bwd as the benchmark calls them (2 threads, N=512): 8->16 1.71-1.75 -> 1.52-1.60 ms,
//   16->32 1.37-1.54 -> 1.32-1.39 ms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../column_buffer.h"
#include "../conv2d.h"
#include "../cuda_emu/emulated_ops.h"
#include "../cuda_emu/routing.h"
#include "block_cache.h"
#include "gemm.h"
#include "parallel.h"

namespace convkit {
namespace {

// Aim for parallel tasks of at least this many elements, so thread start-up stays small.
constexpr int64_t kParallelGrainElements = int64_t(1) << 15;

int64_t grain_for(int64_t elements_per_task) {
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

// A group's weight matrix at least this large (ResNet-18's 512-channel 3x3: 9.4 MB) does not
// stay in a core's cache next to a tile, and each thread re-streamed it for its own tiles:
// MKL ran at ~72 GFLOP/s per core that way, and at ~95-100 when both threads work on one
// GEMM (it shares the packed weight panels). Such layers on the image path take "shared
// tiles": one tile at a time, the gather and scatter split over images between the threads,
// one BLAS-threaded GEMM.
constexpr int64_t kSharedTileWeightBytes = int64_t(2) << 20;

// How the output columns are cut into tiles.
struct TilePlan {
  int64_t images_per_tile;  // whole images per tile (the image path), or 1 (the band path)
  int64_t rows_per_tile;    // output rows per tile: out_h on the image path
  int64_t bands;            // tiles per image: 1 on the image path
  int64_t image_groups;     // ceil(batch / images_per_tile)
  int64_t columns;          // most columns in one tile
  int64_t threads;          // per-thread buffers to allocate
  bool whole_images() const { return bands == 1; }
};

TilePlan plan_tiles(const Conv2dGeometry& g, int64_t acc_size) {
  TilePlan p;
  p.threads = team_size();
  const int64_t L = g.out_area();
  const int64_t column_bytes = std::max<int64_t>(g.column_rows() * acc_size, 1);
  // The column budget (CONVKIT_COLUMN_BUDGET_MB) bounds all threads' tiles together and
  // wins over the preferences above.
  const int64_t budget_columns = column_budget_bytes() / p.threads / column_bytes;
  const int64_t preferred = std::max(kTileBytes / column_bytes, kMinTileColumns);
  const int64_t target = std::max<int64_t>(1, std::min(preferred, budget_columns));
  if (L <= target) {
    // Balance: each thread gets the fewest tiles that keep a tile within the target, and the
    // images are spread evenly over all the tiles. (Taking the largest tile that fits, 21 of
    // 64 images for the 8->16 layer, left one thread 42 images and the other 22.)
    const int64_t per_thread_images = (g.batch + p.threads - 1) / p.threads;
    const int64_t target_images = std::max<int64_t>(1, target / L);
    const int64_t tiles_per_thread = (per_thread_images + target_images - 1) / target_images;
    const int64_t tiles = std::max<int64_t>(1, std::min(g.batch, p.threads * tiles_per_thread));
    int64_t images = std::max<int64_t>(1, (g.batch + tiles - 1) / tiles);
    // Then the largest tile no larger whose tile count the threads share evenly: 9 images in
    // tiles of 2 are 5 tiles, 3 of them (6 images) on one of 2 threads; tiles of 1 give 5 and 4.
    if (g.batch >= p.threads) {
      while (images > 1 && ((g.batch + images - 1) / images) % p.threads != 0) --images;
    }
    p.images_per_tile = images;
    p.rows_per_tile = g.out_h;
  } else {
    p.images_per_tile = 1;
    p.rows_per_tile = std::max<int64_t>(1, std::min(g.out_h, target / g.out_w));
  }
  p.bands = (g.out_h + p.rows_per_tile - 1) / p.rows_per_tile;
  p.image_groups = (g.batch + p.images_per_tile - 1) / p.images_per_tile;
  p.columns = p.images_per_tile * p.rows_per_tile * g.out_w;
  return p;
}

bool reads_input_as_columns(const Conv2dGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.pad_h == 0 && g.pad_w == 0;
}

// Writes the column rows of channel c for output rows [oh_begin, oh_end) of one image into
// dst (row r of the channel at dst + r * ld), converting to acc_t.
template <typename scalar_t, typename acc_t>
void im2col_band(const scalar_t* image, const Conv2dGeometry& g, int64_t c, int64_t oh_begin,
                 int64_t oh_end, acc_t* dst, int64_t ld) {
  const scalar_t* plane = image + c * g.in_area();
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      acc_t* dst_row = dst + (kh * g.kernel_w + kw) * ld;
      int64_t ow_begin = 0, ow_end = 0;
      conv_valid_output_range(g.in_w, g.out_w, kw, g.stride_w, g.pad_w, g.dilation_w, &ow_begin,
                              &ow_end);
      const int64_t iw0 = conv_input_coordinate(ow_begin, kw, g.stride_w, g.pad_w, g.dilation_w);
      for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
        acc_t* out = dst_row + (oh - oh_begin) * g.out_w;
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        if (ih < 0 || ih >= g.in_h) {
          std::fill(out, out + g.out_w, acc_t(0));
          continue;
        }
        const scalar_t* src = plane + ih * g.in_w + iw0;
        std::fill(out, out + ow_begin, acc_t(0));
        const int64_t n = ow_end - ow_begin;
        acc_t* run = out + ow_begin;
        if (g.stride_w == 1) {
          for (int64_t i = 0; i < n; ++i) run[i] = static_cast<acc_t>(src[i]);
        } else if (g.stride_w == 2) {
          for (int64_t i = 0; i < n; ++i) run[i] = static_cast<acc_t>(src[2 * i]);
        } else {
          for (int64_t i = 0; i < n; ++i) run[i] = static_cast<acc_t>(src[i * g.stride_w]);
        }
        std::fill(out + ow_end, out + g.out_w, acc_t(0));
      }
    }
  }
}

// The column gradient of output rows [oh_begin, oh_end) of one image, channel c (row r at
// src + r * ld), added into that channel's input-gradient plane: the transpose of
// im2col_band, element by element in a fixed order.
template <typename acc_t>
void col2im_band_add(const acc_t* src, int64_t ld, const Conv2dGeometry& g, int64_t oh_begin,
                     int64_t oh_end, acc_t* plane) {
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

// One tile of the output columns: images [first, first + count), output rows [oh_begin,
// oh_end) of each (all rows when count > 1).
struct Tile {
  int64_t first, count, oh_begin, oh_end;
  int64_t columns(const Conv2dGeometry& g) const { return count * (oh_end - oh_begin) * g.out_w; }
};

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
  const int64_t per_image = (t.oh_end - t.oh_begin) * g.out_w;
  for (int64_t i = 0; i < t.count; ++i) {
    const scalar_t* image = input + (t.first + i) * C * g.in_area();
    for (int64_t c = 0; c < C; ++c) {
      im2col_band(image, g, c, t.oh_begin, t.oh_end, buffer + c * g.kernel_area() * n + i * per_image,
                  n);
    }
  }
  return {buffer, n};
}

// The tiles of image group `group` (bands when one image per tile).
template <typename Fn>
void for_each_tile(const Conv2dGeometry& g, const TilePlan& p, int64_t group, Fn&& fn) {
  const int64_t first = group * p.images_per_tile;
  const int64_t count = std::min(p.images_per_tile, g.batch - first);
  for (int64_t band = 0; band < p.bands; ++band) {
    const int64_t oh_begin = band * p.rows_per_tile;
    const int64_t oh_end = std::min(g.out_h, oh_begin + p.rows_per_tile);
    fn(Tile{first, count, oh_begin, oh_end});
  }
}

// ---- The image path: tiles of whole images.
//
// Each image's column matrix is written transposed, [L, K] (position-major), by a gather
// through a small table built once per call: entry l * kA + r (kA = kH*kW, r = kh*kW + kw)
// holds the offset in a channel plane of the value that column entry (c*kA + r, l) copies,
// the same for every channel. The image is first copied plane by plane into a buffer with one
// zero after each plane, and padding entries point at that zero: the gather has no branch
// and no per-row bookkeeping (the late chapter layers have rows of 1-4 elements, where that
// bookkeeping cost more than the copy). The GEMMs read the [count*L, K] tile as a transposed
// operand.

struct GatherTable {
  std::vector<int32_t> offsets;  // [L, kA]
  int64_t plane_stride;          // H*W + 1: a plane and its zero
};

// Output rows at least this wide are copied as runs (the band path's im2col, which the
// compiler vectorises); narrower ones go through the gather table.
constexpr int64_t kMinRunWidth = 8;

bool direct_path_fits(const Conv2dGeometry& g);

bool image_path_fits(const Conv2dGeometry& g, const TilePlan& p) {
  return p.whole_images() && (g.out_w < kMinRunWidth || direct_path_fits(g)) &&
         g.in_channels * (g.in_area() + 1) < std::numeric_limits<int32_t>::max();
}

GatherTable make_gather_table(const Conv2dGeometry& g) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  GatherTable table{std::vector<int32_t>(L * kA), g.in_area() + 1};
  // Entry (l, r) is what im2col_source_offset gives for row r of channel 0 (the in-plane
  // offset, the same for every channel), walked by coordinates: the per-entry divisions of
  // that helper were a tenth of a small call (8->16 at N=2: ~2 us of ~18).
  const int32_t padding = static_cast<int32_t>(g.in_area());
  int32_t* entry = table.offsets.data();
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
          const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
          *entry++ = inside ? static_cast<int32_t>(ih * g.in_w + iw) : padding;
        }
      }
    }
  }
  return table;
}

// Copies an image's planes into `planes` (plane stride H*W + 1), each followed by a zero.
template <typename scalar_t, typename acc_t>
void copy_planes(const scalar_t* image, const Conv2dGeometry& g, acc_t* planes) {
  const int64_t area = g.in_area();
  for (int64_t c = 0; c < g.in_channels; ++c) {
    const scalar_t* src = image + c * area;
    acc_t* dst = planes + c * (area + 1);
    for (int64_t e = 0; e < area; ++e) dst[e] = static_cast<acc_t>(src[e]);
    dst[area] = acc_t(0);
  }
}

// columns_t [L, K] of one image from its copied planes.
template <typename acc_t>
void gather_image_columns(const acc_t* __restrict planes, const Conv2dGeometry& g,
                          const GatherTable& table, acc_t* __restrict columns_t) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  const int64_t C = g.in_channels;
  const int32_t* __restrict offsets = table.offsets.data();
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* __restrict row = offsets + l * kA;
    acc_t* __restrict dst = columns_t + l * C * kA;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* __restrict plane = planes + c * table.plane_stride;
      for (int64_t r = 0; r < kA; ++r) dst[c * kA + r] = plane[row[r]];
    }
  }
}

// The transpose of gather_image_columns, in gather form: each input element sums the
// column-gradient entries that were copied from it. The input-gradient GEMM multiplies by
// the weight with each row reordered tap-major (weight_rows_tap_major: entry r * Cg + c), so
// the column gradient holds a tap's Cg channels contiguously: every term is a run of Cg
// values, summed as vectors. For every element of a plane the table lists the start of its
// terms' runs in an image's [L, K] columns (l * K + r * Cg, group 0), in (l, r) order;
// padding entries are in no list. The sums go to a [area, Cg] buffer, then transposed into
// the planes. It replaces a scatter with a scalar read-modify-write per column entry (chains
// through the store buffer where taps overlap), a zeroed plane buffer and a copy-out:
// [512, 8, 14, 14] input gradient's col2im 0.5 -> ~0.1 ms. Each element adds its terms in
// the order the scatter did, from zero: the same float results.
struct ColumnSources {
  std::vector<int64_t> starts;   // [area + 1]: element e's terms are [starts[e], starts[e + 1])
  std::vector<int64_t> entries;  // run starts in an image's columns (group 0)
};

ColumnSources make_column_sources(const Conv2dGeometry& g, const GatherTable& table) {
  const int64_t L = g.out_area();
  const int64_t kA = g.kernel_area();
  const int64_t K = g.column_rows();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t area = g.in_area();
  ColumnSources sources{std::vector<int64_t>(area + 1, 0), {}};
  for (int64_t i = 0; i < L * kA; ++i) {
    const int64_t offset = table.offsets[i];
    if (offset < area) ++sources.starts[offset + 1];
  }
  for (int64_t e = 0; e < area; ++e) sources.starts[e + 1] += sources.starts[e];
  sources.entries.resize(sources.starts[area]);
  std::vector<int64_t> next(sources.starts.begin(), sources.starts.end() - 1);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t r = 0; r < kA; ++r) {
      const int64_t offset = table.offsets[l * kA + r];
      if (offset < area) sources.entries[next[offset]++] = l * K + r * channels_per_group;
    }
  }
  return sources;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] (or += when kAdd) for a [rows, cols] matrix, in
// 16 x 16 blocks. Element by element, one of the two sides strides by a whole row per value:
// with the 32->64 layer's 288-tap rows (1152 bytes, 256 for its 64 padded channels) every
// such access missed L1, and the weight's re-layout plus the gradient's way back were a third
// of a small call (the 32->64 forward at N=2: ~7 of ~20 us).
template <bool kAdd, typename acc_t>
void transpose_matrix(const acc_t* __restrict src, int64_t ld_src, int64_t rows, int64_t cols,
                      acc_t* __restrict dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 16;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    using cpu::packed_gemm::lane_mask;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t block_rows = std::min(kBlock, rows - r0);
      const __mmask16 row_mask = lane_mask(block_rows);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t block_cols = std::min(kBlock, cols - c0);
        const __mmask16 col_mask = lane_mask(block_cols);
        __m512 block[kBlock];
        for (int64_t i = 0; i < kBlock; ++i) {
          block[i] = i < block_rows
                         ? _mm512_maskz_loadu_ps(col_mask, src + (r0 + i) * ld_src + c0)
                         : _mm512_setzero_ps();
        }
        cpu::packed_gemm::transpose_16x16(block);
        for (int64_t j = 0; j < block_cols; ++j) {
          float* out = dst + (c0 + j) * ld_dst + r0;
          __m512 value = block[j];
          if constexpr (kAdd) value = _mm512_add_ps(_mm512_maskz_loadu_ps(row_mask, out), value);
          _mm512_mask_storeu_ps(out, row_mask, value);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          if constexpr (kAdd) {
            dst[c * ld_dst + r] += src[r * ld_src + c];
          } else {
            dst[c * ld_dst + r] = src[r * ld_src + c];
          }
        }
      }
    }
  }
}

// weight [O, Kg] (row entry c * kA + r) -> the same rows tap-major (entry r * Cg + c).
template <typename acc_t>
std::vector<acc_t> weight_rows_tap_major(const acc_t* weight, const Conv2dGeometry& g) {
  const int64_t kA = g.kernel_area();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t Kg = channels_per_group * kA;
  std::vector<acc_t> rows(g.out_channels * Kg);
  // Each row is a [Cg, kA] matrix transposed.
  for (int64_t o = 0; o < g.out_channels; ++o) {
    transpose_matrix<false>(weight + o * Kg, kA, channels_per_group, kA, rows.data() + o * Kg,
                            channels_per_group);
  }
  return rows;
}

#if defined(__AVX512F__)
// The first `elements` lanes of `value` to dst, rounded to scalar_t.
template <typename scalar_t>
inline void store_element_lanes(scalar_t* dst, __m512 value, int64_t elements) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_mask_storeu_ps(dst, cpu::packed_gemm::lane_mask(elements), value);
  } else {
    alignas(64) float values[16];
    _mm512_store_ps(values, value);
    for (int64_t i = 0; i < elements; ++i) dst[i] = static_cast<scalar_t>(values[i]);
  }
}
#endif

// One image's input gradient from its [L, K] column gradient (tap-major within each group);
// `buffer` holds area * Cg values (used by the generic version).
template <typename scalar_t, typename acc_t>
void sum_image_columns(const acc_t* __restrict columns_t, const Conv2dGeometry& g,
                       const ColumnSources& sources, acc_t* __restrict buffer,
                       scalar_t* __restrict grad_image) {
  const int64_t area = g.in_area();
  const int64_t channels_per_group = g.in_channels / g.groups;
  const int64_t Kg = g.column_rows() / g.groups;
  const int64_t* __restrict starts = sources.starts.data();
  const int64_t* __restrict entries = sources.entries.data();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 16 elements x up to 16 channels of sums at a time, transposed in registers, so both
    // the runs (channels) and the planes (elements) are read and written as vectors.
    using cpu::packed_gemm::lane_mask;
#if defined(__AVX512VL__)
    if (channels_per_group <= 8) {
      // Up to 8 channels: two elements per register (e0 + i in the low half, e0 + 8 + i in the
      // high one), so the transpose is two 8 x 8 ones side by side, 24 shuffles per 16
      // elements where the 16 x 16 one of half-empty registers took 64. The 8->16 layer's
      // input gradient (8 channels) had spent a third of its time in this pass.
      const __mmask8 channel_mask = static_cast<__mmask8>((1u << channels_per_group) - 1u);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const float* __restrict group_columns = columns_t + grp * Kg;
        auto element_sum = [&](int64_t e) {
          __m256 sum = _mm256_setzero_ps();
          if (e < area) {
            for (int64_t j = starts[e]; j < starts[e + 1]; ++j) {
              const float* run = group_columns + entries[j];
              sum = _mm256_add_ps(sum, _mm256_maskz_loadu_ps(channel_mask, run));
            }
          }
          return sum;
        };
        for (int64_t e0 = 0; e0 < area; e0 += 16) {
          const int64_t elements = std::min<int64_t>(16, area - e0);
          __m512 block[8];
          for (int64_t i = 0; i < 8; ++i) {
            block[i] = _mm512_insertf32x8(_mm512_castps256_ps512(element_sum(e0 + i)),
                                          element_sum(e0 + 8 + i), 1);
          }
          cpu::packed_gemm::transpose_8x8_halves(block);
          for (int64_t c = 0; c < channels_per_group; ++c) {
            store_element_lanes(grad_image + (grp * channels_per_group + c) * area + e0,
                                block[c], elements);
          }
        }
      }
      return;
    }
#endif
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const float* __restrict group_columns = columns_t + grp * Kg;
      for (int64_t c0 = 0; c0 < channels_per_group; c0 += 16) {
        const int64_t channels = std::min<int64_t>(16, channels_per_group - c0);
        const __mmask16 channel_mask = lane_mask(channels);
        for (int64_t e0 = 0; e0 < area; e0 += 16) {
          const int64_t elements = std::min<int64_t>(16, area - e0);
          __m512 block[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 sum = _mm512_setzero_ps();
            if (i < elements) {
              for (int64_t j = starts[e0 + i]; j < starts[e0 + i + 1]; ++j) {
                const float* run = group_columns + entries[j] + c0;
                sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(channel_mask, run));
              }
            }
            block[i] = sum;
          }
          cpu::packed_gemm::transpose_16x16(block);
          for (int64_t c = 0; c < channels; ++c) {
            store_element_lanes(grad_image + (grp * channels_per_group + c0 + c) * area + e0,
                                block[c], elements);
          }
        }
      }
    }
    return;
  }
#endif
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const acc_t* __restrict group_columns = columns_t + grp * Kg;
    for (int64_t e = 0; e < area; ++e) {
      acc_t* __restrict sums = buffer + e * channels_per_group;
      std::fill(sums, sums + channels_per_group, acc_t(0));
      for (int64_t j = starts[e]; j < starts[e + 1]; ++j) {
        const acc_t* __restrict run = group_columns + entries[j];
        for (int64_t c = 0; c < channels_per_group; ++c) sums[c] += run[c];
      }
    }
    for (int64_t c = 0; c < channels_per_group; ++c) {
      scalar_t* __restrict dst = grad_image + (grp * channels_per_group + c) * area;
      for (int64_t e = 0; e < area; ++e) {
        dst[e] = static_cast<scalar_t>(buffer[e * channels_per_group + c]);
      }
    }
  }
}

// What the image path's input gradient needs beside the gather table: each input element's
// column sources and the weight with its rows tap-major (both empty without an input
// gradient).
template <typename acc_t>
struct InputGradientPlan {
  ColumnSources sources;
  std::vector<acc_t> weight_tap_major;
};

template <typename acc_t>
InputGradientPlan<acc_t> make_input_gradient_plan(const Conv2dGeometry& g,
                                                  const GatherTable& table,
                                                  const at::Tensor& weight_acc,
                                                  bool need_input_grad) {
  if (!need_input_grad) return {};
  return {make_column_sources(g, table),
          weight_rows_tap_major(weight_acc.const_data_ptr<acc_t>(), g)};
}

// The image path's GEMMs on one tile of n columns ([n, K] columns, dY as [O, n]), per group:
// the weight gradient, weight_grad [O, Kg] += dY @ columns ...
template <typename acc_t>
void add_tile_weight_gradient(const Conv2dGeometry& g, int64_t n, const acc_t* dy_tile,
                              const acc_t* columns_t, acc_t* weight_grad) {
  const int64_t K = g.column_rows();
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = K / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    cpu::gemm<acc_t>(false, false, Og, Kg, n, acc_t(1), dy_tile + grp * Og * n, n,
                     columns_t + grp * Kg, K, acc_t(1), weight_grad + grp * Og * Kg, Kg);
  }
}

// ... and the column gradient, columns = dY^T @ W (W's rows tap-major, for sum_image_columns).
template <typename acc_t>
void tile_column_gradient(const Conv2dGeometry& g, int64_t n, const acc_t* dy_tile,
                          const acc_t* weight_tap_major, acc_t* columns_t) {
  const int64_t K = g.column_rows();
  const int64_t Og = g.out_channels / g.groups;
  const int64_t Kg = K / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    cpu::gemm<acc_t>(true, false, n, Kg, Og, acc_t(1), dy_tile + grp * Og * n, n,
                     weight_tap_major + grp * Og * Kg, Kg, acc_t(0), columns_t + grp * Kg, K);
  }
}

// weight [O, K] -> [K, channels] (tap-major, as paths 1 and 2 read it), zeros in the padded
// channels.
template <typename acc_t>
std::vector<acc_t> weight_by_tap(const acc_t* weight, int64_t O, int64_t K, int64_t channels) {
  std::vector<acc_t> weight_t(K * channels, acc_t(0));
  transpose_matrix<false>(weight, K, O, K, weight_t.data(), channels);
  return weight_t;
}

// total[o, k] += part[k, o] for o < O: a tap-major weight-gradient accumulator (paths 1-2)
// added into the [O, K] gradient.
template <typename acc_t>
void add_tap_major(const acc_t* part, int64_t O, int64_t K, int64_t channels, acc_t* total) {
  transpose_matrix<true>(part, channels, K, O, total, K);
}

// ---- Implicit GEMM for few output channels (the chapter's first layers).
//
// With 8-32 output channels the GEMM of the image path is a thin [O, K] x [K, n] product
// that BLAS runs at half speed, after an im2col that costs as much again. Here the
// product reads the image directly: each output position's K inputs come from the image's
// plane copy through an offset table (the gather table spread over the channels), and the
// accumulators are output channels, so the weights are read as contiguous vectors of
// kDirectBlock channels and every input value is one broadcast. The forward keeps
// 128 / block positions x block channels of sums in registers; the weight gradient keeps
// 128 / block taps x block channels, streaming dY transposed to [L, O]. The input gradient
// reads that same copy of dY (the transposed implicit GEMM below) or goes through the GEMM
// and the gather of the image path.
// Two other ways to feed the forward's FMAs measured slower on the 8->16 layer (N=512, one
// thread): a zero-bordered copy of the planes, so that a position is one pointer and a tap
// one offset (one load per FMA instead of the table entry and the value), 767-796 -> 796-840
// us, and 16->32 787-805 -> 865-897 (in perf the copy, row by row into aligned rows, took
// 15-18% of the call, against ~9% for the plane copy; the steps gained less than that);
// and 16 positions per step for 16 channels (16 sums in registers), 785-824 -> 962-986 us.
constexpr int64_t kMaxDirectChannels = 32;
constexpr int kDirectAccumulators = 128;  // sums kept in registers per step (8 zmm of float)

// Positions (forward) or taps (weight gradient) per step of the AVX-512 float kernels: 8 for
// blocks of 16-32 channels, 4 for 64. The padded sizes are multiples of this and of the
// generic kernels' kDirectAccumulators / block.
constexpr int64_t direct_step(int64_t block) {
  return block == 64 ? 4 : std::max<int64_t>(kDirectAccumulators / block, 8);
}

// Positions are processed kDirectAccumulators / block at a time (4-16): fewer per image
// would mostly compute padding (the chapter's last layer has one position per image).
constexpr int64_t kMinDirectPositions = 16;
// Positions per call of the weight-gradient kernel (a chunk of whole images).
constexpr int64_t kDirectChunkPositions = 64;

// 33-64 output channels take blocks of 64 (four zmm of float), where 4 positions per step
// already give 16 independent sums: narrow late layers with >= 4 positions qualify (the
// chapter's 32->64 layer, 2x2 outputs: its forward 0.71 -> 0.4 ms at N=512). Larger
// images stay on the GEMM paths.
constexpr int64_t kMaxDirectChannelsNarrow = 64;
constexpr int64_t kMinDirectPositionsNarrow = 4;

bool direct_path_fits(const Conv2dGeometry& g) {
  if (g.groups != 1) return false;
  if (g.out_channels <= kMaxDirectChannels) return g.out_area() >= kMinDirectPositions;
  return g.out_channels <= kMaxDirectChannelsNarrow && g.out_w < kMinRunWidth &&
         g.out_area() >= kMinDirectPositionsNarrow;
}

struct DirectLayout {
  int64_t block;     // output channels per vector block: 8, 16 or 32
  int64_t padded_o;  // O rounded up to the block
  int64_t padded_l;  // L rounded up to kDirectAccumulators / block positions
  int64_t padded_k;  // K rounded up to kDirectAccumulators / block taps
  std::vector<int32_t> offsets;  // [padded_l, padded_k] into the plane copy; pads read a zero
};

DirectLayout make_direct_layout(const Conv2dGeometry& g, const GatherTable& table) {
  DirectLayout d;
  const int64_t O = g.out_channels;
  d.block = O <= 8 ? 8 : (O <= 16 ? 16 : (O <= 32 ? 32 : 64));
  d.padded_o = (O + d.block - 1) / d.block * d.block;
  const int64_t step = direct_step(d.block);
  const int64_t L = g.out_area();
  const int64_t K = g.column_rows();
  const int64_t kA = g.kernel_area();
  d.padded_l = (L + step - 1) / step * step;
  d.padded_k = (K + step - 1) / step * step;
  const int32_t zero = static_cast<int32_t>(g.in_area());  // plane 0's trailing zero
  d.offsets.assign(d.padded_l * d.padded_k, zero);
  // Row k = c * kA + r, walked as (c, r): a division per entry had made this a quarter of a
  // small call (8->16 at N=2: ~4.5 us of ~18).
  const int64_t C = g.in_channels;
  for (int64_t l = 0; l < L; ++l) {
    const int32_t* taps = table.offsets.data() + l * kA;
    int32_t* row = d.offsets.data() + l * d.padded_k;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t plane = static_cast<int32_t>(c * table.plane_stride);
      for (int64_t r = 0; r < kA; ++r) row[c * kA + r] = plane + taps[r];
    }
  }
  return d;
}

// out_t[l, o] = sum_k planes[offsets[l, k]] * weight_t[k, o] for the padded [L, O] tile.
#if defined(__AVX512F__)
// The float kernels for blocks of 16, 32 and 64 channels (1, 2 or 4 zmm) with 8, 8 or 4
// positions per step (8-16 accumulators). Written with intrinsics because GCC folded the weight loads of the
// generic loop into every FMA: with 4 positions of 32 channels that was 8 zmm loads for 8
// FMAs, and Zen 4 loads one zmm per cycle, so the 16->32 layer ran at 38% of the FMA rate.
// Here a step loads its weights once, into registers.
//
// An empty asm that "changes" the value: GCC then cannot fold its load into each FMA that
// uses it (it still did with plain intrinsics), so it is loaded once per step.
inline void keep_in_register(__m512& value) { asm("" : "+v"(value)); }
// Positions l0 .. l0 + Positions - 1 of one block of 16 * Vectors channels.
template <int Vectors, int Positions>
inline void direct_forward_step_avx512(const float* __restrict planes, const DirectLayout& d,
                                       int64_t K, const float* __restrict weight_t, int64_t o0,
                                       int64_t l0, float* __restrict out_t) {
  __m512 acc[Positions][Vectors];
  for (int p = 0; p < Positions; ++p) {
    for (int v = 0; v < Vectors; ++v) acc[p][v] = _mm512_setzero_ps();
  }
  const int32_t* __restrict offsets = d.offsets.data() + l0 * d.padded_k;
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[Vectors];
    for (int v = 0; v < Vectors; ++v) {
      w[v] = _mm512_loadu_ps(weight_t + k * d.padded_o + o0 + 16 * v);
      keep_in_register(w[v]);
    }
    for (int p = 0; p < Positions; ++p) {
      const __m512 x = _mm512_set1_ps(planes[offsets[p * d.padded_k + k]]);
      for (int v = 0; v < Vectors; ++v) acc[p][v] = _mm512_fmadd_ps(x, w[v], acc[p][v]);
    }
  }
  for (int p = 0; p < Positions; ++p) {
    for (int v = 0; v < Vectors; ++v) {
      _mm512_storeu_ps(out_t + (l0 + p) * d.padded_o + o0 + 16 * v, acc[p][v]);
    }
  }
}

// fn(std::integral_constant<int, P>{}) for 1 <= P <= 7.
template <typename Fn>
void with_positions(int64_t positions, Fn&& fn) {
  switch (positions) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    default: fn(std::integral_constant<int, 7>{}); break;
  }
}

// Full steps, then the last L % Positions positions in a step of their own, instead of
// computing padded positions (the 8->16 layer: 49 positions, 56 computed).
template <int Vectors>
void direct_forward_image_avx512(const float* __restrict planes, const DirectLayout& d,
                                 int64_t K, int64_t L, const float* __restrict weight_t,
                                 float* __restrict out_t) {
  constexpr int Positions = direct_step(16 * Vectors);
  const int64_t full = L / Positions * Positions;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += 16 * Vectors) {
    for (int64_t l0 = 0; l0 < full; l0 += Positions) {
      direct_forward_step_avx512<Vectors, Positions>(planes, d, K, weight_t, o0, l0, out_t);
    }
    if (full < L) {
      with_positions(L - full, [&](auto positions) {
        direct_forward_step_avx512<Vectors, decltype(positions)::value>(planes, d, K, weight_t,
                                                                        o0, full, out_t);
      });
    }
  }
}

template <int Vectors>
void direct_weight_grad_image_avx512(const float* __restrict planes, int64_t plane_stride,
                                     int64_t images, const DirectLayout& d, int64_t L,
                                     const float* __restrict dy_t, int64_t dy_stride,
                                     float* __restrict weight_grad_t) {
  constexpr int Taps = direct_step(16 * Vectors);
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += 16 * Vectors) {
    for (int64_t k0 = 0; k0 < d.padded_k; k0 += Taps) {
      __m512 acc[Taps][Vectors];
      for (int t = 0; t < Taps; ++t) {
        for (int v = 0; v < Vectors; ++v) acc[t][v] = _mm512_setzero_ps();
      }
      for (int64_t image = 0; image < images; ++image) {
        const float* __restrict image_planes = planes + image * plane_stride;
        const float* __restrict image_dy = dy_t + image * dy_stride;
        for (int64_t l = 0; l < L; ++l) {
          __m512 dy[Vectors];
          for (int v = 0; v < Vectors; ++v) {
            dy[v] = _mm512_loadu_ps(image_dy + l * d.padded_o + o0 + 16 * v);
            keep_in_register(dy[v]);
          }
          const int32_t* __restrict offsets = d.offsets.data() + l * d.padded_k + k0;
          for (int t = 0; t < Taps; ++t) {
            const __m512 x = _mm512_set1_ps(image_planes[offsets[t]]);
            for (int v = 0; v < Vectors; ++v) acc[t][v] = _mm512_fmadd_ps(x, dy[v], acc[t][v]);
          }
        }
      }
      for (int t = 0; t < Taps; ++t) {
        for (int v = 0; v < Vectors; ++v) {
          float* total = weight_grad_t + (k0 + t) * d.padded_o + o0 + 16 * v;
          _mm512_storeu_ps(total, _mm512_add_ps(_mm512_loadu_ps(total), acc[t][v]));
        }
      }
    }
  }
}
#endif

template <typename acc_t, int Block>
void direct_forward_image(const acc_t* __restrict planes, const DirectLayout& d, int64_t K,
                          int64_t L, const acc_t* __restrict weight_t, acc_t* __restrict out_t) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && Block >= 16) {
    direct_forward_image_avx512<Block / 16>(planes, d, K, L, weight_t, out_t);
    return;
  }
#endif
  // Generic (double, and float without AVX-512): the padded positions are computed too.
  constexpr int Positions = kDirectAccumulators / Block;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += Block) {
    for (int64_t l0 = 0; l0 < d.padded_l; l0 += Positions) {
      acc_t acc[Positions][Block] = {};
      const int32_t* __restrict offsets = d.offsets.data() + l0 * d.padded_k;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* __restrict w = weight_t + k * d.padded_o + o0;
        for (int p = 0; p < Positions; ++p) {
          const acc_t v = planes[offsets[p * d.padded_k + k]];
#pragma omp simd
          for (int o = 0; o < Block; ++o) acc[p][o] += v * w[o];
        }
      }
      for (int p = 0; p < Positions; ++p) {
        for (int o = 0; o < Block; ++o) out_t[(l0 + p) * d.padded_o + o0 + o] = acc[p][o];
      }
    }
  }
}

// weight_grad_t[k, o] += sum over `images` images (plane copies plane_stride apart, dY rows
// [L, padded_o] dy_stride apart) and their real positions l of planes[offsets[l, k]] *
// dy_t[l, o]. Several images per call keep the sums in registers across them: a late layer
// has 4-16 positions per image, and storing the sums after each image cost as much as
// computing them.
template <typename acc_t, int Block>
void direct_weight_grad_image(const acc_t* __restrict planes, int64_t plane_stride,
                              int64_t images, const DirectLayout& d, int64_t L,
                              const acc_t* __restrict dy_t, int64_t dy_stride,
                              acc_t* __restrict weight_grad_t) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && Block >= 16) {
    direct_weight_grad_image_avx512<Block / 16>(planes, plane_stride, images, d, L, dy_t,
                                                dy_stride, weight_grad_t);
    return;
  }
#endif
  constexpr int Taps = kDirectAccumulators / Block;
  for (int64_t o0 = 0; o0 < d.padded_o; o0 += Block) {
    for (int64_t k0 = 0; k0 < d.padded_k; k0 += Taps) {
      acc_t acc[Taps][Block] = {};
      for (int64_t image = 0; image < images; ++image) {
        const acc_t* __restrict image_planes = planes + image * plane_stride;
        for (int64_t l = 0; l < L; ++l) {
          const acc_t* __restrict dy_row = dy_t + image * dy_stride + l * d.padded_o + o0;
          const int32_t* __restrict offsets = d.offsets.data() + l * d.padded_k + k0;
          for (int t = 0; t < Taps; ++t) {
            const acc_t v = image_planes[offsets[t]];
#pragma omp simd
            for (int o = 0; o < Block; ++o) acc[t][o] += v * dy_row[o];
          }
        }
      }
      for (int t = 0; t < Taps; ++t) {
        for (int o = 0; o < Block; ++o) weight_grad_t[(k0 + t) * d.padded_o + o0 + o] += acc[t][o];
      }
    }
  }
}

// fn(std::integral_constant<int, B>{}) for a vector block of B = 8, 16 or 32 values: the
// kernels above take it as a template argument so their sums stay in registers.
template <typename Fn>
void with_block(int64_t block, Fn&& fn) {
  switch (block) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    default: fn(std::integral_constant<int, 32>{}); break;
  }
}

// with_block for the implicit GEMM, whose blocks also come in 64.
template <typename Fn>
void with_direct_block(int64_t block, Fn&& fn) {
  if (block == 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    with_block(block, fn);
  }
}

// The implicit GEMM's output of one image, out_t [L, padded_o], into its [O, L] planes with
// the bias added. In 16 x 16 blocks transposed in registers (float), where it was read
// channel by channel, 64 bytes apart per value (that and the plane copy were 18% of the 8->16
// layer's forward; with the step below the forwards measured 2-5% faster).
template <typename scalar_t, typename acc_t>
void store_output_image(const acc_t* __restrict out_t, int64_t O, int64_t L, int64_t padded_o,
                        const acc_t* __restrict bias, scalar_t* __restrict dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    using cpu::packed_gemm::lane_mask;
    using cpu::packed_gemm::transpose_16x16;
    for (int64_t o0 = 0; o0 < O; o0 += 16) {
      const int64_t channels = std::min<int64_t>(16, O - o0);
      const __mmask16 channel_mask = lane_mask(channels);
      for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int64_t positions = std::min<int64_t>(16, L - l0);
        const __mmask16 position_mask = lane_mask(positions);
        __m512 block[16];
        for (int64_t j = 0; j < 16; ++j) {
          block[j] = j < positions
                         ? _mm512_maskz_loadu_ps(channel_mask, out_t + (l0 + j) * padded_o + o0)
                         : _mm512_setzero_ps();
        }
        transpose_16x16(block);  // block[i]: channel o0 + i, positions l0.. in the lanes
        for (int64_t i = 0; i < channels; ++i) {
          const __m512 value = bias != nullptr
                                   ? _mm512_add_ps(block[i], _mm512_set1_ps(bias[o0 + i]))
                                   : block[i];
          _mm512_mask_storeu_ps(dst + (o0 + i) * L + l0, position_mask, value);
        }
      }
    }
    return;
  }
#endif
  for (int64_t o = 0; o < O; ++o) {
    const acc_t bias_value = bias != nullptr ? bias[o] : acc_t(0);
    scalar_t* __restrict plane = dst + o * L;
    for (int64_t l = 0; l < L; ++l) {
      plane[l] = static_cast<scalar_t>(out_t[l * padded_o + o] + bias_value);
    }
  }
}

template <typename scalar_t>
void conv2d_forward_direct(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           const TilePlan& p, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const GatherTable table = make_gather_table(g);
  const DirectLayout d = make_direct_layout(g, table);
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
      with_direct_block(d.block, [&](auto block) {
        direct_forward_image<acc_t, decltype(block)::value>(planes, d, K, L, weight_t.data(),
                                                            out_t);
      });
      store_output_image(out_t, O, L, d.padded_o, bias_ptr, y_ptr + b * O * L);
    }
  });
}

// ---- Direct convolution along output rows (few input and output channels, wide rows).
//
// The implicit GEMM above puts output channels in the vector lanes; with 8 of them each
// gathered input value feeds one 8-lane FMA and the loads dominate (the chapter's first
// layer: 1 -> 8 channels, 5x5, stride 2). Here the lanes are kRowLanes consecutive output
// positions of one row: the image is copied once, zero-padded and split by the column
// stride into phase planes, so that every tap's inputs for a run of positions are
// contiguous; one vector load then feeds an FMA per output channel. The weight gradient
// reuses the layout: per tap a dot product of its input runs with dY's rows.
constexpr int kRowLanes = 16;
constexpr int64_t kMaxRowChannels = 16;

bool row_direct_fits(const Conv2dGeometry& g) {
  return g.groups == 1 && g.out_channels <= kMaxRowChannels && g.out_w >= 8 &&
         g.in_channels * g.kernel_area() <= 64;
}

struct RowLayout {
  int64_t padded_h;     // H + 2 * pad_h
  int64_t phase_width;  // columns of a phase plane, with slack for the last vector
  int64_t phases;       // stride_w
  int64_t row_vectors;  // ceil(out_w / kRowLanes)
  int64_t plane_elems() const { return padded_h * phase_width; }
};

RowLayout make_row_layout(const Conv2dGeometry& g) {
  RowLayout r;
  r.phases = g.stride_w;
  r.padded_h = g.in_h + 2 * g.pad_h;
  r.row_vectors = (g.out_w + kRowLanes - 1) / kRowLanes;
  const int64_t padded_w = g.in_w + 2 * g.pad_w;
  const int64_t max_shift = ((g.kernel_w - 1) * g.dilation_w) / g.stride_w;
  r.phase_width = std::max((padded_w + r.phases - 1) / r.phases,
                           r.row_vectors * kRowLanes + max_shift);
  return r;
}

// dst[j] = src[j * Stride] for j < count; Stride 1 and 2 (the chapter's first layer) are
// compile-time constants, which lets the compiler vectorise the de-interleave.
template <int64_t Stride, typename scalar_t, typename acc_t>
inline void copy_strided(const scalar_t* __restrict src, int64_t stride, int64_t count,
                         acc_t* __restrict dst) {
  const int64_t step = Stride > 0 ? Stride : stride;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<acc_t>(src[j * step]);
}

// phases[(c * stride_w + ph) * plane + ih * width + j] = padded input (c, ih, j * stride_w + ph)
// for the entries that hold input values. The rest (padding, slack) is the same for every
// image: split_phases never writes it, so a buffer zeroed once per call keeps it zero.
template <typename scalar_t, typename acc_t>
void split_phases(const scalar_t* image, const Conv2dGeometry& g, const RowLayout& r,
                  acc_t* phases) {
  const int64_t plane = r.plane_elems();
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t ph = 0; ph < r.phases; ++ph) {
      // Phase ph holds padded columns ph, ph + s, ...: input columns j * s + ph - pad_w.
      int64_t j_begin = 0, j_end = 0;
      conv_valid_output_range(g.in_w, r.phase_width, 0, r.phases, g.pad_w - ph, 1, &j_begin,
                              &j_end);
      const int64_t iw0 = j_begin * r.phases + ph - g.pad_w;
      for (int64_t ih = 0; ih < g.in_h; ++ih) {
        const scalar_t* src = image + (c * g.in_h + ih) * g.in_w + iw0;
        acc_t* dst = phases + (c * r.phases + ph) * plane + (ih + g.pad_h) * r.phase_width + j_begin;
        switch (r.phases) {
          case 1: copy_strided<1>(src, 1, j_end - j_begin, dst); break;
          case 2: copy_strided<2>(src, 2, j_end - j_begin, dst); break;
          default: copy_strided<0>(src, r.phases, j_end - j_begin, dst); break;
        }
      }
    }
  }
}

// Where tap k = (c, kh, kw) reads, relative to the start of output row oh's input row
// (oh * stride_h * phase_width) plus the run's first column: built once per call, since the
// shift's division by the stride (an idiv per tap) dominated v4's inner loops.
std::vector<int64_t> make_tap_offsets(const Conv2dGeometry& g, const RowLayout& r) {
  std::vector<int64_t> offsets(g.column_rows());
  int64_t k = 0;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw, ++k) {
        const int64_t shift = kw * g.dilation_w;
        offsets[k] = (c * r.phases + shift % r.phases) * r.plane_elems() +
                     kh * g.dilation_h * r.phase_width + shift / r.phases;
      }
    }
  }
  return offsets;
}

// dst[lane] = value[lane] + bias for lane < lanes (an output row's last vector is partial:
// 14 of 16 lanes in the chapter's first layer). AVX-512 stores it with one masked store
// where v4's scalar loop spent a third of the forward; load_lanes below is its inverse.
template <typename scalar_t, typename acc_t>
inline void store_lanes(scalar_t* dst, const acc_t (&value)[kRowLanes], acc_t bias, int64_t lanes) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(value), _mm512_set1_ps(bias));
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << lanes) - 1u), sum);
    return;
  }
#endif
  for (int64_t lane = 0; lane < lanes; ++lane) dst[lane] = static_cast<scalar_t>(value[lane] + bias);
}

// value[lane] = src[lane] for lane < lanes and 0 beyond, reading nothing past lanes.
template <typename scalar_t, typename acc_t>
inline void load_lanes(acc_t (&value)[kRowLanes], const scalar_t* src, int64_t lanes) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    _mm512_storeu_ps(value, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u), src));
    return;
  }
#endif
  for (int64_t lane = 0; lane < kRowLanes; ++lane) {
    value[lane] = lane < lanes ? static_cast<acc_t>(src[lane]) : acc_t(0);
  }
}

// out[o, oh, ow] = bias[o] + sum over taps of weight[o, tap] * input run, for one image.
template <typename scalar_t, typename acc_t, int Channels>
void row_direct_forward_image(const acc_t* __restrict phases, const Conv2dGeometry& g,
                              const RowLayout& r, const int64_t* __restrict tap_offsets,
                              const acc_t* __restrict weight_t, const acc_t* bias,
                              scalar_t* __restrict out) {
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const acc_t* row = phases + oh * g.stride_h * r.phase_width;
    for (int64_t v = 0; v < r.row_vectors; ++v) {
      const int64_t ow0 = v * kRowLanes;
      acc_t acc[Channels][kRowLanes] = {};
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* __restrict run = row + tap_offsets[k] + ow0;
        const acc_t* __restrict w = weight_t + k * Channels;
        for (int o = 0; o < Channels; ++o) {
#pragma omp simd
          for (int lane = 0; lane < kRowLanes; ++lane) acc[o][lane] += w[o] * run[lane];
        }
      }
      const int64_t lanes = std::min<int64_t>(kRowLanes, g.out_w - ow0);
      for (int64_t o = 0; o < O; ++o) {
        const acc_t b = bias != nullptr ? bias[o] : acc_t(0);
        store_lanes(out + o * L + oh * g.out_w + ow0, acc[o], b, lanes);
      }
    }
  }
}

// weight_grad_t[tap, o] += sum over positions of dy[o, position] * input(tap, position);
// dy_rows holds dY as [O, out_h, row_vectors * kRowLanes] with zeros past out_w. Taps are
// taken kRowAccumulators / Channels at a time, so each dY vector loaded feeds that many FMAs.
constexpr int kRowAccumulators = 16;

template <typename acc_t, int Channels>
void row_direct_weight_grad_image(const acc_t* __restrict phases, const Conv2dGeometry& g,
                                  const RowLayout& r, const int64_t* __restrict tap_offsets,
                                  const acc_t* __restrict dy_rows,
                                  acc_t* __restrict weight_grad_t) {
  constexpr int Taps = kRowAccumulators / Channels;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t K = g.column_rows();
  for (int64_t k0 = 0; k0 < K; k0 += Taps) {
    const int taps = static_cast<int>(std::min<int64_t>(Taps, K - k0));
    int64_t tap_offset[Taps];
    // A short last block repeats its last tap (and drops the sums).
    for (int t = 0; t < Taps; ++t) tap_offset[t] = tap_offsets[k0 + std::min(t, taps - 1)];
    acc_t acc[Taps][Channels][kRowLanes] = {};
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      const acc_t* row = phases + oh * g.stride_h * r.phase_width;
      for (int64_t v = 0; v < r.row_vectors; ++v) {
        const acc_t* base = row + v * kRowLanes;
        for (int o = 0; o < Channels; ++o) {
          const acc_t* __restrict d = dy_rows + (o * g.out_h + oh) * row_len + v * kRowLanes;
          for (int t = 0; t < Taps; ++t) {
            const acc_t* __restrict run = base + tap_offset[t];
#pragma omp simd
            for (int lane = 0; lane < kRowLanes; ++lane) acc[t][o][lane] += d[lane] * run[lane];
          }
        }
      }
    }
    for (int t = 0; t < taps; ++t) {
      for (int o = 0; o < Channels; ++o) {
        acc_t sum = acc_t(0);
        for (int lane = 0; lane < kRowLanes; ++lane) sum += acc[t][o][lane];
        weight_grad_t[(k0 + t) * Channels + o] += sum;
      }
    }
  }
}

#if defined(__AVX512F__)
// The same sums for float, 8 channels x 3 taps per pass (24 zmm accumulators). GCC had
// folded the dY loads of the generic loop into its FMAs: 18 zmm loads per 16 FMAs, and Zen 4
// loads one zmm a cycle. Here a step loads 3 input runs and 8 dY vectors, once each, for
// 24 FMAs. Channel blocks of 16 take two passes.
void row_direct_weight_grad_image_avx512(const float* __restrict phases, const Conv2dGeometry& g,
                                         const RowLayout& r, const int64_t* __restrict tap_offsets,
                                         const float* __restrict dy_rows, int64_t channels,
                                         float* __restrict weight_grad_t) {
  constexpr int Taps = 3;
  constexpr int Block = 8;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t K = g.column_rows();
  for (int64_t o0 = 0; o0 < channels; o0 += Block) {
    const float* dy_block = dy_rows + o0 * g.out_h * row_len;
    for (int64_t k0 = 0; k0 < K; k0 += Taps) {
      const int taps = static_cast<int>(std::min<int64_t>(Taps, K - k0));
      int64_t tap_offset[Taps];
      // A short last block repeats its last tap (and drops the sums).
      for (int t = 0; t < Taps; ++t) tap_offset[t] = tap_offsets[k0 + std::min(t, taps - 1)];
      __m512 acc[Taps][Block];
#pragma GCC unroll 3
      for (int t = 0; t < Taps; ++t) {
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) acc[t][o] = _mm512_setzero_ps();
      }
      // One flat loop over the (row, vector) steps: with the rows and vectors as two nested
      // loops GCC kept the accumulators in memory, a store and a load of each per row.
      int64_t oh = 0, v = 0;
      for (int64_t step = 0; step < g.out_h * r.row_vectors; ++step) {
        const float* base = phases + oh * g.stride_h * r.phase_width + v * kRowLanes;
        const float* dy_vector = dy_block + oh * row_len + v * kRowLanes;
        __m512 run[Taps];
#pragma GCC unroll 3
        for (int t = 0; t < Taps; ++t) {
          run[t] = _mm512_loadu_ps(base + tap_offset[t]);
          keep_in_register(run[t]);
        }
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) {
          __m512 d = _mm512_loadu_ps(dy_vector + o * g.out_h * row_len);
          keep_in_register(d);
#pragma GCC unroll 3
          for (int t = 0; t < Taps; ++t) acc[t][o] = _mm512_fmadd_ps(d, run[t], acc[t][o]);
        }
        if (++v == r.row_vectors) {
          v = 0;
          ++oh;
        }
      }
      // Reduced with constant bounds: indexing acc with the runtime `taps` made GCC keep it in
      // memory, stored back at every step of the loop above.
      float sums[Taps][Block];
#pragma GCC unroll 3
      for (int t = 0; t < Taps; ++t) {
#pragma GCC unroll 8
        for (int o = 0; o < Block; ++o) sums[t][o] = _mm512_reduce_add_ps(acc[t][o]);
      }
      for (int t = 0; t < taps; ++t) {
        for (int o = 0; o < Block; ++o) weight_grad_t[(k0 + t) * channels + o0 + o] += sums[t][o];
      }
    }
  }
}
#endif

template <typename scalar_t>
void conv2d_forward_rows(const at::Tensor& x, const at::Tensor& weight_acc,
                         const at::Tensor& bias_acc, const Conv2dGeometry& g, int64_t threads,
                         at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const RowLayout r = make_row_layout(g);
  const std::vector<int64_t> tap_offsets = make_tap_offsets(g, r);
  const int64_t channels = O <= 8 ? 8 : kMaxRowChannels;
  const std::vector<acc_t> weight_t = weight_by_tap(weight_acc.const_data_ptr<acc_t>(), O, K, channels);
  const int64_t per_thread = g.in_channels * r.phases * r.plane_elems();
  // Zeroed once: split_phases leaves the padding alone (see there).
  at::Tensor buffers = scratch<acc_t>(x, threads * per_thread).zero_();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  parallel_for_slots(0, g.batch, 1, threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* phases = buffer_base + thread * per_thread;
    for (int64_t b = begin; b < end; ++b) {
      split_phases(x_ptr + b * image_elems, g, r, phases);
      with_block(channels, [&](auto block) {
        row_direct_forward_image<scalar_t, acc_t, decltype(block)::value>(
            phases, g, r, tap_offsets.data(), weight_t.data(), bias_ptr, y_ptr + b * O * L);
      });
    }
  });
}

// One dY plane of an image as rows of row_vectors * kRowLanes values (zeros past out_w), for
// the weight gradient's kernels; returns the plane's sum (the bias gradient's share).
template <typename scalar_t, typename acc_t>
acc_t copy_dy_rows(const scalar_t* __restrict plane, const Conv2dGeometry& g, const RowLayout& r,
                   acc_t* __restrict rows) {
  const int64_t row_len = r.row_vectors * kRowLanes;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kRowLanes == 16) {
    // In registers: through load_lanes' local array (and a second pass for the sum) this copy
    // took a fifth of the first layer's weight gradient.
    __m512 sum = _mm512_setzero_ps();
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += kRowLanes) {
        const int64_t lanes = std::min<int64_t>(kRowLanes, g.out_w - ow0);
        const __m512 value = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u),
                                                   plane + oh * g.out_w + ow0);
        _mm512_storeu_ps(rows + oh * row_len + ow0, value);
        sum = _mm512_add_ps(sum, value);
      }
    }
    return _mm512_reduce_add_ps(sum);
  }
#endif
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t v = 0; v < r.row_vectors; ++v) {
      const int64_t ow0 = v * kRowLanes;
      acc_t value[kRowLanes];
      load_lanes(value, plane + oh * g.out_w + ow0, std::min<int64_t>(kRowLanes, g.out_w - ow0));
      std::copy(value, value + kRowLanes, rows + oh * row_len + ow0);
    }
  }
  // The sum from the padded rows just written (zeros past out_w): one contiguous reduction,
  // where summing along the copy kept a chain through memory.
  acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < g.out_h * row_len; ++e) sum += rows[e];
  return sum;
}

// grad_bias (when given) is summed on the way: each dY plane is copied into dy_rows anyway.
template <typename scalar_t>
void conv2d_weight_grad_rows(const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                             int64_t threads, at::Tensor& grad_weight_acc, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const RowLayout r = make_row_layout(g);
  const std::vector<int64_t> tap_offsets = make_tap_offsets(g, r);
  const int64_t channels = O <= 8 ? 8 : kMaxRowChannels;
  const int64_t row_len = r.row_vectors * kRowLanes;
  const int64_t phase_elems = g.in_channels * r.phases * r.plane_elems();
  const int64_t dy_elems = channels * g.out_h * row_len;
  const int64_t per_thread = phase_elems + dy_elems + K * channels;
  // Zeroed once: the phase planes' padding, dY's padded lanes and channels stay zero for the
  // whole call, and the weight sums start at zero.
  at::Tensor buffers = scratch<acc_t>(x, threads * per_thread).zero_();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  // Per (image, channel) sums of dY, totalled in image order below: the same bias gradient
  // on any number of threads.
  std::vector<double> plane_sums(g.batch * O);
  parallel_for_slots(0, g.batch, 1, threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* phases = buffer_base + thread * per_thread;
    acc_t* dy_rows = phases + phase_elems;
    acc_t* weight_grad_t = dy_rows + dy_elems;
    for (int64_t b = begin; b < end; ++b) {
      split_phases(x_ptr + b * image_elems, g, r, phases);
      for (int64_t o = 0; o < O; ++o) {
        plane_sums[b * O + o] = static_cast<double>(
            copy_dy_rows(dy_ptr + (b * O + o) * L, g, r, dy_rows + o * g.out_h * row_len));
      }
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<acc_t, float> && kRowLanes == 16) {
        row_direct_weight_grad_image_avx512(phases, g, r, tap_offsets.data(), dy_rows, channels,
                                            weight_grad_t);
        continue;
      }
#endif
      with_block(channels, [&](auto block) {
        row_direct_weight_grad_image<acc_t, decltype(block)::value>(
            phases, g, r, tap_offsets.data(), dy_rows, weight_grad_t);
      });
    }
  });
  acc_t* total = grad_weight_acc.mutable_data_ptr<acc_t>();
  for (int64_t thread = 0; thread < threads; ++thread) {
    add_tap_major(buffer_base + thread * per_thread + phase_elems + dy_elems, O, K, channels,
                  total);
  }
  if (grad_bias == nullptr) return;
  for (int64_t o = 0; o < O; ++o) {
    double sum = 0.0;
    for (int64_t b = 0; b < g.batch; ++b) sum += plane_sums[b * O + o];
    grad_bias[o] = static_cast<scalar_t>(sum);
  }
}

// A tile of whole images keeps its output and dY as [O, n] (n = images * L, image i at
// column i * L). Output plane (image first + i, channel o) from the tile, bias added:
template <typename scalar_t, typename acc_t>
inline void store_output_plane(const acc_t* tile, int64_t n, int64_t first, int64_t i, int64_t o,
                               const Conv2dGeometry& g, const acc_t* bias, scalar_t* y) {
  const int64_t L = g.out_area();
  const acc_t* src = tile + o * n + i * L;
  scalar_t* dst = y + ((first + i) * g.out_channels + o) * L;
  const acc_t b = bias != nullptr ? bias[o] : acc_t(0);
  for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<scalar_t>(src[l] + b);
}

// ... and dY plane (image first + i, channel o) into the tile.
template <typename scalar_t, typename acc_t>
inline void load_dy_plane(const scalar_t* dy, int64_t first, int64_t i, int64_t o,
                          const Conv2dGeometry& g, int64_t n, acc_t* tile) {
  const int64_t L = g.out_area();
  const scalar_t* src = dy + ((first + i) * g.out_channels + o) * L;
  acc_t* dst = tile + o * n + i * L;
  for (int64_t l = 0; l < L; ++l) dst[l] = static_cast<acc_t>(src[l]);
}

template <typename scalar_t>
void conv2d_forward_images(const at::Tensor& x, const at::Tensor& weight_acc,
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
  const int64_t per_thread = column_elems + O * p.columns + g.in_channels * table.plane_stride;
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
      const int64_t first = group * p.images_per_tile;
      const int64_t count = std::min(p.images_per_tile, g.batch - first);
      const int64_t n = count * L;
      for (int64_t i = 0; i < count; ++i) {
        copy_planes(x_ptr + (first + i) * image_elems, g, image_copy);
        gather_image_columns(image_copy, g, table, columns_t + i * L * K);
      }
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        cpu::gemm<acc_t>(false, true, Og, n, Kg, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                         columns_t + grp * Kg, K, acc_t(0), out + grp * Og * n, n);
      }
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t o = 0; o < O; ++o) store_output_plane(out, n, first, i, o, g, bias_ptr, y_ptr);
      }
    }
  });
}

// dY of one image, [O, L] -> [L, padded_o] for the implicit GEMM's weight gradient (zeros in
// the padded channels), and each channel's sum over the image into channel_sums[0, O): the
// bias gradient, from the values this copy reads anyway. In 16 x 16 blocks transposed in
// registers (float): one scalar store per value, 64 bytes apart, had taken a sixth of the
// 8->16 layer's weight gradient.
template <typename scalar_t, typename acc_t>
void transpose_dy_image(const scalar_t* __restrict dy_image, int64_t O, int64_t L,
                        int64_t padded_o, acc_t* __restrict dy_t, double* __restrict channel_sums) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // 16 channels at a time: the packed GEMM's transposing pack (lines = channels, depth =
    // positions; the padded channels' lanes come out zero), then the channels' sums from the
    // rows just written, still in L1.
    using cpu::packed_gemm::lane_mask;
    for (int64_t o0 = 0; o0 < padded_o; o0 += 16) {
      const int64_t channels = std::clamp<int64_t>(O - o0, 0, 16);
      cpu::packed_gemm::pack_lanes_transposed(dy_image + o0 * L, L, L, channels, padded_o,
                                              std::min<int64_t>(16, padded_o - o0), dy_t + o0);
      if (channel_sums == nullptr || channels == 0) continue;
      const __mmask16 channel_mask = lane_mask(channels);
      __m512 sums = _mm512_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(channel_mask, dy_t + l * padded_o + o0));
      }
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, sums);
      for (int64_t i = 0; i < channels; ++i) channel_sums[o0 + i] = static_cast<double>(lanes[i]);
    }
    return;
  }
#endif
  std::fill(dy_t, dy_t + L * padded_o, acc_t(0));
  for (int64_t o = 0; o < O; ++o) {
    const scalar_t* __restrict src = dy_image + o * L;
    acc_t sum = acc_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const acc_t value = static_cast<acc_t>(src[l]);
      dy_t[l * padded_o + o] = value;
      sum += value;
    }
    if (channel_sums != nullptr) channel_sums[o] = static_cast<double>(sum);
  }
}

// ---- The implicit GEMM's input gradient: a transposed implicit GEMM, no column matrix.
//
// dX[c, ih, iw] sums W[o, c, kh, kw] * dY[o, oh, ow] over the output channels o and the taps
// (kh, kw) whose window reaches (ih, iw) from some output position (oh, ow). Which taps can
// reach an input position depends only on its phase (ih mod stride_h, iw mod stride_w): the
// phases of a 3x3 stride-2 layer take 1, 2, 2 and 4 of its 9 taps. The positions of one
// phase thus share one list of taps, so one sequence of weight vectors, and are computed
// like path 2's forward with the roles of the channels swapped: 16 input channels in the
// lanes, dY read from the weight gradient's [L, padded_o] copy of it (plus a zero row, which
// taps falling outside dY read), one broadcast of dY per (tap, o, position). The image path's
// GEMM computed the same products at a depth of O into a column matrix that a gather then
// summed back: ~120 GFLOP/s together on the chapter's 16->32 layer (two threads, N=64).
// A step takes 8 positions of one phase from a chunk of images, so that a phase's few
// positions per image (16->32: 9-16) do not each leave a short step; the sums go to
// [positions, padded_c] rows, transposed into the planes at the end.
// Layers with <= 8 input channels (the chapter's 8->16) keep the GEMM: in 8 lanes (ymm, with
// 8 positions of two sums or 4 of four per step) this kernel measured 1.15-1.3x slower than
// the GEMM and gather there (N=64, one thread: 165-187 us against 144), and with the
// positions in the lanes instead (each phase a plane on dY's zero-bordered grid, so a tap is
// a fixed shift: 49 of 64 grid positions used) it measured the same as the GEMM (140-144 us).
// Nor did 16 lanes of 8 input channels x 2 output-channel parities (an 8-byte broadcast of dY
// at o and o + 1 per FMA, the two halves of each pair added at the end) beat it: 163 us
// against 144 (N=64, one thread). Its loop was 8 broadcasts and 8 FMAs per weight vector,
// but the 8-byte broadcast is an instruction of its own, where the 4-byte one folds into the
// FMA, and the FMAs ran at 57% of the 16-channel kernel's rate.
constexpr int64_t kTransposedStep = 8;
// Images per chunk: up to 8, fewer for images with more than kTransposedChunkPositions / 8
// positions (the chunk's sums and dY copy stay within L2).
constexpr int64_t kTransposedChunkImages = 8;
constexpr int64_t kTransposedChunkPositions = 2048;
constexpr int64_t kMinTransposedChannels = 9;
constexpr int64_t kMaxTransposedChannels = 32;

bool transposed_input_grad_fits(const Conv2dGeometry& g) {
  // The layout's offsets are int32: into a chunk's dY copy ((L + 1) rows of <= 64 channels
  // per image) and its sums (area rows per image). A chunk has at most 8 images, or the
  // weight gradient's chunk of <= kDirectChunkPositions images when that is larger.
  const int64_t max_chunk = std::max(kTransposedChunkImages, kDirectChunkPositions);
  const int64_t image_rows = std::max((g.out_area() + 1) * kMaxDirectChannelsNarrow, g.in_area());
  return direct_path_fits(g) && g.in_channels >= kMinTransposedChannels &&
         g.in_channels <= kMaxTransposedChannels &&
         max_chunk * image_rows < std::numeric_limits<int32_t>::max();
}

int64_t transposed_chunk_images(const Conv2dGeometry& g, int64_t images_per_tile) {
  return std::clamp<int64_t>(kTransposedChunkPositions / std::max<int64_t>(g.in_area(), 1), 1,
                             std::min(kTransposedChunkImages, images_per_tile));
}

struct TransposedPhase {
  int64_t positions = 0;          // the phase's positions in one image
  std::vector<int32_t> tap_rows;  // [T]: r = kh * kW + kw of the T taps reaching it (maybe none)
  std::vector<int32_t> sources;   // [chunk * positions, T]: offsets of dY rows in a chunk's copy
  std::vector<int32_t> outputs;   // [chunk * positions]: rows of the chunk's sums (image * area + e)
};

constexpr int64_t kTransposedLanes = 16;

struct TransposedLayout {
  int64_t padded_c;  // C rounded up to kTransposedLanes
  std::vector<TransposedPhase> phases;
};

// Positions are listed image by image within each phase, so a chunk of fewer images (the last
// of a tile) uses a prefix of each list. The chunk's dY copy has rows of padded_o channels,
// each image's L rows and a zero row dy_stride apart.
TransposedLayout make_transposed_layout(const Conv2dGeometry& g, int64_t padded_o,
                                        int64_t dy_stride, int64_t chunk) {
  TransposedLayout t;
  t.padded_c = (g.in_channels + kTransposedLanes - 1) / kTransposedLanes * kTransposedLanes;
  const int64_t zero_row = g.out_area() * padded_o;
  for (int64_t py = 0; py < g.stride_h; ++py) {
    for (int64_t px = 0; px < g.stride_w; ++px) {
      TransposedPhase phase;
      // Tap (kh, kw) reaches the phase when ih + pad - kh * dilation is a multiple of the
      // stride for ih = py (and so for every ih of the phase); likewise along the width.
      std::vector<std::pair<int64_t, int64_t>> taps;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        if ((py + g.pad_h - kh * g.dilation_h) % g.stride_h != 0) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          if ((px + g.pad_w - kw * g.dilation_w) % g.stride_w != 0) continue;
          taps.emplace_back(kh, kw);
          phase.tap_rows.push_back(static_cast<int32_t>(kh * g.kernel_w + kw));
        }
      }
      const int64_t rows = py < g.in_h ? (g.in_h - py + g.stride_h - 1) / g.stride_h : 0;
      const int64_t cols = px < g.in_w ? (g.in_w - px + g.stride_w - 1) / g.stride_w : 0;
      phase.positions = rows * cols;
      if (phase.positions == 0) continue;
      phase.sources.reserve(chunk * phase.positions * static_cast<int64_t>(taps.size()));
      phase.outputs.reserve(chunk * phase.positions);
      for (int64_t image = 0; image < chunk; ++image) {
        for (int64_t ih = py; ih < g.in_h; ih += g.stride_h) {
          for (int64_t iw = px; iw < g.in_w; iw += g.stride_w) {
            phase.outputs.push_back(static_cast<int32_t>(image * g.in_area() + ih * g.in_w + iw));
            for (const auto& [kh, kw] : taps) {
              // Exact divisions: the phase was chosen so that the numerators are multiples.
              const int64_t oh = (ih + g.pad_h - kh * g.dilation_h) / g.stride_h;
              const int64_t ow = (iw + g.pad_w - kw * g.dilation_w) / g.stride_w;
              const bool inside = ih + g.pad_h - kh * g.dilation_h >= 0 && oh < g.out_h &&
                                  iw + g.pad_w - kw * g.dilation_w >= 0 && ow < g.out_w;
              const int64_t row = inside ? (oh * g.out_w + ow) * padded_o : zero_row;
              phase.sources.push_back(static_cast<int32_t>(image * dy_stride + row));
            }
          }
        }
      }
      t.phases.push_back(std::move(phase));
    }
  }
  return t;
}

// weight [O, C * kA] -> [kA, O, padded_c]: for each tap and output channel, the input
// channels' weights as vectors (zeros in the padded lanes).
template <typename acc_t>
std::vector<acc_t> weight_for_transposed(const acc_t* weight, const Conv2dGeometry& g,
                                         int64_t padded_c) {
  const int64_t O = g.out_channels;
  const int64_t C = g.in_channels;
  const int64_t kA = g.kernel_area();
  std::vector<acc_t> laid(kA * O * padded_c, acc_t(0));
  for (int64_t o = 0; o < O; ++o) {
    // Row o is a [C, kA] matrix; its transpose goes to entries (r, o, c).
    transpose_matrix<false>(weight + o * C * kA, kA, C, kA, laid.data() + o * padded_c,
                            O * padded_c);
  }
  return laid;
}

// sums[outputs[p], c0 .. c0 + 16) = sum over the phase's taps t and o < O of
// dy_t[sources[p, t] + o] * weight[tap_rows[t], o, c0 ..] for Positions positions p.
// Not inlined: inlined into its caller, GCC ran out of general registers for the 8 dY
// pointers and kept them in xmm registers, one move per FMA (16->32 input gradient at N=64,
// two threads: 75 us against 56).
template <typename acc_t, int Positions>
__attribute__((noinline)) void transposed_step(
    const acc_t* __restrict dy_t, const int32_t* __restrict sources, int64_t taps,
    const int32_t* __restrict tap_rows, int64_t O, const acc_t* __restrict weight,
    int64_t padded_c, int64_t c0, const int32_t* __restrict outputs, acc_t* __restrict sums) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Each weight vector is held in a register for the step's positions (as in path 2's
    // forward: GCC otherwise folds its load into every FMA); the dY values are the FMAs'
    // broadcast operands.
    __m512 acc[Positions];
    for (int p = 0; p < Positions; ++p) acc[p] = _mm512_setzero_ps();
    for (int64_t t = 0; t < taps; ++t) {
      const float* src[Positions];
      for (int p = 0; p < Positions; ++p) src[p] = dy_t + sources[p * taps + t];
      const float* w = weight + tap_rows[t] * O * padded_c + c0;
      for (int64_t o = 0; o < O; ++o) {
        __m512 w_o = _mm512_loadu_ps(w + o * padded_c);
        keep_in_register(w_o);
        for (int p = 0; p < Positions; ++p) {
          acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(src[p][o]), w_o, acc[p]);
        }
      }
    }
    for (int p = 0; p < Positions; ++p) _mm512_storeu_ps(sums + outputs[p] * padded_c + c0, acc[p]);
    return;
  }
#endif
  acc_t acc[Positions][kTransposedLanes] = {};
  for (int64_t t = 0; t < taps; ++t) {
    const acc_t* w = weight + tap_rows[t] * O * padded_c + c0;
    for (int p = 0; p < Positions; ++p) {
      const acc_t* src = dy_t + sources[p * taps + t];
      for (int64_t o = 0; o < O; ++o) {
        const acc_t v = src[o];
        const acc_t* __restrict w_o = w + o * padded_c;
#pragma omp simd
        for (int l = 0; l < kTransposedLanes; ++l) acc[p][l] += v * w_o[l];
      }
    }
  }
  for (int p = 0; p < Positions; ++p) {
    std::copy_n(acc[p], kTransposedLanes, sums + outputs[p] * padded_c + c0);
  }
}

// The input gradient's sums for a chunk of `images` images whose dY rows are in dy_t (laid out
// as make_transposed_layout was told): sums [images * area, padded_c].
template <typename acc_t>
void transposed_input_grad_chunk(const TransposedLayout& t, int64_t images,
                                 const acc_t* dy_t, int64_t O, const acc_t* weight,
                                 acc_t* sums) {
  for (const TransposedPhase& phase : t.phases) {
    const int64_t n = images * phase.positions;
    const int64_t taps = static_cast<int64_t>(phase.tap_rows.size());
    const int32_t* sources = phase.sources.data();
    const int32_t* outputs = phase.outputs.data();
    for (int64_t c0 = 0; c0 < t.padded_c; c0 += kTransposedLanes) {
      int64_t q = 0;
      for (; q + kTransposedStep <= n; q += kTransposedStep) {
        transposed_step<acc_t, kTransposedStep>(dy_t, sources + q * taps, taps,
                                                phase.tap_rows.data(), O, weight, t.padded_c,
                                                c0, outputs + q, sums);
      }
      if (q < n) {
        with_positions(n - q, [&](auto positions) {
          transposed_step<acc_t, decltype(positions)::value>(
              dy_t, sources + q * taps, taps, phase.tap_rows.data(), O, weight,
              t.padded_c, c0, outputs + q, sums);
        });
      }
    }
  }
}

// Returns whether it computed grad_bias (given when wanted): the implicit GEMM's weight
// gradient sums dY's planes on the way.
template <typename scalar_t>
bool conv2d_backward_images(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor& weight_acc, const Conv2dGeometry& g,
                            const TilePlan& p, bool need_input_grad, bool need_weight_grad,
                            at::Tensor& grad_input, at::Tensor& grad_weight_acc,
                            scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Kg = K / g.groups;
  const int64_t area = g.in_area();
  const int64_t image_elems = g.in_channels * area;
  const GatherTable table = make_gather_table(g);
  // Few output channels: the weight gradient by the implicit GEMM (no columns), in the
  // transposed [padded_k, padded_o] layout, and the input gradient by the transposed one
  // (no columns either) for up to kMaxTransposedChannels input channels; else the GEMM and
  // the gather.
  const bool direct = direct_path_fits(g);
  const bool transposed = need_input_grad && transposed_input_grad_fits(g);
  const bool gemm_input_grad = need_input_grad && !transposed;
  const bool direct_weight_grad = direct && need_weight_grad;
  const InputGradientPlan<acc_t> dx_plan =
      make_input_gradient_plan<acc_t>(g, table, weight_acc, gemm_input_grad);
  const DirectLayout d = direct_weight_grad ? make_direct_layout(g, table) : DirectLayout{};
  // dY transposed to rows of padded_o channels (both implicit GEMMs read it so).
  const bool dy_rows = direct_weight_grad || transposed;
  const int64_t padded_o = direct_weight_grad ? d.padded_o : (O + 15) / 16 * 16;
  const bool gemm_tiles = gemm_input_grad || (need_weight_grad && !direct);
  const int64_t column_elems = gemm_tiles ? K * p.columns : 0;
  const int64_t dy_elems = gemm_tiles ? O * p.columns : 0;
  // The direct weight gradient takes the narrow layers' images (< kMinDirectPositions
  // positions each) in chunks of about kDirectChunkPositions positions; wider images one at a
  // time (chunks measured no faster there: 16->32 at N=512 0.55 -> 0.57 ms). dY is transposed
  // a chunk at a time, the larger of that and the transposed input gradient's.
  const int64_t weight_chunk = direct && L < kMinDirectPositions
                                   ? std::clamp<int64_t>(kDirectChunkPositions / L, 1, p.images_per_tile)
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
  const int64_t image_buffer_elems =
      need_weight_grad || gemm_input_grad ? weight_chunk * plane_elems : 0;
  const int64_t weight_grad_elems =
      need_weight_grad ? (direct ? d.padded_k * d.padded_o : O * Kg) : 0;
  const int64_t per_thread = column_elems + dy_elems + dy_t_elems + sums_elems +
                             image_buffer_elems + weight_grad_elems;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * per_thread);
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
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
  const bool bias_from_dy_t = grad_bias != nullptr && direct_weight_grad;
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
      const int64_t first = group * p.images_per_tile;
      const int64_t count = std::min(p.images_per_tile, g.batch - first);
      const int64_t n = count * L;
      if (dy_elems > 0) {
        for (int64_t o = 0; o < O; ++o) {
          for (int64_t i = 0; i < count; ++i) load_dy_plane(dy_ptr, first, i, o, g, n, dy_tile);
        }
      }
      if (dy_rows) {
        for (int64_t i0 = 0; i0 < count; i0 += chunk) {
          const int64_t images = std::min(chunk, count - i0);
          for (int64_t j = 0; j < images; ++j) {
            const int64_t image = first + i0 + j;
            transpose_dy_image(dy_ptr + image * O * L, O, L, padded_o, dy_t + j * dy_stride,
                               bias_from_dy_t ? plane_sums.data() + image * O : nullptr);
          }
          for (int64_t w0 = 0; direct_weight_grad && w0 < images; w0 += weight_chunk) {
            const int64_t weight_images = std::min(weight_chunk, images - w0);
            for (int64_t j = 0; j < weight_images; ++j) {
              copy_planes(x_ptr + (first + i0 + w0 + j) * image_elems, g,
                          image_buffer + j * plane_elems);
            }
            with_direct_block(d.block, [&](auto block) {
              direct_weight_grad_image<acc_t, decltype(block)::value>(
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
      if (need_weight_grad && !direct) {
        for (int64_t i = 0; i < count; ++i) {
          copy_planes(x_ptr + (first + i) * image_elems, g, image_buffer);
          gather_image_columns(image_buffer, g, table, columns_t + i * L * K);
        }
        add_tile_weight_gradient(g, n, dy_tile, columns_t, weight_grad);
      }
      if (gemm_input_grad) {
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
      if (direct) {
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

// ---- The window path: one output position per image (the chapter's last layer, 2x2 -> 1x1).
//
// With a single window, an image's column holds the image's own values (and the padding's
// zeros): every input element is read by at most one tap (conv_window_offset). So the weight
// is laid out once per call as the "window weight" Ww [O, C/groups * H * W], whose entry
// (o, c, ih, iw) is the weight of the tap that reads (ih, iw) (0 when none does), and per group
//   forward        Y[N, O]     = X[N, C*H*W] @ Ww^T   (computed as Y^T = Ww @ X^T)
//   input grad     dX[N, C*H*W] = dY[N, O] @ Ww
//   weight grad    dWw[O, C*H*W] = dY^T @ X, each entry then put back at its tap
// with the images' rows read in place: no column matrix, no gather, no col2im, and the taps
// that read padding (5 of 9 in the chapter's layer) cost nothing. Taken when an image has no
// more values than the kernel has taps (else the column is the smaller matrix) and only for
// the compute types (float, double): half and bfloat16 keep the image path, which widens them
// as it gathers.
bool window_path_fits(const Conv2dGeometry& g) {
  return g.out_h == 1 && g.out_w == 1 && g.in_area() <= g.kernel_area();
}

// (offset in a channel plane, tap kh * kW + kw) for every input element some tap reads.
std::vector<std::pair<int64_t, int64_t>> window_taps(const Conv2dGeometry& g) {
  std::vector<std::pair<int64_t, int64_t>> taps;
  for (int64_t ih = 0; ih < g.in_h; ++ih) {
    const int64_t kh = conv_window_offset(ih, g.kernel_h, g.pad_h, g.dilation_h);
    if (kh < 0) continue;
    for (int64_t iw = 0; iw < g.in_w; ++iw) {
      const int64_t kw = conv_window_offset(iw, g.kernel_w, g.pad_w, g.dilation_w);
      if (kw >= 0) taps.emplace_back(ih * g.in_w + iw, kh * g.kernel_w + kw);
    }
  }
  return taps;
}

// Ww [O, Cg * H * W] from the weight [O, Cg * kH * kW] (both row-major).
template <typename acc_t>
std::vector<acc_t> window_weight(const acc_t* weight, const Conv2dGeometry& g,
                                 const std::vector<std::pair<int64_t, int64_t>>& taps) {
  const int64_t Cg = g.in_channels / g.groups;
  const int64_t K = Cg * g.kernel_area();
  const int64_t D = Cg * g.in_area();
  std::vector<acc_t> window(g.out_channels * D, acc_t(0));
  for (int64_t o = 0; o < g.out_channels; ++o) {
    for (int64_t c = 0; c < Cg; ++c) {
      const acc_t* src = weight + o * K + c * g.kernel_area();
      acc_t* dst = window.data() + o * D + c * g.in_area();
      for (const auto& [offset, tap] : taps) dst[offset] = src[tap];
    }
  }
  return window;
}

// Images per forward GEMM: bounds a thread's Y^T buffer. (Parallel tasks read at least
// kParallelGrainElements values of X each, so small batches stay on one thread.)
constexpr int64_t kWindowImagesPerGemm = 256;

template <typename acc_t>
void conv2d_forward_window(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           at::Tensor& output) {
  const int64_t O = g.out_channels;
  const int64_t Og = O / g.groups;
  const int64_t D = g.in_channels / g.groups * g.in_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const std::vector<acc_t> window =
      window_weight(weight_acc.const_data_ptr<acc_t>(), g, window_taps(g));
  const acc_t* x_ptr = x.const_data_ptr<acc_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  acc_t* y_ptr = output.mutable_data_ptr<acc_t>();
  parallel_for(0, g.batch, grain_for(image_elems), [&](int64_t begin, int64_t end) {
    // Y^T: the output channels are the GEMM's rows (its 12-row panels fit the few channels of
    // a last layer better than its 32-column panels would).
    std::vector<acc_t> transposed(Og * std::min(kWindowImagesPerGemm, end - begin));
    for (int64_t first = begin; first < end; first += kWindowImagesPerGemm) {
      const int64_t count = std::min(kWindowImagesPerGemm, end - first);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        cpu::gemm<acc_t>(false, true, Og, count, D, acc_t(1), window.data() + grp * Og * D, D,
                         x_ptr + first * image_elems + grp * D, image_elems, acc_t(0),
                         transposed.data(), count);
        for (int64_t i = 0; i < count; ++i) {
          acc_t* dst = y_ptr + (first + i) * O + grp * Og;
          for (int64_t o = 0; o < Og; ++o) {
            const acc_t b = bias_ptr != nullptr ? bias_ptr[grp * Og + o] : acc_t(0);
            dst[o] = transposed[o * count + i] + b;
          }
        }
      }
    }
  });
}

template <typename acc_t>
void conv2d_backward_window(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor& weight_acc, const Conv2dGeometry& g,
                            bool need_input_grad, bool need_weight_grad, at::Tensor& grad_input,
                            at::Tensor& grad_weight_acc) {
  const int64_t O = g.out_channels;
  const int64_t Og = O / g.groups;
  const int64_t Cg = g.in_channels / g.groups;
  const int64_t D = Cg * g.in_area();
  const int64_t image_elems = g.in_channels * g.in_area();
  const auto taps = window_taps(g);
  const acc_t* x_ptr = x.const_data_ptr<acc_t>();
  const acc_t* dy_ptr = dy.const_data_ptr<acc_t>();
  if (need_input_grad) {
    const std::vector<acc_t> window = window_weight(weight_acc.const_data_ptr<acc_t>(), g, taps);
    acc_t* dx_ptr = grad_input.mutable_data_ptr<acc_t>();
    parallel_for(0, g.batch, grain_for(image_elems), [&](int64_t begin, int64_t end) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        cpu::gemm<acc_t>(false, false, end - begin, D, Og, acc_t(1), dy_ptr + begin * O + grp * Og,
                         O, window.data() + grp * Og * D, D, acc_t(0),
                         dx_ptr + begin * image_elems + grp * D, image_elems);
      }
    });
  }
  if (!need_weight_grad) return;
  // dWw in column ranges of whole panels of our GEMM per task, each over the whole batch:
  // every entry is one GEMM's sum, whatever the thread count.
  std::vector<acc_t> window_grad(O * D);
#if defined(__AVX512F__)
  constexpr int64_t kPanel = cpu::packed_gemm::kPanelColumns;
#else
  constexpr int64_t kPanel = 32;  // the BLAS has no panels of ours to keep whole
#endif
  const int64_t panels = (D + kPanel - 1) / kPanel;
  parallel_for(0, panels, grain_for(kPanel * g.batch), [&](int64_t begin, int64_t end) {
    const int64_t col_begin = begin * kPanel;
    const int64_t col_end = std::min(D, end * kPanel);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      cpu::gemm<acc_t>(true, false, Og, col_end - col_begin, g.batch, acc_t(1), dy_ptr + grp * Og,
                       O, x_ptr + grp * D + col_begin, image_elems, acc_t(0),
                       window_grad.data() + grp * Og * D + col_begin, D);
    }
  });
  // Back to the taps; taps that read only padding keep grad_weight_acc's zeros.
  acc_t* gw = grad_weight_acc.mutable_data_ptr<acc_t>();
  const int64_t K = Cg * g.kernel_area();
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t c = 0; c < Cg; ++c) {
      const acc_t* src = window_grad.data() + o * D + c * g.in_area();
      acc_t* dst = gw + o * K + c * g.kernel_area();
      for (const auto& [offset, tap] : taps) dst[tap] = src[offset];
    }
  }
}

// ---- The band path: one image per tile, a band of its output rows, [K, n] columns.

// ---- Shared tiles (image path, large weight matrices: see kSharedTileWeightBytes).
bool shared_tiles_fit(const Conv2dGeometry& g, int64_t acc_size) {
  const int64_t weight_bytes =
      g.out_channels / g.groups * (g.column_rows() / g.groups) * acc_size;
  return team_size() > 1 && weight_bytes >= kSharedTileWeightBytes;
}

// Whole images per tile: all threads' share of the column budget in one tile, cut so that
// the tiles are of equal size (a short last tile is a thin GEMM).
TilePlan plan_shared_tiles(const Conv2dGeometry& g, int64_t acc_size) {
  TilePlan p = plan_tiles(g, acc_size);
  const int64_t L = std::max<int64_t>(g.out_area(), 1);
  const int64_t column_bytes = std::max<int64_t>(g.column_rows() * acc_size, 1);
  const int64_t budget_columns = column_budget_bytes() / column_bytes;
  const int64_t preferred = p.threads * std::max(kTileBytes / column_bytes, kMinTileColumns);
  const int64_t target_images = std::max<int64_t>(1, std::min(preferred, budget_columns) / L);
  const int64_t tiles = (g.batch + target_images - 1) / target_images;
  p.images_per_tile = std::max<int64_t>(1, (g.batch + tiles - 1) / std::max<int64_t>(tiles, 1));
  p.rows_per_tile = g.out_h;
  p.bands = 1;
  p.image_groups = (g.batch + p.images_per_tile - 1) / p.images_per_tile;
  p.columns = p.images_per_tile * L;
  return p;
}

template <typename scalar_t>
void conv2d_forward_shared(const at::Tensor& x, const at::Tensor& weight_acc,
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
  for (int64_t group = 0; group < p.image_groups; ++group) {
    const int64_t first = group * p.images_per_tile;
    const int64_t count = std::min(p.images_per_tile, g.batch - first);
    const int64_t n = count * L;
    parallel_for_slots(0, count, 1, p.threads,
                         [&](int64_t begin, int64_t end, int64_t thread) {
      acc_t* image_copy = planes + thread * plane_elems;
      for (int64_t i = begin; i < end; ++i) {
        copy_planes(x_ptr + (first + i) * image_elems, g, image_copy);
        gather_image_columns(image_copy, g, table, columns_t + i * L * K);
      }
    });
    // Outside any parallel region: BLAS runs on all threads.
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      cpu::gemm<acc_t>(false, true, Og, n, Kg, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                       columns_t + grp * Kg, K, acc_t(0), out + grp * Og * n, n);
    }
    parallel_for(0, count * O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        store_output_plane(out, n, first, plane / O, plane % O, g, bias_ptr, y_ptr);
      }
    });
  }
}

template <typename scalar_t>
void conv2d_backward_shared(const at::Tensor& dy, const at::Tensor& x,
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
  for (int64_t group = 0; group < p.image_groups; ++group) {
    const int64_t first = group * p.images_per_tile;
    const int64_t count = std::min(p.images_per_tile, g.batch - first);
    const int64_t n = count * L;
    parallel_for_slots(0, count, 1, p.threads,
                         [&](int64_t begin, int64_t end, int64_t thread) {
      acc_t* image_copy = planes + thread * plane_elems;
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t o = 0; o < O; ++o) load_dy_plane(dy_ptr, first, i, o, g, n, dy_tile);
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

template <typename scalar_t>
void conv2d_forward_kernel(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (window_path_fits(g)) {
      conv2d_forward_window<acc_t>(x, weight_acc, bias_acc, g, output);
      return;
    }
  }
  const TilePlan p = plan_tiles(g, sizeof(acc_t));
  if (row_direct_fits(g)) {
    conv2d_forward_rows<scalar_t>(x, weight_acc, bias_acc, g, p.threads, output);
    return;
  }
  if (image_path_fits(g, p)) {
    if (direct_path_fits(g)) {
      conv2d_forward_direct<scalar_t>(x, weight_acc, bias_acc, g, p, output);
    } else if (shared_tiles_fit(g, sizeof(acc_t))) {
      conv2d_forward_shared<scalar_t>(x, weight_acc, bias_acc, g, plan_shared_tiles(g, sizeof(acc_t)),
                                      output);
    } else {
      conv2d_forward_images<scalar_t>(x, weight_acc, bias_acc, g, p, output);
    }
    return;
  }
  const int64_t O = g.out_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / g.groups;
  const int64_t Kg = K / g.groups;
  // A band of one image goes straight into the output when scalar_t is the compute type;
  // otherwise the tile's result lands in a buffer first.
  const bool direct = p.images_per_tile == 1 && std::is_same_v<scalar_t, acc_t>;
  const int64_t column_elems = reads_input_as_columns(g) && direct ? 0 : K * p.columns;
  const int64_t out_elems = direct ? 0 : O * p.columns;
  at::Tensor buffers = scratch<acc_t>(x, p.threads * (column_elems + out_elems));
  record_column_buffer(p.threads * column_elems * int64_t(sizeof(acc_t)));

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const acc_t* w_ptr = weight_acc.const_data_ptr<acc_t>();
  const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_ptr = output.mutable_data_ptr<scalar_t>();
  acc_t* buffer_base = buffers.mutable_data_ptr<acc_t>();

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_buffer = buffer_base + thread * (column_elems + out_elems);
    acc_t* out_buffer = columns_buffer + column_elems;
    for (int64_t group = begin; group < end; ++group) {
      for_each_tile(g, p, group, [&](const Tile& t) {
        const int64_t n = t.columns(g);
        const auto [cols, ld] = tile_columns<scalar_t, acc_t>(x_ptr, g, t, columns_buffer);
        acc_t* out;
        int64_t ldc;
        if (direct) {
          out = reinterpret_cast<acc_t*>(y_ptr) + t.first * O * L + t.oh_begin * g.out_w;
          ldc = L;
        } else {
          out = out_buffer;
          ldc = n;
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::gemm<acc_t>(false, false, Og, n, Kg, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                           cols + grp * Kg * ld, ld, acc_t(0), out + grp * Og * ldc, ldc);
        }
        if (direct) {
          if (bias_ptr != nullptr) {
            for (int64_t o = 0; o < O; ++o) {
              acc_t* row = out + o * ldc;
              const acc_t b = bias_ptr[o];
              for (int64_t i = 0; i < n; ++i) row[i] += b;
            }
          }
          return;
        }
        const int64_t per_image = (t.oh_end - t.oh_begin) * g.out_w;
        for (int64_t i = 0; i < t.count; ++i) {
          for (int64_t o = 0; o < O; ++o) {
            const acc_t* src = out_buffer + o * n + i * per_image;
            scalar_t* dst = y_ptr + ((t.first + i) * O + o) * L + t.oh_begin * g.out_w;
            const acc_t b = bias_ptr != nullptr ? bias_ptr[o] : acc_t(0);
            for (int64_t l = 0; l < per_image; ++l) dst[l] = static_cast<scalar_t>(src[l] + b);
          }
        }
      });
    }
  });
}

at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "convkit::conv2d_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_bias(op, input, bias, g.out_channels);
  const at::Tensor x = input.contiguous();
  at::Tensor output = cached_empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (output.numel() == 0) return output;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  // Weights and bias in the compute type, [O, K/groups] row-major: converted once per call.
  const at::Tensor weight_acc = weight.to(acc_type).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_acc = has_bias ? bias->to(acc_type).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_forward", [&] {
    conv2d_forward_kernel<scalar_t>(x, weight_acc, bias_acc, g, output);
  });
  return output;
}

// Returns whether it also computed grad_bias (given when wanted): only the row path does.
template <typename scalar_t>
bool conv2d_backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                            const Conv2dGeometry& g, bool need_input_grad, bool need_weight_grad,
                            at::Tensor& grad_input, at::Tensor& grad_weight_acc,
                            at::Tensor* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  if constexpr (same_type) {
    if (window_path_fits(g)) {
      conv2d_backward_window<acc_t>(dy, x, weight_acc, g, need_input_grad, need_weight_grad,
                                    grad_input, grad_weight_acc);
      return false;
    }
  }
  const TilePlan p = plan_tiles(g, sizeof(acc_t));
  if (row_direct_fits(g) && need_weight_grad && !need_input_grad) {
    // A first layer in training: only the weight gradient, along output rows.
    conv2d_weight_grad_rows<scalar_t>(
        dy, x, g, p.threads, grad_weight_acc,
        grad_bias != nullptr ? grad_bias->mutable_data_ptr<scalar_t>() : nullptr);
    return grad_bias != nullptr;
  }
  if (image_path_fits(g, p)) {
    if (!direct_path_fits(g) && shared_tiles_fit(g, sizeof(acc_t))) {
      conv2d_backward_shared<scalar_t>(dy, x, weight_acc, g, plan_shared_tiles(g, sizeof(acc_t)),
                                       need_input_grad, need_weight_grad, grad_input,
                                       grad_weight_acc);
      return false;
    }
    return conv2d_backward_images<scalar_t>(
        dy, x, weight_acc, g, p, need_input_grad, need_weight_grad, grad_input, grad_weight_acc,
        grad_bias != nullptr ? grad_bias->mutable_data_ptr<scalar_t>() : nullptr);
  }
  const int64_t O = g.out_channels;
  const int64_t C = g.in_channels;
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  const int64_t Og = O / g.groups;
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

  parallel_for_slots(0, p.image_groups, 1, p.threads,
                       [&](int64_t begin, int64_t end, int64_t thread) {
    acc_t* columns_buffer = buffer_base + thread * per_thread;
    acc_t* dy_buffer = columns_buffer + column_elems;
    acc_t* grad_acc = dy_buffer + dy_elems;
    acc_t* weight_grad = grad_acc + grad_acc_elems;
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * p.images_per_tile;
      const int64_t count = std::min(p.images_per_tile, g.batch - first);
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
          for (int64_t o = 0; o < O; ++o) {
            for (int64_t i = 0; i < t.count; ++i) {
              const scalar_t* src = dy_ptr + ((t.first + i) * O + o) * L + t.oh_begin * g.out_w;
              acc_t* dst = dy_buffer + o * n + i * per_image;
              for (int64_t l = 0; l < per_image; ++l) dst[l] = static_cast<acc_t>(src[l]);
            }
          }
          dy_tile = dy_buffer;
          ld_dy = n;
        }
        if (need_weight_grad) {
          const auto [cols, ld] = tile_columns<scalar_t, acc_t>(x_ptr, g, t, columns_buffer);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            cpu::gemm<acc_t>(false, true, Og, Kg, n, acc_t(1), dy_tile + grp * Og * ld_dy, ld_dy,
                             cols + grp * Kg * ld, ld, acc_t(1), weight_grad + grp * Og * Kg, Kg);
          }
        }
        if (!need_input_grad) return;
        if (input_as_columns) {
          // 1x1 stride 1: the column gradient is the input gradient (no overlap, no adds).
          acc_t* dst = reinterpret_cast<acc_t*>(dx_ptr) + t.first * image_elems + t.oh_begin * g.out_w;
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            cpu::gemm<acc_t>(true, false, Kg, n, Og, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                             dy_tile + grp * Og * ld_dy, ld_dy, acc_t(0), dst + grp * Kg * L, L);
          }
          return;
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          cpu::gemm<acc_t>(true, false, Kg, n, Og, acc_t(1), w_ptr + grp * Og * Kg, Kg,
                           dy_tile + grp * Og * ld_dy, ld_dy, acc_t(0), columns_buffer + grp * Kg * n, n);
        }
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
  return false;
}

// The bias gradient: each (image, channel) plane summed in acc_t, planes in double.
template <typename scalar_t>
void conv2d_bias_grad(const scalar_t* dy, const Conv2dGeometry& g, scalar_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = g.out_channels;
  const int64_t L = g.out_area();
  parallel_for(0, O, grain_for(g.batch * L), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      double sum = 0.0;
      for (int64_t b = 0; b < g.batch; ++b) {
        const scalar_t* src = dy + (b * O + o) * L;
        acc_t plane = acc_t(0);
#pragma omp simd reduction(+ : plane)
        for (int64_t l = 0; l < L; ++l) plane += static_cast<acc_t>(src[l]);
        sum += static_cast<double>(plane);
      }
      grad_bias[o] = static_cast<scalar_t>(sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "convkit::conv2d_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Conv2dGeometry g = make_conv2d_geometry(op, input, weight, stride, padding, dilation, groups);
  check_conv2d_grad_output(op, input, grad_output, g);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const int64_t O = g.out_channels;
  const int64_t Kg = g.column_rows() / groups;

  at::Tensor grad_input =
      output_mask[0] ? cached_empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_weight_acc =
      output_mask[1] ? at::zeros({O, Kg}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({O}, x.options()) : at::empty({0}, x.options());

  const bool columns_pass = (output_mask[0] || output_mask[1]) && g.batch > 0 && g.out_area() > 0;
  bool bias_done = false;
  if (columns_pass) {
    const at::Tensor weight_acc = weight.to(acc_type).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_backward", [&] {
      bias_done = conv2d_backward_kernel<scalar_t>(dy, x, weight_acc, g, output_mask[0],
                                                   output_mask[1], grad_input, grad_weight_acc,
                                                   output_mask[2] ? &grad_bias : nullptr);
    });
  } else if (output_mask[0]) {
    grad_input.zero_();
  }
  if (output_mask[2] && O > 0 && !bias_done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_bias_grad", [&] {
      conv2d_bias_grad(dy.const_data_ptr<scalar_t>(), g, grad_bias.mutable_data_ptr<scalar_t>());
    });
  }
  at::Tensor grad_weight = output_mask[1] ? grad_weight_acc.to(x.scalar_type()).view(weight.sizes())
                                          : at::empty({0}, x.options());
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

// col2im of one image by gather (csrc/conv2d.h's col2im_gather, the index math the CUDA
// kernel runs): each input element written once.
template <typename scalar_t>
void col2im_gather_image(const scalar_t* columns, const Conv2dGeometry& g, scalar_t* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = g.out_area();
  parallel_for(0, g.in_channels, grain_for(g.in_area() * g.kernel_area()),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      scalar_t* dst = grad_input + c * g.in_area();
      for (int64_t ih = 0; ih < g.in_h; ++ih) {
        for (int64_t iw = 0; iw < g.in_w; ++iw) {
          dst[ih * g.in_w + iw] =
              static_cast<scalar_t>(col2im_gather<scalar_t, acc_t>(columns, L, g, c, ih, iw));
        }
      }
    }
  });
}

// F.unfold's semantics, one element at a time through the shared helper im2col_value: the
// reference the row-wise im2col above (and the CUDA kernel) can be checked against.
at::Tensor im2col_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g =
      make_im2col_geometry("convkit::im2col", input, kernel_size, dilation, padding, stride);
  const at::Tensor x = input.contiguous();
  const int64_t K = g.column_rows();
  const int64_t L = g.out_area();
  at::Tensor columns = cached_empty({g.batch, K, L}, x.options());
  if (columns.numel() == 0) return columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "im2col_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* col_ptr = columns.mutable_data_ptr<scalar_t>();
    parallel_for(0, g.batch * K, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / K;
        const int64_t row = task % K;
        const scalar_t* image = x_ptr + b * g.in_channels * g.in_area();
        scalar_t* dst = col_ptr + task * L;
        for (int64_t pos = 0; pos < L; ++pos) dst[pos] = im2col_value(image, g, row, pos);
      }
    });
  });
  return columns;
}

// F.fold's semantics: every input element gathers the column entries copied from it.
at::Tensor col2im_cpu(const at::Tensor& columns, at::IntArrayRef output_size,
                      at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                      at::IntArrayRef padding, at::IntArrayRef stride) {
  const Conv2dGeometry g = make_col2im_geometry("convkit::col2im", columns, output_size,
                                                kernel_size, dilation, padding, stride);
  const at::Tensor cols = columns.contiguous();
  at::Tensor output = cached_empty({g.batch, g.in_channels, g.in_h, g.in_w}, cols.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im_cpu", [&] {
    const scalar_t* col_ptr = cols.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
    const int64_t K = g.column_rows();
    const int64_t L = g.out_area();
    for (int64_t b = 0; b < g.batch; ++b) {
      col2im_gather_image(col_ptr + b * K * L, g, out_ptr + b * g.in_channels * g.in_area());
    }
  });
  return output;
}

}  // namespace

// While CUDA emulation is on in the calling thread, each op runs its CUDA code on the CPU
// instead (csrc/cuda_emu/routing.h).
TORCH_LIBRARY_IMPL(convkit, CPU, m) {
  m.impl("conv2d_forward",
         &RoutedKernel<&conv2d_forward_cpu, &emulated_cuda::conv2d_forward>::call);
  m.impl("conv2d_backward",
         &RoutedKernel<&conv2d_backward_cpu, &emulated_cuda::conv2d_backward>::call);
  m.impl("im2col", &RoutedKernel<&im2col_cpu, &emulated_cuda::im2col>::call);
  m.impl("col2im", &RoutedKernel<&col2im_cpu, &emulated_cuda::col2im>::call);
}

}  // namespace convkit
