// The CPU conv2d ops: conv2d_forward and conv2d_backward (argument checks, the weights in
// the compute type, the path of path.h and its kernel), the bias gradient, and im2col/col2im
// with F.unfold/F.fold's semantics. convkit._C registers them for the CPU dispatch key through
// the kernel table (csrc/cpu_kernels.cpp), each routed to its CUDA code under the emulator
// while CUDA emulation is on in the calling thread.
// Floors, the chapter CNN at N=512, fp32 (FLOPs of the forward; the weight and input gradients
// cost as much each; "MB" = input + output read/written once):
//   layer           GFLOP fwd   MB fwd   columns (im2col)   path
//   1->8, 5x5 s2      0.040       4.8       10.0 MB          rows
//   8->16, 3x3 s2     0.058       4.8        7.2 MB          implicit_gemm
//   16->32, 3x3 s2    0.075       2.6        4.7 MB          implicit_gemm
//   32->64, 3x3 s2    0.075       1.3        2.4 MB          implicit_gemm (blocks of 64)
//   64->10, 3x3 s2    0.006       0.6        1.2 MB          window (0.003 GFLOP, no columns)
// Two cores at ~2.6 GHz doing one 16-lane fp32 FMA per cycle each give 166 GFLOP/s: forward
// floors of 0.24-0.45 ms per layer (0.04 ms for the last), memory ~0.1 ms at 40 GB/s.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "../../checks.h"
#include "../../conv2d_op_frame.h"
#include "../../conv2d.h"
#include "../../cpu_kernel_table.h"
#include "../../memory_format.h"
#include "../block_cache.h"
#include "../parallel.h"
#include "kernels.h"
#include "path.h"
#include "tiles.h"

namespace convkit::cpu_conv2d {
namespace {

// The weights in the compute type as the kernels read them: [O, C/groups, kH, kW] row-major,
// or [O, kH, kW, C/groups] for the channels-last paths.
at::Tensor compute_weights(const at::Tensor& weight, at::ScalarType acc_type, bool channels_last) {
  if (channels_last) return weight.to(acc_type).permute({0, 2, 3, 1}).contiguous();
  return weight.to(acc_type).contiguous();
}

template <typename scalar_t>
void conv2d_forward_kernel(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           bool channels_last, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const ConvPlan plan = choose_forward(g, sizeof(acc_t), same_type, channels_last);
  const TilePlan& p = plan.tiles;
  switch (plan.forward) {
    case ConvPath::kChannelsLast:
      channels_last_forward<scalar_t>(x, weight_acc, bias_acc, g, output);
      return;
    case ConvPath::kChannelsLastDepthwise:
      channels_last_depthwise_forward<scalar_t>(x, weight_acc, bias_acc, g, output);
      return;
    case ConvPath::kDepthwise:
      if (depthwise_blocks_fit(g, true)) {
        depthwise_blocks_forward<scalar_t>(x, weight_acc, bias_acc, g, output);
      } else {
        depthwise_forward<scalar_t>(x, weight_acc, bias_acc, g, output);
      }
      return;
    case ConvPath::kWindow:
      if constexpr (same_type) window_forward<acc_t>(x, weight_acc, bias_acc, g, output);
      return;
    case ConvPath::kRows:
      rows_forward<scalar_t>(x, weight_acc, bias_acc, g, p.threads, output);
      return;
    case ConvPath::kImplicitGemm:
      implicit_gemm_forward<scalar_t>(x, weight_acc, bias_acc, g, p, output);
      return;
    case ConvPath::kSharedTiles:
      shared_tiles_forward<scalar_t>(x, weight_acc, bias_acc, g, p, output);
      return;
    case ConvPath::kTapClasses:
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        tap_classes_forward(x, weight_acc, bias_acc, g, p, output);
        return;
      }
#endif
      break;
    case ConvPath::kImages:
      images_forward<scalar_t>(x, weight_acc, bias_acc, g, p, output);
      return;
    case ConvPath::kBands:
      bands_forward<scalar_t>(x, weight_acc, bias_acc, g, p, output);
      return;
    case ConvPath::kNone:
    case ConvPath::kTransposedImplicitGemm:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "convkit::conv2d_forward: no forward kernel for path ",
                        path_name(plan.forward));
}

// Returns whether it also computed grad_bias (given when wanted): the rows path and the
// implicit GEMM's weight gradient sum dY on the way.
template <typename scalar_t>
bool conv2d_backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                            const Conv2dGeometry& g, bool channels_last, bool need_input_grad,
                            bool need_weight_grad, at::Tensor& grad_input,
                            at::Tensor& grad_weight_acc, at::Tensor* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const ConvPlan plan = choose_backward(g, sizeof(acc_t), same_type, channels_last,
                                        need_input_grad, need_weight_grad);
  const TilePlan& p = plan.tiles;
  scalar_t* grad_bias_ptr =
      grad_bias != nullptr ? grad_bias->mutable_data_ptr<scalar_t>() : nullptr;
  if (plan.input_grad == ConvPath::kTapClasses) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      tap_classes_input_grad(dy, weight_acc, g, grad_input);
      if (!need_weight_grad) return false;
      return conv2d_backward_kernel<scalar_t>(dy, x, weight_acc, g, channels_last, false, true,
                                              grad_input, grad_weight_acc, grad_bias);
    }
#endif
    TORCH_INTERNAL_ASSERT(false, "convkit::conv2d_backward: the tap classes' input gradient is "
                          "float on AVX-512 builds only");
  }
  // The paths come in these combinations only (choose_backward).
  const ConvPath path = plan.weight_grad != ConvPath::kNone ? plan.weight_grad : plan.input_grad;
  switch (path) {
    case ConvPath::kChannelsLast:
      channels_last_backward<scalar_t>(dy, x, weight_acc, g, need_input_grad, need_weight_grad,
                                       grad_input, grad_weight_acc);
      return false;
    case ConvPath::kChannelsLastDepthwise:
      channels_last_depthwise_backward<scalar_t>(dy, x, weight_acc, g, need_input_grad,
                                                 need_weight_grad, grad_input, grad_weight_acc);
      return false;
    case ConvPath::kDepthwise:
      if (depthwise_blocks_fit(g, false)) {
        depthwise_blocks_backward<scalar_t>(dy, x, weight_acc, g, need_input_grad,
                                            need_weight_grad, grad_input, grad_weight_acc);
      } else {
        depthwise_backward<scalar_t>(dy, x, weight_acc, g, need_input_grad, need_weight_grad,
                                     grad_input, grad_weight_acc);
      }
      return false;
    case ConvPath::kWindow:
      if constexpr (same_type) {
        window_backward<acc_t>(dy, x, weight_acc, g, need_input_grad, need_weight_grad,
                               grad_input, grad_weight_acc);
      }
      return false;
    case ConvPath::kRows:
      // A first layer in training: only the weight gradient, along output rows.
      rows_weight_grad<scalar_t>(dy, x, g, p.threads, grad_weight_acc, grad_bias_ptr);
      return grad_bias != nullptr;
    case ConvPath::kSharedTiles:
      shared_tiles_backward<scalar_t>(dy, x, weight_acc, g, p, need_input_grad, need_weight_grad,
                                      grad_input, grad_weight_acc);
      return false;
    case ConvPath::kBands:
      bands_backward<scalar_t>(dy, x, weight_acc, g, p, need_input_grad, need_weight_grad,
                               grad_input, grad_weight_acc);
      return false;
    case ConvPath::kImages:
    case ConvPath::kImplicitGemm:
    case ConvPath::kTransposedImplicitGemm:
      return image_family_backward<scalar_t>(dy, x, weight_acc, g, plan, grad_input,
                                             grad_weight_acc, grad_bias_ptr);
    case ConvPath::kTapClasses:  // an input gradient only, run above
    case ConvPath::kNone:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "convkit::conv2d_backward: no backward kernel for path ",
                        path_name(path));
  return false;
}

at::Tensor conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cached_empty(sizes, options);
  };
  auto forward = [&](const at::Tensor& x, const at::Tensor& bias_or_undefined,
                     const Conv2dGeometry& g, at::Tensor& output, bool channels_last) {
    const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
    // Weights and bias in the compute type, converted once per call (compute_weights).
    const at::Tensor weight_acc = compute_weights(weight, acc_type, channels_last);
    const at::Tensor bias_acc = bias_or_undefined.defined()
                                    ? bias_or_undefined.to(acc_type).contiguous()
                                    : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_forward",
                                    [&] {
      conv2d_forward_kernel<scalar_t>(x, weight_acc, bias_acc, g, channels_last, output);
    });
  };
  return run_conv2d_forward(input, weight, bias, stride, padding, dilation, groups,
                            /*native_channels_last=*/true, empty, forward);
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
  auto empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return cached_empty(sizes, options);
  };
  auto columns_pass = [&](const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                          Conv2dGradients& grads) {
    const at::Tensor weight_acc =
        compute_weights(weight, at::toOpMathType(x.scalar_type()), grads.channels_last);
    bool bias_done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv2d_backward",
                                    [&] {
      bias_done = conv2d_backward_kernel<scalar_t>(dy, x, weight_acc, g, grads.channels_last,
                                                   grads.want_input, grads.want_weight,
                                                   grads.input,
                                                   grads.weight_acc,
                                                   grads.want_bias ? &grads.bias : nullptr);
    });
    return bias_done;
  };
  auto bias_grad = [](const at::Tensor& dy, const Conv2dGeometry& g, at::Tensor& grad_bias,
                      bool channels_last) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "conv2d_bias_grad",
                                    [&] {
      if (channels_last) {
        channels_last_bias_grad(dy, g, grad_bias.mutable_data_ptr<scalar_t>());
      } else {
        conv2d_bias_grad(dy.const_data_ptr<scalar_t>(), g, grad_bias.mutable_data_ptr<scalar_t>());
      }
    });
  };
  return run_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups,
                             output_mask, /*native_channels_last=*/true, empty, columns_pass,
                             bias_grad);
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
// reference the bands path's row-wise im2col (and the CUDA kernel) can be checked against.
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

std::tuple<std::string, std::string, std::string> conv2d_cpu_plan(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> gradient_mask) {
  // The plan is that of the CPU kernels: a tensor elsewhere would get an answer about code it
  // does not run.
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "convkit::conv2d_cpu_plan: expected CPU tensors (it reports the CPU kernels' "
              "paths), but got input on ", input.device(), " and weight on ", weight.device());
  const Conv2dGeometry g = make_conv2d_geometry("convkit::conv2d_cpu_plan", input, weight, stride,
                                                padding, dilation, groups);
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc_type));
  const bool same_type = acc_type == input.scalar_type();
  const bool channels_last = is_channels_last_format(conv2d_memory_format(input, weight));
  const ConvPlan forward = choose_forward(g, acc_size, same_type, channels_last);
  const ConvPlan backward = choose_backward(g, acc_size, same_type, channels_last,
                                            gradient_mask[0], gradient_mask[1]);
  return {path_name(forward.forward), path_name(backward.input_grad),
          path_name(backward.weight_grad)};
}

std::vector<int64_t> conv2d_cpu_thread_images(const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "convkit::conv2d_cpu_thread_images: expected CPU tensors (it reports the CPU "
              "kernels' tiles), but got input on ", input.device(), " and weight on ",
              weight.device());
  const Conv2dGeometry g = make_conv2d_geometry("convkit::conv2d_cpu_thread_images", input,
                                                weight, stride, padding, dilation, groups);
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc_type));
  const bool same_type = acc_type == input.scalar_type();
  const bool channels_last = is_channels_last_format(conv2d_memory_format(input, weight));
  const ConvPlan plan = choose_forward(g, acc_size, same_type, channels_last);
  if (plan.forward != ConvPath::kImages && plan.forward != ConvPath::kBands) return {};
  return thread_images(plan.tiles, g.batch);
}

}  // namespace convkit::cpu_conv2d

namespace convkit {

// convkit._C registers these for the CPU dispatch key (cpu_kernels.cpp).
void add_conv2d_kernels(CpuKernelTable& table) {
  using namespace cpu_conv2d;
  table.conv2d_forward = &conv2d_forward_cpu;
  table.conv2d_backward = &conv2d_backward_cpu;
  table.im2col = &im2col_cpu;
  table.col2im = &col2im_cpu;
  table.conv2d_cpu_plan = &conv2d_cpu_plan;
  table.conv2d_cpu_thread_images = &conv2d_cpu_thread_images;
}

}  // namespace convkit
