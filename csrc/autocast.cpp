// Autocast for conv2d: under torch.autocast("cuda") or torch.autocast("cpu") our conv runs in
// the autocast dtype (float16 or bfloat16 on CUDA, bfloat16 by default on the CPU), as torch's
// conv2d does; the casts are recorded by autograd, so gradients still reach float32
// parameters. Batch norm has no autocast kernel: like torch's, it runs in the dtype it is given.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace convkit {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
at::Tensor conv2d_forward_autocast(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::conv2d_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, input, kDevice),
                 at::autocast::cached_cast(dtype, weight, kDevice),
                 at::autocast::cached_cast(dtype, bias, kDevice), stride, padding, dilation,
                 groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, AutocastCUDA, m) {
  m.impl("conv2d_forward",
         &conv2d_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(convkit, AutocastCPU, m) {
  m.impl("conv2d_forward",
         &conv2d_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace convkit
