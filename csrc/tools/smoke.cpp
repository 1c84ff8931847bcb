// Smoke test of libconvkit without Python: calls convkit::conv2d_forward through the
// dispatcher (so only the op registrations of the library are used) and compares it with
// at::conv2d in float64. Exits non-zero when they differ by more than 1e-10.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

int main() {
  const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convkit::conv2d_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();

  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  // Grouped, strided, padded and dilated, so the im2col index math is exercised.
  const at::Tensor input = at::randn({2, 4, 9, 7}, options);
  const at::Tensor weight = at::randn({6, 2, 3, 2}, options);
  const at::Tensor bias = at::randn({6}, options);
  const int64_t stride[] = {2, 1}, padding[] = {1, 2}, dilation[] = {1, 2}, groups = 2;

  const at::Tensor ours = op.call(input, weight, bias, stride, padding, dilation, groups);
  const at::Tensor reference = at::conv2d(input, weight, bias, stride, padding, dilation, groups);
  if (ours.sizes() != reference.sizes()) {
    std::printf("convkit_smoke: output shape %s, expected %s\n", c10::str(ours.sizes()).c_str(),
                c10::str(reference.sizes()).c_str());
    return 1;
  }
  const double max_diff = (ours - reference).abs().max().item<double>();
  std::printf("convkit::conv2d_forward vs at::conv2d: output %s, max abs diff %.3e\n",
              c10::str(ours.sizes()).c_str(), max_diff);
  return max_diff <= 1e-10 ? 0 : 1;
}
