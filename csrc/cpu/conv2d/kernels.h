// The entry points of the CPU conv2d paths (path.h says which runs when), one .cpp each,
// instantiated for the types the ops dispatch over. scalar_t is the tensors' type, acc_t =
// at::opmath_type<scalar_t> the compute type: the weights (weight_acc, bias_acc, [O, K/groups]
// row-major) arrive converted to it, the weight gradient accumulates in it (grad_weight_acc,
// zeroed by the caller), and half types are widened to it as tiles are written, each result
// rounded once.
// Invariants of every entry point: x and dy are contiguous NCHW (channels-last memory for the
// channels_last_* ones, and output and grad_input too); batch, output area and the wanted
// gradients are non-empty; the geometry passed make_conv2d_geometry's checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../../conv2d.h"
#include "path.h"
#include "tiles.h"

// X(type) for every type the CPU conv ops dispatch over.
#define CONVKIT_FOR_EACH_CONV_TYPE(X) X(float) X(double) X(c10::BFloat16) X(c10::Half)

namespace convkit::cpu_conv2d {

// depthwise.cpp: groups == in_channels == out_channels (depthwise_fits). The backward leaves
// the bias gradient to the frame.
template <typename scalar_t>
void depthwise_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                       const at::Tensor& bias_acc, const Conv2dGeometry& g, at::Tensor& output);
template <typename scalar_t>
void depthwise_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                        const Conv2dGeometry& g, bool need_input_grad, bool need_weight_grad,
                        at::Tensor& grad_input, at::Tensor& grad_weight_acc);

// depthwise_blocks.cpp: the same on small maps (depthwise_blocks_fit), 16 channels in the lanes.
template <typename scalar_t>
void depthwise_blocks_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                              const at::Tensor& bias_acc, const Conv2dGeometry& g,
                              at::Tensor& output);
template <typename scalar_t>
void depthwise_blocks_backward(const at::Tensor& dy, const at::Tensor& x,
                               const at::Tensor& weight_acc, const Conv2dGeometry& g,
                               bool need_input_grad, bool need_weight_grad,
                               at::Tensor& grad_input, at::Tensor& grad_weight_acc);

// window.cpp: float and double only (acc_t == scalar_t).
template <typename acc_t>
void window_forward(const at::Tensor& x, const at::Tensor& weight_acc, const at::Tensor& bias_acc,
                    const Conv2dGeometry& g, at::Tensor& output);
template <typename acc_t>
void window_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                     const Conv2dGeometry& g, bool need_input_grad, bool need_weight_grad,
                     at::Tensor& grad_input, at::Tensor& grad_weight_acc);

// rows.cpp. The weight gradient also writes grad_bias [O] when it is not null.
template <typename scalar_t>
void rows_forward(const at::Tensor& x, const at::Tensor& weight_acc, const at::Tensor& bias_acc,
                  const Conv2dGeometry& g, int64_t threads, at::Tensor& output);
template <typename scalar_t>
void rows_weight_grad(const at::Tensor& dy, const at::Tensor& x, const Conv2dGeometry& g,
                      int64_t threads, at::Tensor& grad_weight_acc, scalar_t* grad_bias);

// implicit_gemm.cpp.
template <typename scalar_t>
void implicit_gemm_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g, const TilePlan& p,
                           at::Tensor& output);

// tap_classes.cpp (AVX-512 builds; float).
#if defined(__AVX512F__)
void tap_classes_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                         const at::Tensor& bias_acc, const Conv2dGeometry& g, const TilePlan& p,
                         at::Tensor& output);
// grad_input (float, NCHW) of a layer whose transposed_geometry fits the tap classes.
void tap_classes_input_grad(const at::Tensor& dy, const at::Tensor& weight_acc,
                            const Conv2dGeometry& g, at::Tensor& grad_input);
#endif

// images.cpp.
template <typename scalar_t>
void images_forward(const at::Tensor& x, const at::Tensor& weight_acc, const at::Tensor& bias_acc,
                    const Conv2dGeometry& g, const TilePlan& p, at::Tensor& output);

// images_backward.cpp: the backward pass of the image family (plan.weight_grad is images or
// implicit_gemm, plan.input_grad images or transposed_implicit_gemm). Returns whether it
// wrote grad_bias (when not null): the implicit GEMM's weight gradient sums dY on the way.
template <typename scalar_t>
bool image_family_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                           const Conv2dGeometry& g, const ConvPlan& plan, at::Tensor& grad_input,
                           at::Tensor& grad_weight_acc, scalar_t* grad_bias);

// shared_tiles.cpp: p from plan_shared_tiles.
template <typename scalar_t>
void shared_tiles_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                          const at::Tensor& bias_acc, const Conv2dGeometry& g, const TilePlan& p,
                          at::Tensor& output);
template <typename scalar_t>
void shared_tiles_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                           const Conv2dGeometry& g, const TilePlan& p, bool need_input_grad,
                           bool need_weight_grad, at::Tensor& grad_input,
                           at::Tensor& grad_weight_acc);

// channels_last.cpp: any geometry in channels-last memory; the weights arrive as weight_ohwc,
// [O, kH, kW, C/groups] in the compute type (a channels-last weight's own memory). The
// backward leaves the bias gradient to channels_last_bias_grad.
template <typename scalar_t>
void channels_last_forward(const at::Tensor& x, const at::Tensor& weight_ohwc,
                           const at::Tensor& bias_acc, const Conv2dGeometry& g,
                           at::Tensor& output);
template <typename scalar_t>
void channels_last_backward(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor& weight_ohwc, const Conv2dGeometry& g,
                            bool need_input_grad, bool need_weight_grad, at::Tensor& grad_input,
                            at::Tensor& grad_weight_acc);
template <typename scalar_t>
void channels_last_bias_grad(const at::Tensor& dy, const Conv2dGeometry& g, scalar_t* grad_bias);

// channels_last_depthwise.cpp: depthwise_fits layers in channels-last memory (weight_acc as
// the others': [C, kH*kW], which is also the memory of its [C, kH, kW, 1] OHWC form).
template <typename scalar_t>
void channels_last_depthwise_forward(const at::Tensor& x, const at::Tensor& weight_acc,
                                     const at::Tensor& bias_acc, const Conv2dGeometry& g,
                                     at::Tensor& output);
template <typename scalar_t>
void channels_last_depthwise_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& weight_acc, const Conv2dGeometry& g,
                                      bool need_input_grad, bool need_weight_grad,
                                      at::Tensor& grad_input, at::Tensor& grad_weight_acc);

// bands.cpp: any geometry (the fallback of every other path).
template <typename scalar_t>
void bands_forward(const at::Tensor& x, const at::Tensor& weight_acc, const at::Tensor& bias_acc,
                   const Conv2dGeometry& g, const TilePlan& p, at::Tensor& output);
template <typename scalar_t>
void bands_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_acc,
                    const Conv2dGeometry& g, const TilePlan& p, bool need_input_grad,
                    bool need_weight_grad, at::Tensor& grad_input, at::Tensor& grad_weight_acc);

}  // namespace convkit::cpu_conv2d
