// Row-major GEMM on raw pointers for the CPU conv kernels: C = alpha * op(A) @ op(B) + beta * C.
//
// The conv tiles are small matrices inside larger buffers (a tile of an image's output rows,
// one group's rows of the column matrix), so the call takes leading dimensions and no
// tensors: no allocation, no dispatcher, no autograd bookkeeping inside the hot loop.
// float and double go to the BLAS that PyTorch's CPU library exports (MKL's sgemm_/dgemm_
// on x86 wheels, the Fortran interface, LP64), always on one thread per call: called inside a
// parallel region (a conv tile) on the calling thread, outside one over a fixed grid of C
// blocks (blas_gemm_on_grid), so that its results do not depend on the thread count. The
// symbols are weak: a torch built without a Fortran BLAS gets the product through at::mm on
// views of the same memory (whose bits may then depend on the thread count).
//
// float on AVX-512 hosts goes to our own packed GEMM instead (csrc/cpu/packed_gemm.h: MKL's
// sgemm reached ~80% of the FMA rate on this project's Zen 4); CONVKIT_CPU_GEMM=blas sends it
// to the BLAS as well (for comparisons).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../config.h"
#include "packed_gemm.h"
#include "parallel.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (C interface; 0 restores the global one); absent from other
// BLAS builds.
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace convkit {
namespace cpu {

template <typename T>
struct BlasGemm;

template <>
struct BlasGemm<float> {
  static bool available() { return sgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                   const float* alpha, const float* a, const int* lda, const float* b,
                   const int* ldb, const float* beta, float* c, const int* ldc) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};

template <>
struct BlasGemm<double> {
  static bool available() { return dgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                   const double* alpha, const double* a, const int* lda, const double* b,
                   const int* ldb, const double* beta, double* c, const int* ldc) {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};

// Our packed GEMM where the build has it (AVX-512) and CONVKIT_CPU_GEMM does not ask for the
// BLAS (csrc/config.h).
inline bool use_packed_gemm() {
  const bool own = cpu_gemm_is_own();
#if defined(__AVX512F__)
  return own;
#else
  (void)own;
  return false;
#endif
}

#if defined(__AVX512F__)
// Products below this many FLOPs stay on one thread: a fork/join costs ~10 us.
constexpr int64_t kPackedGemmParallelFlops = int64_t(1) << 24;

// Calls columns(col_begin, col_end) over C's n columns: once with [0, n) on the calling
// thread inside a parallel region, for one panel, or below kPackedGemmParallelFlops; else over
// the team, each thread one contiguous range of whole 32-column panels. Each column's result
// depends only on its own panel, so the bits do not depend on the thread count.
template <typename Columns>
void for_column_panel_ranges(int64_t m, int64_t n, int64_t k, const Columns& columns) {
  const int64_t panels = (n + packed_gemm::kPanelColumns - 1) / packed_gemm::kPanelColumns;
  const int64_t threads = team_size();
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  if (threads <= 1 || panels < 2 || flops < static_cast<double>(kPackedGemmParallelFlops)) {
    columns(int64_t(0), n);
    return;
  }
  const int64_t panels_per_thread = (panels + threads - 1) / threads;
  parallel_for(0, panels, panels_per_thread, [&](int64_t begin, int64_t end) {
    columns(begin * packed_gemm::kPanelColumns, std::min(n, end * packed_gemm::kPanelColumns));
  });
}

// The packed GEMM on the calling thread inside a parallel region (the conv tiles), over all
// threads outside one, each taking a contiguous range of C's column panels.
inline void packed_sgemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         float beta, float* c, int64_t ldc) {
  if (k == 0) {
    // BLAS semantics: C = beta * C, and beta == 0 writes zeros without reading C.
    for (int64_t i = 0; i < m; ++i) {
      float* row = c + i * ldc;
      for (int64_t j = 0; j < n; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  const packed_gemm::Operand a_operand{a, lda, transpose_a};
  const packed_gemm::Operand b_operand{b, ldb, transpose_b};
  for_column_panel_ranges(m, n, k, [&](int64_t col_begin, int64_t col_end) {
    packed_gemm::multiply_columns(m, col_begin, col_end, k, alpha, a_operand, b_operand, beta,
                                  c, ldc);
  });
}
#endif

// A row-major [rows, cols] matrix with leading dimension ld, viewed as a tensor (no copy).
template <typename T>
at::Tensor matrix_tensor(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  at::Tensor m = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                               at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return transpose ? m.t() : m;
}

// The BLAS's product, the same bits on any thread count. A threaded MKL call splits C over
// its threads by their number, and MKL picks its kernels by the shape it is given, so one
// product on 1 and on 2 threads differed in the last bits (channels-last shared tiles, on an
// Intel Xeon). Here C is cut into a grid of kBlasBlockRows x kBlasBlockColumns blocks that
// depends only on C's shape; each block is one BLAS call on one thread (MKL told so where it
// is MKL), and the blocks spread over the caller's team. Inside a parallel region (a conv
// tile) the team is the calling thread. Floor: the BLAS's single-thread rate on a block.
constexpr int64_t kBlasBlockRows = 256;
constexpr int64_t kBlasBlockColumns = 128;

class BlasOnOneThread {
 public:
  BlasOnOneThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~BlasOnOneThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  BlasOnOneThread(const BlasOnOneThread&) = delete;
  BlasOnOneThread& operator=(const BlasOnOneThread&) = delete;

 private:
  int previous_;
};

// Precondition: every size and leading dimension fits an int, k > 0, the BLAS is present.
template <typename T>
void blas_gemm_on_grid(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                       T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                       int64_t ldc) {
  const int64_t block_rows = (m + kBlasBlockRows - 1) / kBlasBlockRows;
  const int64_t block_columns = (n + kBlasBlockColumns - 1) / kBlasBlockColumns;
  auto blocks = [&](int64_t begin, int64_t end) {
    const BlasOnOneThread one_thread;
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands, keep the flags.
    const char ta = transpose_a ? 'T' : 'N';
    const char tb = transpose_b ? 'T' : 'N';
    const int ki = static_cast<int>(k);
    const int lda_i = static_cast<int>(lda), ldb_i = static_cast<int>(ldb);
    const int ldc_i = static_cast<int>(ldc);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = (block / block_columns) * kBlasBlockRows;
      const int64_t col0 = (block % block_columns) * kBlasBlockColumns;
      const int mi = static_cast<int>(std::min(kBlasBlockRows, m - row0));
      const int ni = static_cast<int>(std::min(kBlasBlockColumns, n - col0));
      // op(A)'s rows row0.. and op(B)'s columns col0..
      const T* a_block = transpose_a ? a + row0 : a + row0 * lda;
      const T* b_block = transpose_b ? b + col0 * ldb : b + col0;
      BlasGemm<T>::call(&tb, &ta, &ni, &mi, &ki, &alpha, b_block, &ldb_i, a_block, &lda_i, &beta,
                        c + row0 * ldc + col0, &ldc_i);
    }
  };
  const int64_t count = block_rows * block_columns;
  if (team_size() <= 1 || count < 2) {
    blocks(0, count);
    return;
  }
  parallel_for(0, count, 1, blocks);
}

// C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C[m, n], every matrix row-major.
// op(A) = A ([m, k], lda) or A^T (A stored [k, m], lda); likewise B. T is float or double.
template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    // Read on every host, so that a wrong CONVKIT_CPU_GEMM is an error everywhere.
    if (use_packed_gemm()) {
#if defined(__AVX512F__)
      packed_sgemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
#endif
    }
  }
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const bool fits_int = m <= int_max && n <= int_max && k <= int_max && lda <= int_max &&
                        ldb <= int_max && ldc <= int_max;
  if (BlasGemm<T>::available() && fits_int && k > 0) {
    blas_gemm_on_grid(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const at::Tensor a_t = transpose_a ? matrix_tensor(a, k, m, lda, true)
                                     : matrix_tensor(a, m, k, lda, false);
  const at::Tensor b_t = transpose_b ? matrix_tensor(b, n, k, ldb, true)
                                     : matrix_tensor(b, k, n, ldb, false);
  at::Tensor c_t = matrix_tensor(c, m, n, ldc, false);
  if (beta == T(0)) {
    c_t.copy_(at::mm(a_t, b_t).mul_(alpha));
  } else {
    c_t.mul_(beta).add_(at::mm(a_t, b_t), alpha);
  }
}

}  // namespace cpu
}  // namespace convkit
