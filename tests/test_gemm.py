"""The CPU conv kernels' GEMM (csrc/cpu/gemm.h) held directly against torch.mm.

Our packed GEMM (csrc/cpu/packed_gemm.h, in the avx512 kernels) multiplies 12-row panels of op(A)
by 32-column panels of op(B) in depth blocks of 256, with a one-vector kernel for a last
panel of <= 16 columns; the shapes below sit on and around each of those edges, with K = 0
and 1, depths over several blocks, every transpose, leading dimensions wider than the
matrix, alpha/beta, one thread and several (it splits C's columns over threads when called
outside a parallel region). CONVKIT_CPU_GEMM=blas runs the same cases through the BLAS.
"""
from __future__ import annotations

import pytest
import torch

import convkit  # noqa: F401  (loads the ops)

# (m, n, k): 1x1; rows around the 12-row panel; columns around the 32-column panel and the
# 16-column one-vector panel; K = 1; depths around one and several 256-deep blocks.
SHAPES = [
    (1, 1, 1), (1, 1, 7), (12, 32, 5), (11, 31, 9), (13, 33, 9), (12, 16, 3), (12, 17, 3),
    (24, 64, 1), (25, 65, 1), (7, 48, 255), (7, 48, 256), (7, 48, 257), (30, 70, 600),
    (3, 200, 1100),
]


def _gemm(a, b, c, transpose_a, transpose_b, alpha, beta):
    return torch.ops.convkit.cpu_gemm(a, b, c, transpose_a, transpose_b, alpha, beta)


def _operand(rows, cols, transpose, dtype, padded):
    """A [rows, cols] operand (stored [cols, rows] when transposed), optionally a narrowed view
    of a wider matrix, so that its leading dimension exceeds its width."""
    stored = (cols, rows) if transpose else (rows, cols)
    if not padded:
        return torch.randn(*stored, dtype=dtype)
    wide = torch.randn(stored[0], stored[1] + 5, dtype=dtype)
    return wide[:, 2:2 + stored[1]]


def _reference(a, b, c, transpose_a, transpose_b, alpha, beta):
    a64 = a.double().t() if transpose_a else a.double()
    b64 = b.double().t() if transpose_b else b.double()
    return alpha * (a64 @ b64) + beta * c.double()


@pytest.mark.parametrize("gemm", ["own", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False),
                                                      (False, True), (True, True)])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_matches_torch_mm(m, n, k, transpose_a, transpose_b, dtype, gemm, monkeypatch):
    monkeypatch.setenv("CONVKIT_CPU_GEMM", gemm)
    padded = (m + n + k) % 2 == 0
    a = _operand(m, k, transpose_a, dtype, padded)
    b = _operand(k, n, transpose_b, dtype, not padded)
    c = torch.randn(m, n, dtype=dtype)
    for alpha, beta in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)]:
        out = _gemm(a, b, c, transpose_a, transpose_b, alpha, beta)
        expected = _reference(a, b, c, transpose_a, transpose_b, alpha, beta)
        # float32: each output a sum of k products; torch.mm's own error is of this order.
        tolerance = 1e-12 if dtype == torch.float64 else 2e-6 * (k + 1) ** 0.5
        scale = 1.0 + expected.abs().max().item()
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance * scale * 4)
        theirs = alpha * ((a.t() if transpose_a else a) @ (b.t() if transpose_b else b)) + beta * c
        ours_error = (out.double() - expected).abs().max().item()
        torch_error = (theirs.double() - expected).abs().max().item()
        assert ours_error <= 4 * torch_error + tolerance * scale, (ours_error, torch_error)


def test_gemm_beta_zero_ignores_nan_in_c():
    """beta == 0 writes C without reading it (BLAS semantics): NaN in c does not leak."""
    a = torch.randn(13, 9)
    b = torch.randn(9, 33)
    c = torch.full((13, 33), float("nan"))
    out = _gemm(a, b, c, False, False, 1.0, 0.0)
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    empty_depth = _gemm(torch.empty(13, 0), torch.empty(0, 33), c, False, False, 1.0, 0.0)
    assert torch.equal(empty_depth, torch.zeros(13, 33))


def test_gemm_propagates_nan_and_inf():
    a = torch.randn(12, 40)
    b = torch.randn(40, 32)
    a[3, 7] = float("nan")
    b[5, 30] = float("inf")
    out = _gemm(a, b, torch.zeros(12, 32), False, False, 1.0, 0.0)
    expected = a @ b
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())


@pytest.mark.parametrize("backend", ["own", "blas"])
@pytest.mark.parametrize("m,n,k,transpose_b", [(64, 256, 1152, True), (16, 512, 2304, True),
                                               (300, 300, 64, False), (200, 600, 300, False)])
def test_gemm_backends_are_deterministic_over_threads(m, n, k, transpose_b, backend, monkeypatch):
    """Each C element is a fixed-order sum: the same bits on any thread count.

    Regression: a threaded MKL call splits C by its thread count, so the BLAS path gave other
    bits on 2 threads than on 1 (a 64 x 256 x 1152 product, the channels-last input gradient's
    shape, on an Intel Xeon). The BLAS now runs one thread per block of a fixed C grid."""
    monkeypatch.setenv("CONVKIT_CPU_GEMM", backend)
    a = torch.randn(m, k)
    b = torch.randn(n, k) if transpose_b else torch.randn(k, n)
    c = torch.zeros(m, n)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_gemm(a, b, c, False, transpose_b, 1.0, 0.0))
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    expected = a.double() @ (b.double().t() if transpose_b else b.double())
    torch.testing.assert_close(results[0].double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(3, 4), torch.randn(5, 6), torch.randn(3, 6)), "inner sizes differ"),
    ((torch.randn(3, 4), torch.randn(4, 6), torch.randn(3, 5)), "expected c of shape"),
    ((torch.randn(3, 4).t(), torch.randn(3, 6), torch.randn(4, 6)), "row-major"),
    ((torch.randn(3, 4), torch.randn(4, 6).double(), torch.randn(3, 6)), "one dtype"),
    ((torch.randn(3, 4).half(), torch.randn(4, 6).half(), torch.randn(3, 6).half()),
     "float32 or float64"),
    ((torch.randn(3), torch.randn(3, 6), torch.randn(1, 6)), "2-D"),
])
def test_gemm_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        _gemm(*args, False, False, 1.0, 0.0)
