// Autograd for the two forward ops that training calls on every layer, conv2d_forward and
// batch_norm_forward, as C++ autograd nodes registered on the Autograd key (as torchvision
// registers its ops'). Each node's backward calls the matching backward op through the
// dispatcher, so CPU and CUDA get their gradients from this one registration, and
// torch.compile traces the backward op like any other.
//
// Why C++ and not torch.library.register_autograd: at the chapter's batch 64 a layer's two
// kernels take 30-40 us and a Python autograd.Function around them added ~80 us (a Python
// forward, setup_context and backward per call, measured on [64,32,4,4] batch norm: 115 us
// for the training step against 31 us in the two ops). A C++ node costs what an aten op's
// does. im2col and col2im, which no training step calls, keep their Python registrations
// (convkit/autograd.py), and so do the Python twins of these two nodes, which torch.func
// transforms use (they refuse C++ nodes).
//
// Double backward is not supported. The backward ops' own Autograd kernels (below) give
// their outputs an Error node when they are computed with create_graph, so differentiating
// through a convkit gradient raises a clear error; without them autograd's fallback warned
// and then reported the inputs as unused.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace convkit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> to_vector(at::IntArrayRef values) { return values.vec(); }

// A new autograd node, held the way this torch holds them: by std::shared_ptr up to torch
// 2.1x, by c10::intrusive_ptr since Node derives from intrusive_ptr_target.
template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeType>) {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  }
}

// Gradients computed with grad mode on (create_graph=True) from tensors that require grad get
// an Error node as their history: using them in a further backward raises `message`.
void forbid_double_backward(const std::string& message, const variable_list& inputs,
                            std::tuple<at::Tensor, at::Tensor, at::Tensor>& grads) {
  if (!torch::autograd::compute_requires_grad(inputs)) return;
  auto node = make_node<torch::autograd::Error>(
      message, torch::autograd::collect_next_edges(inputs));
  for (at::Tensor* grad : {&std::get<0>(grads), &std::get<1>(grads), &std::get<2>(grads)}) {
    if (grad->defined() && torch::autograd::isDifferentiableType(grad->scalar_type())) {
      torch::autograd::set_history(*grad, node);
    }
  }
}

variable_list defined_tensors(std::initializer_list<const std::optional<at::Tensor>*> tensors) {
  variable_list defined;
  for (const std::optional<at::Tensor>* t : tensors) {
    if (t->has_value() && (*t)->defined()) defined.push_back(**t);
  }
  return defined;
}

// ---- conv2d

at::Tensor call_conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::conv2d_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::conv2d_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
              at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
}

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    // Each gradient reads the other operand, and both give the geometry.
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = to_vector(stride);
    ctx->saved_data["padding"] = to_vector(padding);
    ctx->saved_data["dilation"] = to_vector(dilation);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_conv2d_forward(input, weight, bias, stride, padding, dilation, groups);
  }

  // One gradient per forward argument: input, weight, bias, then four non-tensors.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(7);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts only the tensors given: input 0, weight 1, bias 2 when present.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return grads;
    auto [grad_input, grad_weight, grad_bias] = call_conv2d_backward(
        grad_output, saved[0], saved[1], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["groups"].toInt(), mask);
    if (mask[0]) grads[0] = grad_input;
    if (mask[1]) grads[1] = grad_weight;
    if (mask[2]) grads[2] = grad_bias;
    return grads;
  }
};

at::Tensor conv2d_forward_autograd(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    // Nothing to record (no_grad, eval): skip building a node, ~1.5 us of a small call.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_conv2d_forward(input, weight, bias, stride, padding, dilation, groups);
  }
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups);
}

// Autograd kernel of conv2d_backward itself: the gradients, with no derivative of their own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grads = call_conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups,
                                 output_mask);
  }
  forbid_double_backward(
      "convkit::conv2d_backward has no derivative: double backward through convkit's conv2d "
      "(differentiating a gradient computed with create_graph=True) is not supported",
      {grad_output, input, weight}, grads);
  return grads;
}

// ---- batch norm (+ activation)

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_batch_norm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation, double alpha, double beta) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::batch_norm_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, double, c10::string_view, double,
              double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, eps, activation, alpha,
                 beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta, std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::batch_norm_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool,
              double, c10::string_view, double, double, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, bias, save_mean, save_var, training, eps, activation,
                 alpha, beta, output_mask);
}

std::optional<at::Tensor> defined_or_nullopt(const at::Tensor& t) {
  if (t.defined()) return t;
  return std::nullopt;
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training,
                               double eps, c10::string_view activation, double alpha, double beta) {
    at::Tensor output, save_mean, save_var;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, save_mean, save_var) = call_batch_norm_forward(
          input, weight, bias, running_mean, running_var, training, eps, activation, alpha, beta);
    }
    ctx->mark_non_differentiable({save_mean, save_var});
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    // bias is needed only for the activation's derivative at z, which the backward recomputes
    // from x instead of storing y; an absent tensor is saved as an undefined one.
    const bool activated = activation != "none";
    ctx->save_for_backward({input, has_weight ? *weight : at::Tensor(),
                            activated && has_bias ? *bias : at::Tensor(), save_mean, save_var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = has_bias;
    // The statistics' gradients are never used: no zero tensors for them.
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_var};
  }

  // One gradient per forward argument: input, weight, bias, then seven that have none.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(10);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts only the tensors given: input, then weight and bias if present.
    const size_t weight_edge = 1;
    const size_t bias_edge = has_weight ? 2 : 1;
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0),
                                      has_weight && ctx->needs_input_grad(weight_edge),
                                      has_bias && ctx->needs_input_grad(bias_edge)};
    if (!mask[0] && !mask[1] && !mask[2]) return grads;
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_input, grad_weight, grad_bias] = call_batch_norm_backward(
        grad_output, saved[0], defined_or_nullopt(saved[1]),
        defined_or_nullopt(saved[2]), saved[3], saved[4], ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(), mask);
    if (mask[0]) grads[0] = grad_input;
    if (mask[1]) grads[1] = grad_weight;
    if (mask[2]) grads[2] = grad_bias;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, c10::string_view activation, double alpha, double beta) {
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_batch_norm_forward(input, weight, bias, running_mean, running_var, training, eps,
                                   activation, alpha, beta);
  }
  variable_list outputs = BatchNormFunction::apply(input, weight, bias, running_mean, running_var,
                                                   training, eps, activation, alpha, beta);
  return {outputs[0], outputs[1], outputs[2]};
}

// Autograd kernel of batch_norm_backward itself: the gradients, with no derivative of their own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, c10::string_view activation, double alpha, double beta, std::array<bool, 3> output_mask) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grads = call_batch_norm_backward(grad_output, input, weight, bias, save_mean, save_var,
                                     training, eps, activation, alpha, beta, output_mask);
  }
  variable_list inputs = {grad_output, input};
  for (const at::Tensor& parameter : defined_tensors({&weight, &bias})) inputs.push_back(parameter);
  forbid_double_backward(
      "convkit::batch_norm_backward has no derivative: double backward through convkit's batch "
      "norm (differentiating a gradient computed with create_graph=True) is not supported",
      inputs, grads);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, Autograd, m) {
  m.impl("conv2d_forward", &conv2d_forward_autograd);
  m.impl("conv2d_backward", &conv2d_backward_autograd);
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace convkit
