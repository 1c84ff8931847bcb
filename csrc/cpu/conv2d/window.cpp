// The window path: one output position per image, from an image no larger than the kernel
// (a last layer: the chapter's 64->10, 2x2 -> 1x1).
//
// With a single window, an image's column holds the image's own values (and the padding's
// zeros): every input element is read by at most one tap (conv_window_offset). So the weight
// is laid out once per call as the "window weight" Ww [O, C/groups * H * W], whose entry
// (o, c, ih, iw) is the weight of the tap that reads (ih, iw) (0 when none does), and per group
//   forward        Y[N, O]     = X[N, C*H*W] @ Ww^T   (computed as Y^T = Ww @ X^T)
//   input grad     dX[N, C*H*W] = dY[N, O] @ Ww
//   weight grad    dWw[O, C*H*W] = dY^T @ X, each entry then put back at its tap
// with the images' rows read in place: no column matrix, no gather, no col2im, and the taps
// that read padding (5 of 9 in the chapter's layer) cost nothing. Only for the compute types
// (float, double): half and bfloat16 keep the image path, which widens them as it gathers.
// Floor: one GEMM of N x O x C*H*W (the chapter's layer: 3 MFLOP at N=512), memory-bound on
// reading X once.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../gemm.h"
#include "../packed_gemm.h"
#include "../parallel.h"
#include "kernels.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {
namespace {

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

}  // namespace

template <typename acc_t>
void window_forward(const at::Tensor& x, const at::Tensor& weight_acc,
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
void window_backward(const at::Tensor& dy, const at::Tensor& x,
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

template void window_forward<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const Conv2dGeometry&, at::Tensor&);
template void window_forward<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const Conv2dGeometry&, at::Tensor&);
template void window_backward<float>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const Conv2dGeometry&, bool, bool, at::Tensor&, at::Tensor&);
template void window_backward<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const Conv2dGeometry&, bool, bool, at::Tensor&,
                                      at::Tensor&);

}  // namespace convkit::cpu_conv2d
