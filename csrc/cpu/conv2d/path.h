// Which algorithm the CPU conv2d runs for a layer: the one place that decides, top-down.
//
//   channels_last            the layer's input or weight is channels-last (torch's rule,
//                 csrc/memory_format.h): columns of NHWC runs and our GEMM, positions as the
//                 GEMM's rows, any geometry (channels_last.cpp); its output stays NHWC.
//   channels_last_depthwise  the same for depthwise layers: direct, channels in the lanes
//                 (channels_last_depthwise.cpp).
//   Contiguous (NCHW) layers take one of:
//   depthwise     groups == in_channels == out_channels > 1 (one filter per channel,
//                 MobileNet's 3x3): direct convolution, 16 channels in the lanes on small
//                 maps (depthwise_blocks.cpp), positions in the lanes plane by plane on
//                 larger ones (depthwise.cpp; depthwise_blocks_fit). Any kernel, stride,
//                 padding, dilation; forward and both gradients. A channel multiplier > 1
//                 keeps the paths below.
//   window        one output position per image, from an image no larger than the kernel
//                 (a last layer: 2x2 -> 1x1): one GEMM over the images read in place
//                 (window.cpp). float and double only: half types keep the image paths,
//                 which widen as they gather.
//   rows          first layers (<= 16 outputs, C*kH*kW <= 64 taps, output rows >= 8 wide,
//                 groups 1): direct convolution with 16 positions of a row in the vector lanes
//                 (rows.cpp). Forward, and the weight gradient when no input gradient is
//                 wanted (a network's first layer).
//   implicit_gemm 8-64 output channels on small maps (groups 1; <= 32 outputs with >= 16
//                 positions, or <= 64 on rows narrower than 8 with >= 4 positions): output
//                 channels in the lanes, inputs read through an offset table, no column matrix
//                 (implicit_gemm.h/.cpp). Forward and weight gradient.
//   transposed_implicit_gemm   the input gradient of implicit_gemm layers with 9-32 input
//                 channels: input channels in the lanes, positions grouped by their phase
//                 modulo the stride (transposed_input_grad.h).
//   tap_classes   the forward and the input gradient (a stride-1 conv itself) of stride-1
//                 layers on narrow output rows (< 8) where many
//                 im2col products multiply padding (ResNet's 3x3 pad 1: 31% at 4x4, 56% at
//                 2x2; tap_class_work_share): positions grouped by their valid taps, one GEMM
//                 per group over only those taps against a weight packed once per call, all
//                 threads on one tile (tap_classes.cpp). float, AVX-512, our packed GEMM.
//   images        whole images per tile, narrow output rows (< 8): a branch-free gather into
//                 transposed column matrices and our GEMM (images.cpp, images_backward.cpp);
//                 the backward pass of the implicit GEMM family runs here too.
//   shared_tiles  images-path layers whose weight matrix is >= 2 MiB (ResNet's 512-channel
//                 convs) on more than one thread: one tile at a time for all threads and one
//                 threaded GEMM sharing its packed weights (shared_tiles.cpp).
//   bands         everything else (large images): bands of output rows of one image, their
//                 columns copied row-wise (bands.cpp).
// The thresholds below are where the paths were measured to win (docs/performance-notes.md);
// tests/test_conv2d_paths.py asserts the path of each shape it names (conv2d_cpu_plan).
// Tiles: a thread's tile holds ~384 KiB of columns (L2) but at least 384 columns, so that
// large weight matrices are reused enough per load; CONVKIT_COLUMN_BUDGET_MB bounds all
// threads' tiles together (down to one output row) and can move a layer from the image
// family to the bands path (tiles.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../../conv2d.h"
#include "../gemm.h"
#include "../parallel.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {

enum class ConvPath : uint8_t {
  kNone,  // the gradient is not wanted
  kChannelsLast,
  kChannelsLastDepthwise,
  kDepthwise,
  kWindow,
  kRows,
  kImplicitGemm,
  kTransposedImplicitGemm,
  kTapClasses,
  kImages,
  kSharedTiles,
  kBands,
};

inline const char* path_name(ConvPath path) {
  switch (path) {
    case ConvPath::kNone: return "none";
    case ConvPath::kChannelsLast: return "channels_last";
    case ConvPath::kChannelsLastDepthwise: return "channels_last_depthwise";
    case ConvPath::kDepthwise: return "depthwise";
    case ConvPath::kWindow: return "window";
    case ConvPath::kRows: return "rows";
    case ConvPath::kImplicitGemm: return "implicit_gemm";
    case ConvPath::kTransposedImplicitGemm: return "transposed_implicit_gemm";
    case ConvPath::kTapClasses: return "tap_classes";
    case ConvPath::kImages: return "images";
    case ConvPath::kSharedTiles: return "shared_tiles";
    case ConvPath::kBands: return "bands";
  }
  return "?";
}

// ---- The thresholds.

// Rows: output channels in registers, taps per output position, the narrowest row.
constexpr int64_t kMaxRowChannels = 16;
constexpr int64_t kMaxRowTaps = 64;
constexpr int64_t kMinRowWidth = 8;
// Output rows at least this wide are copied as runs (the bands path's im2col, which the
// compiler vectorises); narrower ones go through the images path's gather table.
constexpr int64_t kMinRunWidth = 8;
// The implicit GEMM: up to 32 output channels (blocks of 8, 16 or 32) with enough positions
// per image to fill a step (4-16 a step; fewer would mostly compute padding), or 33-64
// channels (blocks of 64, 4 positions a step) on rows narrower than kMinRunWidth.
constexpr int64_t kMaxImplicitChannels = 32;
constexpr int64_t kMinImplicitPositions = 16;
constexpr int64_t kMaxImplicitChannelsNarrow = 64;
constexpr int64_t kMinImplicitPositionsNarrow = 4;
// Positions per call of the implicit GEMM's weight-gradient kernel (a chunk of whole images).
constexpr int64_t kImplicitChunkPositions = 64;
// The transposed implicit GEMM: 9-32 input channels (16 lanes; with <= 8 channels the images
// path's GEMM and gather measured faster), chunks of up to 8 images.
constexpr int64_t kMinTransposedChannels = 9;
constexpr int64_t kMaxTransposedChannels = 32;
constexpr int64_t kTransposedChunkImages = 8;
// A group's weight matrix at least this large (ResNet-18's 512-channel 3x3: 9.4 MB) does not
// stay in a core's cache next to a tile: all threads then work on one tile (shared tiles).
constexpr int64_t kSharedTileWeightBytes = int64_t(2) << 20;

// ---- The predicates: whether a path can run a layer.

inline bool depthwise_fits(const Conv2dGeometry& g) {
  return g.groups > 1 && g.in_channels == g.groups && g.out_channels == g.groups;
}

// Within the depthwise path, how a plane is laid out: with 16 channels in the lanes
// (depthwise_blocks.cpp: two transposes per plane, no per-plane fixed cost) or plane by plane
// (depthwise.cpp: phase copies and flat loops, ~200 cycles a plane of fixed cost). Measured on
// 3x3 layers (min of repeats): the forward on blocks 0.39 against 0.59 ms at [32,96,16,16] on
// one thread, 4.5x faster at 4x4; at 32x32 on two threads 0.72-1.09 against 1.34-2.5 ms at
// stride 2, and within the noise at stride 1 (1.08-1.31 against 0.94-1.89); at 56x56 the
// planes were faster on one thread (1.9 against 2.5 ms), even on two. The backward was
// faster on blocks at every measured size up to 56x56 (32x32, one thread: 4.6 against 6.4
// ms); above, it is unmeasured on blocks.
constexpr int64_t kDepthwiseBlocksForwardArea = 32 * 32;
constexpr int64_t kDepthwiseBlocksBackwardArea = 56 * 56;

inline bool depthwise_blocks_fit(const Conv2dGeometry& g, bool forward) {
  return g.in_area() <= (forward ? kDepthwiseBlocksForwardArea : kDepthwiseBlocksBackwardArea);
}

inline bool window_fits(const Conv2dGeometry& g) {
  return g.out_h == 1 && g.out_w == 1 && g.in_area() <= g.kernel_area();
}

inline bool rows_fit(const Conv2dGeometry& g) {
  return g.groups == 1 && g.out_channels <= kMaxRowChannels && g.out_w >= kMinRowWidth &&
         g.in_channels * g.kernel_area() <= kMaxRowTaps;
}

inline bool implicit_gemm_fits(const Conv2dGeometry& g) {
  if (g.groups != 1) return false;
  if (g.out_channels <= kMaxImplicitChannels) return g.out_area() >= kMinImplicitPositions;
  return g.out_channels <= kMaxImplicitChannelsNarrow && g.out_w < kMinRunWidth &&
         g.out_area() >= kMinImplicitPositionsNarrow;
}

// Whole images per tile and narrow rows (or an implicit GEMM layer), within the gather
// table's int32 offsets.
inline bool image_family_fits(const Conv2dGeometry& g, const TilePlan& p) {
  return p.whole_images() && (g.out_w < kMinRunWidth || implicit_gemm_fits(g)) &&
         g.in_channels * (g.in_area() + 1) < std::numeric_limits<int32_t>::max();
}

inline bool transposed_input_grad_fits(const Conv2dGeometry& g) {
  // The layout's offsets are int32: into a chunk's dY copy ((L + 1) rows of <= 64 channels
  // per image) and its sums (area rows per image). A chunk has at most 8 images, or the
  // weight gradient's chunk of <= kImplicitChunkPositions images when that is larger.
  const int64_t max_chunk = std::max(kTransposedChunkImages, kImplicitChunkPositions);
  const int64_t image_rows = std::max((g.out_area() + 1) * kMaxImplicitChannelsNarrow, g.in_area());
  return implicit_gemm_fits(g) && g.in_channels >= kMinTransposedChannels &&
         g.in_channels <= kMaxTransposedChannels &&
         max_chunk * image_rows < std::numeric_limits<int32_t>::max();
}

// The tap classes (the forward; the input gradient through input_grad_tap_classes_fit), on
// the shared tiles' plan `shared` (plan_shared_tiles). Above kMaxTapClassWork of
// im2col's GEMM work (tap_class_work_share) the classes' extra products, their narrower
// GEMMs and the weight's packing per call cost about what the skipped products save
// (ResNet-18's 512-channel 7x7 layer at N=8: 0.91 of the work, 0.94 of the time; at N=1 the
// classes are 1.6x the work and took 1.7x the time).
constexpr double kMaxTapClassWork = 0.92;

inline bool tap_classes_fit(const Conv2dGeometry& g, int64_t acc_size, bool same_type,
                            const TilePlan& tiles, const TilePlan& shared) {
#if defined(__AVX512F__)
  return same_type && acc_size == 4 && cpu::use_packed_gemm() && g.groups == 1 &&
         g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         tiles.whole_images() && g.out_w < kMinRunWidth &&
         tap_class_work_share(g, shared.images_per_tile) <= kMaxTapClassWork &&
         shared.images_per_tile *
                 std::max(g.in_channels * g.in_area(), g.out_channels * g.out_area()) <
             std::numeric_limits<int32_t>::max();
#else
  (void)g, (void)acc_size, (void)same_type, (void)tiles, (void)shared;
  return false;
#endif
}

// The input gradient by tap classes: that of a stride-1, ungrouped layer whose input gradient,
// as a conv (transposed_geometry), fits them.
inline bool input_grad_tap_classes_fit(const Conv2dGeometry& g, int64_t acc_size, bool same_type,
                                       int64_t threads) {
  if (g.groups != 1 || g.stride_h != 1 || g.stride_w != 1 || g.dilation_h != 1 ||
      g.dilation_w != 1 || g.pad_h >= g.kernel_h || g.pad_w >= g.kernel_w) {
    return false;
  }
  const Conv2dGeometry t = transposed_geometry(g);
  return tap_classes_fit(t, acc_size, same_type, plan_tiles(t, acc_size, threads),
                         plan_shared_tiles(t, acc_size, threads));
}

inline bool shared_tiles_fit(const Conv2dGeometry& g, int64_t acc_size, int64_t threads) {
  const int64_t weight_bytes =
      g.out_channels / g.groups * (g.column_rows() / g.groups) * acc_size;
  return threads > 1 && weight_bytes >= kSharedTileWeightBytes;
}

// ---- The choice.

struct ConvPlan {
  ConvPath forward = ConvPath::kNone;
  ConvPath weight_grad = ConvPath::kNone;
  ConvPath input_grad = ConvPath::kNone;
  // On the implicit GEMM family (its weight gradient's layout shapes the images path's
  // backward buffers even when only the input gradient is wanted).
  bool implicit_gemm_layout = false;
  TilePlan tiles{};  // the tiles the chosen paths run on (the shared tiles' when they run)
};

// acc_size: bytes of the compute type; same_type: the input is already of the compute type
// (float, double), which the window path needs; channels_last: the frame hands the kernels
// channels-last memory.
inline ConvPlan choose_forward(const Conv2dGeometry& g, int64_t acc_size, bool same_type,
                               bool channels_last) {
  ConvPlan plan;
  if (channels_last) {
    plan.forward = depthwise_fits(g) ? ConvPath::kChannelsLastDepthwise : ConvPath::kChannelsLast;
    return plan;
  }
  if (depthwise_fits(g)) {
    plan.forward = ConvPath::kDepthwise;
    return plan;
  }
  const int64_t threads = team_size();
  if (same_type && window_fits(g)) {
    plan.forward = ConvPath::kWindow;
    return plan;
  }
  plan.tiles = plan_tiles(g, acc_size, threads);
  if (rows_fit(g)) {
    plan.forward = ConvPath::kRows;
  } else if (!image_family_fits(g, plan.tiles)) {
    plan.forward = ConvPath::kBands;
    plan.tiles = band_tiles(g, plan.tiles, same_type);
  } else if (implicit_gemm_fits(g)) {
    plan.forward = ConvPath::kImplicitGemm;
  } else if (const TilePlan shared = plan_shared_tiles(g, acc_size, threads);
             tap_classes_fit(g, acc_size, same_type, plan.tiles, shared)) {
    plan.forward = ConvPath::kTapClasses;
    plan.tiles = shared;
  } else if (shared_tiles_fit(g, acc_size, threads)) {
    plan.forward = ConvPath::kSharedTiles;
    plan.tiles = shared;
  } else {
    plan.forward = ConvPath::kImages;
  }
  return plan;
}

inline ConvPlan choose_backward(const Conv2dGeometry& g, int64_t acc_size, bool same_type,
                                bool channels_last, bool need_input_grad, bool need_weight_grad) {
  ConvPlan plan;
  auto both = [&](ConvPath path) {
    plan.input_grad = need_input_grad ? path : ConvPath::kNone;
    plan.weight_grad = need_weight_grad ? path : ConvPath::kNone;
  };
  if (!need_input_grad && !need_weight_grad) return plan;
  if (channels_last) {
    both(depthwise_fits(g) ? ConvPath::kChannelsLastDepthwise : ConvPath::kChannelsLast);
    return plan;
  }
  if (depthwise_fits(g)) {
    both(ConvPath::kDepthwise);
    return plan;
  }
  const int64_t threads = team_size();
  if (same_type && window_fits(g)) {
    both(ConvPath::kWindow);
    return plan;
  }
  if (need_input_grad && input_grad_tap_classes_fit(g, acc_size, same_type, threads)) {
    // The weight gradient (when wanted) runs as if alone.
    ConvPlan weight_only =
        need_weight_grad ? choose_backward(g, acc_size, same_type, false, false, true) : plan;
    weight_only.input_grad = ConvPath::kTapClasses;
    return weight_only;
  }
  plan.tiles = plan_tiles(g, acc_size, threads);
  if (rows_fit(g) && need_weight_grad && !need_input_grad) {
    plan.weight_grad = ConvPath::kRows;
  } else if (!image_family_fits(g, plan.tiles)) {
    both(ConvPath::kBands);
    plan.tiles = band_tiles(g, plan.tiles, same_type);
  } else if (!implicit_gemm_fits(g) && shared_tiles_fit(g, acc_size, threads)) {
    both(ConvPath::kSharedTiles);
    plan.tiles = plan_shared_tiles(g, acc_size, threads);
  } else {
    plan.implicit_gemm_layout = implicit_gemm_fits(g);
    if (need_weight_grad) {
      plan.weight_grad = plan.implicit_gemm_layout ? ConvPath::kImplicitGemm : ConvPath::kImages;
    }
    if (need_input_grad) {
      plan.input_grad = transposed_input_grad_fits(g) ? ConvPath::kTransposedImplicitGemm
                                                      : ConvPath::kImages;
    }
  }
  return plan;
}

// The op convkit::conv2d_cpu_plan (ops.cpp): the names of the paths a CPU conv2d of these
// tensors' shapes and dtype runs on this thread count, (forward, input gradient, weight
// gradient) for the wanted gradients gradient_mask = (input, weight), "none" where a
// gradient is not wanted. For tests and for users who read the kernels. The memory format is
// the tensors' own (a channels-last input or weight: the channels_last paths).
std::tuple<std::string, std::string, std::string> conv2d_cpu_plan(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> gradient_mask);

// The op convkit::conv2d_cpu_thread_images (ops.cpp): how many images each thread's tiles hold
// in the forward pass of the images and bands paths (thread_images, tiles.h); empty on the
// paths that split their work otherwise. A test aid: the tiles' balance.
std::vector<int64_t> conv2d_cpu_thread_images(const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups);

}  // namespace convkit::cpu_conv2d
