// Single-precision GEMM of our own for AVX-512 hosts: C = alpha * op(A) @ op(B) + beta * C,
// every matrix row-major with a leading dimension, op() an optional transpose.
//
// Why: the conv paths that go through a GEMM (image and band paths, every input gradient)
// spend most of their time in it, and MKL's sgemm runs on this Zen 4 at ~91 GFLOP/s on one
// core (ResNet-18 layer4's forward product, [512, 4608] @ [4608, 1568], torch.mm on one
// thread), where a register-tile loop like the one below reaches ~113 in L1 (the core's FMA
// rate: one 16-lane FMA a cycle) and oneDNN's convolution ~133 counted in nominal FLOPs
// (it skips the products with padding zeros that im2col makes; ~110 in real ones).
//
// Algorithm (the Goto/BLIS layering): the depth k is cut into blocks of kDepthBlock; for each
// block, a block of op(B) (kDepthBlock x up to kColumnBlock) is packed into panels of
// kPanelColumns columns, [depth][32] each, and a block of op(A) (up to kRowBlock x
// kDepthBlock) into panels of kPanelRows rows, [depth][12]. A micro-kernel multiplies one
// A panel by one B panel into a 12 x 32 tile of C held in 24 zmm accumulators: per depth
// step two 16-lane loads of B, twelve broadcasts of A, 24 FMAs (one FMA a cycle on Zen 4,
// loads to spare). The B panel (32 KiB at full depth) stays in L1 while the A panels stream
// from L2 (the A block is <= 384 KiB); the B block (<= 1.5 MiB) is reused by every A block
// from L2/L3. Packing pads with zeros, so the micro-kernel never branches; partial tiles are
// written with masked stores. Packing a transposed operand goes through 16 x 16 in-register
// transposes, so no operand layout is a slow one.
//
// Threads: called inside a parallel region (the conv tiles: one thread per tile) it runs on
// the calling thread; called outside one with more than one thread (the shared tiles of
// large weight matrices) it splits C's columns into one contiguous range per thread, each
// thread packing its own B range and (again) A. The packing buffers are per thread and kept
// between calls (<= 1.9 MiB per thread), so no call allocates.
//
// Results are deterministic: each C element is a fixed-order sum (depth blocks in order,
// depth steps in order within a block), whatever the thread count.
//
// A last column panel of <= 16 columns runs a one-vector micro-kernel instead of the whole
// 32-column panel (the chapter's input gradients have 72 and 144 columns).
// Floor: one core's FMA throughput; the measured rate against MKL's is in
// docs/performance-notes.md.
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace convkit {
namespace cpu {
namespace packed_gemm {

constexpr int64_t kPanelRows = 12;
constexpr int64_t kPanelColumns = 32;
constexpr int64_t kDepthBlock = 256;
constexpr int64_t kRowBlock = 384;      // a multiple of kPanelRows: 384 KiB of packed A
constexpr int64_t kColumnBlock = 1536;  // a multiple of kPanelColumns: 1.5 MiB of packed B
static_assert(kRowBlock % kPanelRows == 0, "row blocks hold whole panels");
static_assert(kColumnBlock % kPanelColumns == 0, "column blocks hold whole panels");

// op(X)[i, j]: X is stored [rows, cols] with leading dimension ld, or, when transposed, it is
// stored [cols, rows] and read across.
struct Operand {
  const float* data;
  int64_t ld;
  bool transposed;
};

inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
}

// rows[j] <- column j of the 16 x 16 block held in rows[0..15] (rows[i] = row i).
inline void transpose_16x16(__m512 rows[16]) {
  __m512 pairs[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // quads[4g + c], 128-bit lane l: rows 4g..4g+3 of column 4l + c.
  __m512 quads[16];
  for (int g = 0; g < 4; ++g) {
    const __m512* p = pairs + 4 * g;
    quads[4 * g + 0] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 1] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(3, 2, 3, 2));
    quads[4 * g + 2] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 3] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even_low = _mm512_shuffle_f32x4(quads[c], quads[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd_low = _mm512_shuffle_f32x4(quads[c], quads[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 even_high =
        _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 odd_high =
        _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    rows[c] = _mm512_shuffle_f32x4(even_low, even_high, _MM_SHUFFLE(2, 0, 2, 0));
    rows[8 + c] = _mm512_shuffle_f32x4(even_low, even_high, _MM_SHUFFLE(3, 1, 3, 1));
    rows[4 + c] = _mm512_shuffle_f32x4(odd_low, odd_high, _MM_SHUFFLE(2, 0, 2, 0));
    rows[12 + c] = _mm512_shuffle_f32x4(odd_low, odd_high, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Writes `width` (<= 16) consecutive values of a line of a stored matrix into `lanes` lanes
// of the panel, one panel row per depth step: the stored matrix runs along the panel's
// lanes (a transposed op(A); a stored B goes through pack_b_rows), so every depth step is
// one masked copy.
inline void pack_lanes_direct(const float* src, int64_t ld, int64_t depth, int64_t width,
                              int64_t panel_width, float* dst) {
  const __mmask16 mask = lane_mask(width);
  for (int64_t p = 0; p < depth; ++p) {
    _mm512_mask_storeu_ps(dst + p * panel_width, lane_mask(std::min<int64_t>(16, panel_width)),
                          _mm512_maskz_loadu_ps(mask, src + p * ld));
  }
}

#if defined(__AVX512VL__)
// Two 8 x 8 transposes side by side, one per 256-bit half: in each half, rows[j] <- column
// j of the 8 x 8 block held in rows[0..7]. 24 shuffles where transpose_16x16 takes 64: for
// blocks of 8 channels, which would fill only half of its registers.
inline void transpose_8x8_halves(__m512 rows[8]) {
  __m512 pairs[8];
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  // quads[4g + c], 128-bit lanes 0 and 2: rows 4g..4g+3 of column c; lanes 1 and 3: of c + 4.
  __m512 quads[8];
  for (int g = 0; g < 2; ++g) {
    const __m512* p = pairs + 4 * g;
    quads[4 * g + 0] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 1] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(3, 2, 3, 2));
    quads[4 * g + 2] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(1, 0, 1, 0));
    quads[4 * g + 3] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // Each half's column: rows 0-3 from quads[c], rows 4-7 from quads[4 + c].
  const __m512i low =
      _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i high =
      _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int c = 0; c < 4; ++c) {
    rows[c] = _mm512_permutex2var_ps(quads[c], low, quads[4 + c]);
    rows[4 + c] = _mm512_permutex2var_ps(quads[c], high, quads[4 + c]);
  }
}
#endif

// The stored matrix runs along the depth: 16 of its lines (`width` of them real, the rest
// zero) are transposed 16 depth steps at a time into `panel_lanes` (<= 16) lanes.
inline void pack_lanes_transposed(const float* src, int64_t ld, int64_t depth, int64_t width,
                                  int64_t panel_width, int64_t panel_lanes, float* dst) {
  const __mmask16 store_mask = lane_mask(panel_lanes);
  __m512 block[16];
  for (int64_t p0 = 0; p0 < depth; p0 += 16) {
    const int64_t steps = std::min<int64_t>(16, depth - p0);
    const __mmask16 load_mask = lane_mask(steps);
    for (int64_t line = 0; line < 16; ++line) {
      block[line] = line < width ? _mm512_maskz_loadu_ps(load_mask, src + line * ld + p0)
                                 : _mm512_setzero_ps();
    }
    transpose_16x16(block);
    for (int64_t q = 0; q < steps; ++q) {
      _mm512_mask_storeu_ps(dst + (p0 + q) * panel_width, store_mask, block[q]);
    }
  }
}

// op(A)[row0 : row0 + rows, depth0 : depth0 + depth] -> panels of kPanelRows rows, each
// [depth][kPanelRows], zero-padded past `rows`.
inline void pack_a(const Operand& a, int64_t row0, int64_t rows, int64_t depth0, int64_t depth,
                   float* dst) {
  for (int64_t r = 0; r < rows; r += kPanelRows) {
    const int64_t width = std::min<int64_t>(kPanelRows, rows - r);
    if (a.transposed) {
      pack_lanes_direct(a.data + depth0 * a.ld + row0 + r, a.ld, depth, width, kPanelRows, dst);
    } else {
      pack_lanes_transposed(a.data + (row0 + r) * a.ld + depth0, a.ld, depth, width, kPanelRows,
                            kPanelRows, dst);
    }
    dst += depth * kPanelRows;
  }
}

// pack_b of a B stored [depth][cols] (not transposed), one stored row at a time: the reads
// run along B's rows, which the hardware prefetchers follow (a panel's walk down the depth
// would touch one cache line per row at a stride of ldb; docs/performance-notes.md). Each
// row's 16-column halves land at their panel's depth row; the half past an odd count of
// halves is zeroed. dst is 64-byte aligned (aligned stores).
inline void pack_b_rows(const Operand& b, int64_t depth0, int64_t depth, int64_t col0,
                        int64_t cols, float* dst) {
  const int64_t full_halves = cols / 16;
  const int64_t rest = cols - full_halves * 16;
  const int64_t halves = full_halves + (rest > 0 ? 1 : 0);
  const __mmask16 rest_mask = lane_mask(rest);
  const int64_t panel_floats = depth * kPanelColumns;
  for (int64_t p = 0; p < depth; ++p) {
    const float* src = b.data + (depth0 + p) * b.ld + col0;
    float* row_dst = dst + p * kPanelColumns;
    for (int64_t h = 0; h < full_halves; ++h) {
      _mm512_store_ps(row_dst + (h / 2) * panel_floats + (h % 2) * 16,
                      _mm512_loadu_ps(src + 16 * h));
    }
    if (rest > 0) {
      _mm512_store_ps(row_dst + (full_halves / 2) * panel_floats + (full_halves % 2) * 16,
                      _mm512_maskz_loadu_ps(rest_mask, src + 16 * full_halves));
    }
    if (halves % 2 == 1) {
      _mm512_store_ps(row_dst + (halves / 2) * panel_floats + 16, _mm512_setzero_ps());
    }
  }
}

// op(B)[depth0 : depth0 + depth, col0 : col0 + cols] -> panels of kPanelColumns columns, each
// [depth][kPanelColumns], zero-padded past `cols`. dst must be 64-byte aligned (the thread
// buffers are; each panel is a multiple of 128 bytes).
inline void pack_b(const Operand& b, int64_t depth0, int64_t depth, int64_t col0, int64_t cols,
                   float* dst) {
  if (!b.transposed) {
    pack_b_rows(b, depth0, depth, col0, cols, dst);
    return;
  }
  for (int64_t c = 0; c < cols; c += kPanelColumns) {
    for (int64_t half = 0; half < kPanelColumns; half += 16) {
      const int64_t width = std::max<int64_t>(0, std::min<int64_t>(16, cols - c - half));
      float* half_dst = dst + half;
      pack_lanes_transposed(b.data + (col0 + c + half) * b.ld + depth0, b.ld, depth, width,
                            kPanelColumns, 16, half_dst);
    }
    dst += depth * kPanelColumns;
  }
}

// C tile (kRows x columns, columns <= 16 * kVectors) = alpha * A panel @ B panel + (first ?
// beta * C : C), the A panel holding kPanelRows rows of which the first kRows are used (a
// partial last panel computes only its real rows). kVectors = 1 for a last column panel of
// <= 16 columns, which then computes only its real half (the 8->16 layer's input-gradient
// GEMM has 72 columns: 32 + 32 + 8). beta == 0 on the first block does not read C (BLAS
// semantics: NaNs there do not leak).
template <int kRows, int kVectors>
void micro_kernel(int64_t depth, const float* __restrict a_panel, const float* __restrict b_panel,
                  float* c, int64_t ldc, int64_t columns, float alpha, float beta, bool first) {
  static_assert(kVectors == 1 || kVectors == 2, "a panel is two vectors wide");
  __m512 acc[kRows][kVectors];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < depth; ++p) {
    __m512 b_vectors[kVectors];
    for (int v = 0; v < kVectors; ++v) b_vectors[v] = _mm512_load_ps(b_panel + 16 * v);
    for (int i = 0; i < kRows; ++i) {
      const __m512 a_value = _mm512_set1_ps(a_panel[i]);
      for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_fmadd_ps(a_value, b_vectors[v], acc[i][v]);
    }
    a_panel += kPanelRows;
    b_panel += kPanelColumns;
  }
  __mmask16 masks[kVectors];
  for (int v = 0; v < kVectors; ++v) masks[v] = lane_mask(std::max<int64_t>(0, columns - 16 * v));
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  const __m512 beta_v = _mm512_set1_ps(first ? beta : 1.0f);
  const bool read_c = !first || beta != 0.0f;
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVectors; ++v) {
      float* c_part = c + i * ldc + 16 * v;
      __m512 out = _mm512_mul_ps(alpha_v, acc[i][v]);
      if (read_c) out = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(masks[v], c_part), out);
      _mm512_mask_storeu_ps(c_part, masks[v], out);
    }
  }
}

using MicroKernel = void (*)(int64_t, const float*, const float*, float*, int64_t, int64_t, float,
                             float, bool);

template <int kVectors>
inline MicroKernel micro_kernel_with(int64_t rows) {
  static constexpr MicroKernel kernels[kPanelRows] = {
      micro_kernel<1, kVectors>, micro_kernel<2, kVectors>,  micro_kernel<3, kVectors>,
      micro_kernel<4, kVectors>, micro_kernel<5, kVectors>,  micro_kernel<6, kVectors>,
      micro_kernel<7, kVectors>, micro_kernel<8, kVectors>,  micro_kernel<9, kVectors>,
      micro_kernel<10, kVectors>, micro_kernel<11, kVectors>, micro_kernel<12, kVectors>};
  return kernels[rows - 1];
}

// The micro-kernel for a tile of rows in 1..kPanelRows and columns in 1..kPanelColumns.
inline MicroKernel micro_kernel_for(int64_t rows, int64_t columns) {
  return columns <= 16 ? micro_kernel_with<1>(rows) : micro_kernel_with<2>(rows);
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// This thread's packing buffers, allocated once (64-byte aligned for the panel loads).
inline float* thread_buffer(int which, int64_t floats) {
  thread_local std::unique_ptr<float, AlignedFree> buffers[2];
  if (!buffers[which]) {
    void* p = std::aligned_alloc(64, static_cast<size_t>(floats) * sizeof(float));
    if (p == nullptr) throw std::bad_alloc();
    buffers[which].reset(static_cast<float*>(p));
  }
  return buffers[which].get();
}

// One depth block of packed panels into C: rows [0, rows) x columns [0, cols) of C, B's column
// panel col / kPanelColumns at b_packed + (col / kPanelColumns) * b_panel_stride ([depth]
// [kPanelColumns]), A's row panel r / kPanelRows at a_panels + (r / kPanelRows) *
// a_panel_stride ([depth][kPanelRows], depth contiguous).
inline void multiply_packed_block(int64_t rows, int64_t cols, int64_t depth, const float* a_panels,
                                  int64_t a_panel_stride, const float* b_packed,
                                  int64_t b_panel_stride, float* c, int64_t ldc, float alpha,
                                  float beta, bool first) {
  for (int64_t col = 0; col < cols; col += kPanelColumns) {
    const float* b_panel = b_packed + (col / kPanelColumns) * b_panel_stride;
    const int64_t tile_columns = std::min<int64_t>(kPanelColumns, cols - col);
    for (int64_t r = 0; r < rows; r += kPanelRows) {
      const float* a_panel = a_panels + (r / kPanelRows) * a_panel_stride;
      micro_kernel_for(std::min<int64_t>(kPanelRows, rows - r), tile_columns)(
          depth, a_panel, b_panel, c + r * ldc + col, ldc, tile_columns, alpha, beta, first);
    }
  }
}

// C[:, col_begin : col_end] on the calling thread. C[m, n] = alpha op(A)[m, k] op(B)[k, n]
// + beta C; k > 0.
inline void multiply_columns(int64_t m, int64_t col_begin, int64_t col_end, int64_t k,
                             float alpha, const Operand& a, const Operand& b, float beta,
                             float* c, int64_t ldc) {
  float* a_packed = thread_buffer(0, kRowBlock * kDepthBlock);
  float* b_packed = thread_buffer(1, kDepthBlock * kColumnBlock);
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kColumnBlock) {
    const int64_t cols = std::min<int64_t>(kColumnBlock, col_end - col0);
    for (int64_t depth0 = 0; depth0 < k; depth0 += kDepthBlock) {
      const int64_t depth = std::min<int64_t>(kDepthBlock, k - depth0);
      const bool first = depth0 == 0;
      pack_b(b, depth0, depth, col0, cols, b_packed);
      for (int64_t row0 = 0; row0 < m; row0 += kRowBlock) {
        const int64_t rows = std::min<int64_t>(kRowBlock, m - row0);
        pack_a(a, row0, rows, depth0, depth, a_packed);
        multiply_packed_block(rows, cols, depth, a_packed, depth * kPanelRows, b_packed,
                              depth * kPanelColumns, c + row0 * ldc + col0, ldc, alpha, beta,
                              first);
      }
    }
  }
}

// A packed once for many products (pack_a(a, 0, m, 0, k, dst)): panel p of kPanelRows rows at
// dst + p * k * kPanelRows, [k][kPanelRows], so any depth range of a panel is contiguous.
inline int64_t packed_a_floats(int64_t m, int64_t k) {
  return (m + kPanelRows - 1) / kPanelRows * kPanelRows * k;
}

// A range [begin, begin + length) of the pre-packed A's depth.
struct DepthSegment {
  int64_t begin, length;
};

// C[m, cols] = A[:, segments] @ op(B) (C is written, not read) on the calling thread, A
// pre-packed over depth k (above): the product's depth is the segments one after another,
// and op(B)'s row j is depth j of that sequence. For products that use some of the same
// weight's columns each (the tap classes of a conv: tap_classes.cpp), so that the weight is
// packed once per call rather than once per product.
inline void multiply_prepacked(int64_t m, int64_t cols, const float* a_packed, int64_t k,
                               const DepthSegment* segments, int64_t segment_count,
                               const Operand& b, float* c, int64_t ldc) {
  float* b_packed = thread_buffer(1, kDepthBlock * kColumnBlock);
  for (int64_t col0 = 0; col0 < cols; col0 += kColumnBlock) {
    const int64_t block_cols = std::min<int64_t>(kColumnBlock, cols - col0);
    int64_t b_row = 0;
    bool first = true;
    for (int64_t s = 0; s < segment_count; ++s) {
      const DepthSegment& segment = segments[s];
      for (int64_t d0 = 0; d0 < segment.length; d0 += kDepthBlock) {
        const int64_t depth = std::min<int64_t>(kDepthBlock, segment.length - d0);
        pack_b(b, b_row + d0, depth, col0, block_cols, b_packed);
        for (int64_t row0 = 0; row0 < m; row0 += kRowBlock) {
          const float* a_panels =
              a_packed + row0 / kPanelRows * k * kPanelRows + (segment.begin + d0) * kPanelRows;
          multiply_packed_block(std::min<int64_t>(kRowBlock, m - row0), block_cols, depth,
                                a_panels, k * kPanelRows, b_packed, depth * kPanelColumns,
                                c + row0 * ldc + col0, ldc, 1.0f, 0.0f, first);
        }
        first = false;
      }
      b_row += segment.length;
    }
  }
}

// C[m, cols] = A @ B over one range of the depth (C written when `first`, else added to), on
// the calling thread, both operands packed: A's row panel p at a_panels + p * a_panel_stride
// ([depth][kPanelRows], e.g. a depth range of a pre-packed A), B's column panel q at b_panels
// + q * b_panel_stride ([depth][kPanelColumns], 64-byte aligned, its columns past `cols`
// zero: a conv's column matrix as its im2col writes it, conv2d/band_columns.h), so B is not
// copied again. Depth blocks of kDepthBlock as in multiply_columns: one block of a B panel
// (32 KiB) stays in L1 while A's row panels stream past it.
inline void multiply_packed_operands(int64_t m, int64_t cols, int64_t depth,
                                     const float* a_panels, int64_t a_panel_stride,
                                     const float* b_panels, int64_t b_panel_stride, float* c,
                                     int64_t ldc, bool first) {
  for (int64_t depth0 = 0; depth0 < depth; depth0 += kDepthBlock) {
    const int64_t block_depth = std::min<int64_t>(kDepthBlock, depth - depth0);
    for (int64_t row0 = 0; row0 < m; row0 += kRowBlock) {
      multiply_packed_block(std::min<int64_t>(kRowBlock, m - row0), cols, block_depth,
                            a_panels + row0 / kPanelRows * a_panel_stride + depth0 * kPanelRows,
                            a_panel_stride, b_panels + depth0 * kPanelColumns, b_panel_stride,
                            c + row0 * ldc, ldc, 1.0f, 0.0f, first && depth0 == 0);
    }
  }
}

}  // namespace packed_gemm
}  // namespace cpu
}  // namespace convkit

#endif  // __AVX512F__
