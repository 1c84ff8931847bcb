// Row-major GEMM on raw pointers for the CPU conv kernels: C = alpha * op(A) @ op(B) + beta * C.
//
// The conv tiles are small matrices inside larger buffers (a tile of an image's output rows,
// one group's rows of the column matrix), so the call takes leading dimensions and no
// tensors: no allocation, no dispatcher, no autograd bookkeeping inside the hot loop.
// float and double go to the BLAS that PyTorch's CPU library exports (MKL's sgemm_/dgemm_
// on x86 wheels, the Fortran interface, LP64). Called inside at::parallel_for the BLAS runs
// on the calling thread (OpenMP does not nest by default), which is what the tiling wants:
// one thread per tile. The symbols are weak: a torch built without a Fortran BLAS gets the
// same product through at::mm on views of the same memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
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

// A row-major [rows, cols] matrix with leading dimension ld, viewed as a tensor (no copy).
template <typename T>
at::Tensor matrix_tensor(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  at::Tensor m = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                               at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return transpose ? m.t() : m;
}

// C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C[m, n], every matrix row-major.
// op(A) = A ([m, k], lda) or A^T (A stored [k, m], lda); likewise B. T is float or double.
template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const bool fits_int = m <= int_max && n <= int_max && k <= int_max && lda <= int_max &&
                        ldb <= int_max && ldc <= int_max;
  if (BlasGemm<T>::available() && fits_int && k > 0) {
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands, keep the flags.
    const char ta = transpose_a ? 'T' : 'N';
    const char tb = transpose_b ? 'T' : 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int lda_i = static_cast<int>(lda), ldb_i = static_cast<int>(ldb);
    const int ldc_i = static_cast<int>(ldc);
    BlasGemm<T>::call(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
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
