// convkit::cpu_gemm: the CPU conv kernels' GEMM (gemm.h: our packed GEMM in the avx512 kernels
// unless CONVKIT_CPU_GEMM=blas, the BLAS otherwise) as an op of its own, so that tests can
// hold it against torch.mm on the shapes that stress it (partial 12 x 32 tiles, K = 1, depths
// beyond a block, leading dimensions wider than the matrix) without going through a conv.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "../cpu_kernel_table.h"
#include "gemm.h"

namespace convkit {
namespace {

// A row-major matrix with unit column stride and a leading dimension >= its width, as the
// GEMM takes it (a narrowed view of a wider matrix is one).
void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "convkit::cpu_gemm: expected ", name, " to be 2-D, but got ",
              t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "convkit::cpu_gemm: expected ", name,
              " to be row-major (column stride 1), but got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "convkit::cpu_gemm: expected ", name,
              "'s row stride >= its width ", t.size(1), ", but got strides ", t.strides());
}

int64_t leading_dimension(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);
}

// alpha * op(a) @ op(b) + beta * c as a new [m, n] tensor; op(x) = x, or x^T when transposed.
at::Tensor cpu_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                    bool transpose_a, bool transpose_b, double alpha, double beta) {
  check_matrix(a, "a");
  check_matrix(b, "b");
  TORCH_CHECK(c.dim() == 2, "convkit::cpu_gemm: expected c to be 2-D, but got ", c.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == c.scalar_type(),
              "convkit::cpu_gemm: expected a, b and c of one dtype, but got ", a.scalar_type(),
              ", ", b.scalar_type(), " and ", c.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "convkit::cpu_gemm: expected float32 or float64, but got ", a.scalar_type());
  const int64_t m = transpose_a ? a.size(1) : a.size(0);
  const int64_t k = transpose_a ? a.size(0) : a.size(1);
  const int64_t k_b = transpose_b ? b.size(1) : b.size(0);
  const int64_t n = transpose_b ? b.size(0) : b.size(1);
  TORCH_CHECK(k == k_b, "convkit::cpu_gemm: op(a) is [", m, ", ", k, "] but op(b) is [", k_b,
              ", ", n, "]: their inner sizes differ");
  TORCH_CHECK(c.size(0) == m && c.size(1) == n, "convkit::cpu_gemm: expected c of shape [", m,
              ", ", n, "], but got ", c.sizes());
  at::Tensor out = c.contiguous().clone();
  if (a.scalar_type() == at::kFloat) {
    cpu::gemm<float>(transpose_a, transpose_b, m, n, k, static_cast<float>(alpha),
                     a.const_data_ptr<float>(), leading_dimension(a), b.const_data_ptr<float>(),
                     leading_dimension(b), static_cast<float>(beta), out.mutable_data_ptr<float>(),
                     std::max<int64_t>(n, 1));
  } else {
    cpu::gemm<double>(transpose_a, transpose_b, m, n, k, alpha, a.const_data_ptr<double>(),
                      leading_dimension(a), b.const_data_ptr<double>(), leading_dimension(b),
                      beta, out.mutable_data_ptr<double>(), std::max<int64_t>(n, 1));
  }
  return out;
}

}  // namespace

// convkit._C registers it for the CPU dispatch key (cpu_kernels.cpp).
void add_gemm_kernels(CpuKernelTable& table) { table.cpu_gemm = &cpu_gemm; }

}  // namespace convkit
