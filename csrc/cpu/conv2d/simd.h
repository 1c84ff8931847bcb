// Small compile-time helpers of the CPU conv kernels: register pinning for AVX-512 operands
// and the switches that turn a run-time block or step size into a template argument (the
// kernels keep their sums in registers only when those sizes are constants).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace convkit::cpu_conv2d {

// dst[j] = src[j * Stride] for j < count. With Stride a constant (1 and 2: the strides
// copy_with_stride picks) the compiler vectorises the de-interleave; Stride 0 reads `stride`.
template <int64_t Stride, typename src_t, typename dst_t>
inline void copy_strided(const src_t* __restrict src, int64_t stride, int64_t count,
                         dst_t* __restrict dst) {
  const int64_t step = Stride > 0 ? Stride : stride;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<dst_t>(src[j * step]);
}

// copy_strided for a run-time stride, through the constant forms for 1 and 2.
template <typename src_t, typename dst_t>
inline void copy_with_stride(const src_t* src, int64_t stride, int64_t count, dst_t* dst) {
  switch (stride) {
    case 1: copy_strided<1>(src, 1, count, dst); break;
    case 2: copy_strided<2>(src, 2, count, dst); break;
    default: copy_strided<0>(src, stride, count, dst); break;
  }
}

#if defined(__AVX512F__)
// An empty asm that "changes" the value: GCC then cannot fold its load into each FMA that
// uses it (it does with plain intrinsics, one zmm load per FMA where a core loads one or two
// a cycle), so the value is loaded once and stays in a register.
inline void keep_in_register(__m512& value) { asm("" : "+v"(value)); }
#endif

// fn(std::integral_constant<int, P>{}) for 1 <= P <= 7: a last partial step of P positions.
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

// fn(std::integral_constant<int, B>{}) for a vector block of B = 8, 16 or 32 channels.
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
void with_implicit_block(int64_t block, Fn&& fn) {
  if (block == 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    with_block(block, fn);
  }
}

}  // namespace convkit::cpu_conv2d
