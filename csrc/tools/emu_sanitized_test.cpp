// The CUDA ops' code under the emulator, built with AddressSanitizer and UndefinedBehaviorSanitizer
// (CMakeLists.txt: convkit_emu_sanitized), so that an out-of-bounds access or undefined behaviour
// in a CUDA kernel or its host code fails on a machine with no GPU. Runs every kernel on shapes
// that take each branch of the launch plans (chunked columns, groups, the vectorised and scalar
// batch-norm passes, one to many threads per channel, several slices) against ATen's float64
// results, and the emulator's self-test table (csrc/cuda_emu/self_test.cpp).
//   usage: convkit_emu_sanitized                 every check; exit status 0 when all pass
//          convkit_emu_sanitized --case NAME     one self-test case (write_past_end: the
//                                                sanitizer must report it)
//          convkit_emu_sanitized --read-past-end a kernel reading past a torch tensor's end
//                                                (the sanitizer must report it)
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../cuda_emu/emulated_ops.h"
#include "../cuda_emu/emulator.h"
#include "../cuda_emu/self_test.h"

namespace {

namespace emu = convkit::emulated_cuda;

int failures = 0;
int checks = 0;

void check_close(const at::Tensor& ours, const at::Tensor& reference, double tolerance,
                 const std::string& what) {
  ++checks;
  if (ours.sizes() != reference.sizes()) {
    std::printf("FAIL %s: shape %s, expected %s\n", what.c_str(), c10::str(ours.sizes()).c_str(),
                c10::str(reference.sizes()).c_str());
    ++failures;
    return;
  }
  const double error =
      ours.numel() == 0 ? 0.0 : (ours.to(at::kDouble) - reference.to(at::kDouble)).abs().max().item<double>();
  const double scale = reference.numel() == 0 ? 1.0 : std::max(1.0, reference.abs().max().item<double>());
  if (!(error <= tolerance * scale)) {
    std::printf("FAIL %s: max error %.3g (scale %.3g, tolerance %.3g)\n", what.c_str(), error,
                scale, tolerance);
    ++failures;
  }
}

struct ConvCase {
  int64_t n, c, h, w, o, kh, kw, stride, pad, dilation, groups;
};

void test_conv(const ConvCase& k, at::ScalarType dtype, double tolerance) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({k.n, k.c, k.h, k.w}, options).to(dtype);
  const at::Tensor weight = at::randn({k.o, k.c / k.groups, k.kh, k.kw}, options).to(dtype);
  const at::Tensor bias = at::randn({k.o}, options).to(dtype);
  const std::vector<int64_t> stride{k.stride, k.stride}, pad{k.pad, k.pad}, dil{k.dilation, k.dilation};
  const std::string what = "conv2d " + c10::str(x.sizes(), " * ", weight.sizes(), " ", dtype);
  const at::Tensor x64 = x.to(at::kDouble), w64 = weight.to(at::kDouble), b64 = bias.to(at::kDouble);
  const at::Tensor expected = at::conv2d(x64, w64, b64, stride, pad, dil, k.groups);
  check_close(emu::conv2d_forward(x, weight, bias, stride, pad, dil, k.groups), expected, tolerance,
              what + " forward");
  const at::Tensor dy = at::randn(expected.sizes(), options).to(dtype);
  const auto [gx, gw, gb] = emu::conv2d_backward(dy, x, weight, stride, pad, dil, k.groups,
                                                 {true, true, true});
  const auto [ex, ew, eb] = at::convolution_backward(
      dy.to(at::kDouble), x64, w64, std::vector<int64_t>{k.o}, stride, pad, dil, false, {0, 0},
      k.groups, {true, true, true});
  check_close(gx, ex, tolerance, what + " grad_input");
  check_close(gw, ew, tolerance * 4, what + " grad_weight");
  check_close(gb, eb, tolerance * 4, what + " grad_bias");
}

void test_im2col() {
  const at::Tensor x = at::randn({2, 3, 9, 7}, at::TensorOptions().dtype(at::kDouble));
  const std::vector<int64_t> kernel{3, 2}, dil{2, 1}, pad{1, 0}, stride{1, 2};
  const at::Tensor columns = emu::im2col(x, kernel, dil, pad, stride);
  check_close(columns, at::im2col(x, kernel, dil, pad, stride), 0.0, "im2col");
  check_close(emu::col2im(columns, {9, 7}, kernel, dil, pad, stride),
              at::col2im(columns, {9, 7}, kernel, dil, pad, stride), 1e-12, "col2im");
}

// A fused activation and its float64 reference: ATen's own forward and backward ops.
struct ActivationCase {
  const char* name;
  double alpha;
  double beta;
};

at::Tensor reference_activation(const ActivationCase& act, const at::Tensor& z) {
  const std::string name = act.name;
  if (name == "relu") return at::relu(z);
  if (name == "hardtanh") return at::hardtanh(z, act.alpha, act.beta);
  if (name == "leaky_relu") return at::leaky_relu(z, act.alpha);
  if (name == "silu") return at::silu(z);
  if (name == "hardswish") return at::hardswish(z);
  return z;
}

at::Tensor reference_activation_backward(const ActivationCase& act, const at::Tensor& dy,
                                         const at::Tensor& z) {
  const std::string name = act.name;
  if (name == "relu") return at::threshold_backward(dy, at::relu(z), 0);
  if (name == "hardtanh") return at::hardtanh_backward(dy, z, act.alpha, act.beta);
  if (name == "leaky_relu") return at::leaky_relu_backward(dy, z, act.alpha, false);
  if (name == "silu") return at::silu_backward(dy, z);
  if (name == "hardswish") return at::hardswish_backward(dy, z);
  return dy;
}

void test_batch_norm(std::vector<int64_t> shape, bool training, const ActivationCase& act,
                     at::ScalarType dtype, double tolerance) {
  const int64_t C = shape[1];
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = (at::randn(shape, options) * 2 + 1).to(dtype);
  // Parameters and running statistics in float32 for the reduced-precision inputs, as in
  // mixed-precision training.
  const at::ScalarType parameter_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor weight = at::randn({C}, options).to(parameter_type);
  const at::Tensor bias = at::randn({C}, options).to(parameter_type);
  at::Tensor rm = at::randn({C}, options).to(parameter_type);
  at::Tensor rv = (at::rand({C}, options) + 0.5).to(parameter_type);
  at::Tensor rm64 = rm.to(at::kDouble), rv64 = rv.to(at::kDouble);
  const std::string what = "batch_norm " + c10::str(x.sizes(), " ", dtype,
                                                    training ? " training " : " eval ", act.name);
  const auto [out, mean, var] = emu::batch_norm_forward(x, weight, bias, rm, rv, training, 1e-5,
                                                        act.name, act.alpha, act.beta);
  if (training) emu::batch_norm_update_stats(rm, rv, mean, var, 0.1, x.numel() / C);
  const at::Tensor x64 = x.to(at::kDouble);
  const auto [e_out, e_mean, e_invstd] = at::native_batch_norm(
      x64, weight.to(at::kDouble), bias.to(at::kDouble), rm64, rv64, training, 0.1, 1e-5);
  check_close(out, reference_activation(act, e_out), tolerance, what + " output");
  check_close(rm, rm64, tolerance, what + " running_mean");
  check_close(rv, rv64, tolerance, what + " running_var");
  const at::Tensor dy = at::randn(shape, options).to(dtype);
  const auto [gx, gw, gb] =
      emu::batch_norm_backward(dy, x, weight, bias, mean, var, training, 1e-5, act.name,
                               act.alpha, act.beta, {true, true, true});
  const at::Tensor dy64 = reference_activation_backward(act, dy.to(at::kDouble), e_out);
  // In training the saved batch statistics are used; in eval the running ones.
  const auto [ex, ew, eb] = at::native_batch_norm_backward(
      dy64, x64, weight.to(at::kDouble), training ? at::Tensor() : rm64,
      training ? at::Tensor() : rv64, e_mean, e_invstd, training, 1e-5, {true, true, true});
  check_close(gx, ex, tolerance * 10, what + " grad_input");
  check_close(gw, ew, tolerance * 10, what + " grad_weight");
  check_close(gb, eb, tolerance * 10, what + " grad_bias");
}

void run_self_tests() {
  for (const convkit::SelfTestCase& test : convkit::self_test_cases()) {
    // Under AddressSanitizer the guard bytes are poisoned: the overrun is the sanitizer's to
    // report (--case write_past_end), and it ends the process.
    if (test.name == "write_past_end") continue;
    ++checks;
    std::string error;
    try {
      test.run();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const bool ok = test.expected_error.empty() ? error.empty()
                                                : error.find(test.expected_error) != std::string::npos;
    if (!ok) {
      std::printf("FAIL self-test %s: expected '%s', got '%s'\n", test.name.c_str(),
                  test.expected_error.c_str(), error.c_str());
      ++failures;
    }
  }
}

__global__ void read_kernel(const float* x, int64_t n, float* out) {
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) sum += x[i];  // reads x[n]
  out[threadIdx.x] = sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--case") {
    for (const convkit::SelfTestCase& test : convkit::self_test_cases()) {
      if (test.name == argv[2]) test.run();
    }
    return 0;
  }
  if (argc == 2 && std::string(argv[1]) == "--read-past-end") {
    const at::Tensor x = at::randn({1000});
    at::Tensor out = at::empty({64});
    convkit::cuda_emu::launch<read_kernel>(1, 64, 0, x.const_data_ptr<float>(), int64_t(1000),
                                           out.mutable_data_ptr<float>());
    return 0;
  }
  at::manual_seed(0);
  const std::vector<ConvCase> convs = {
      {2, 3, 8, 8, 4, 3, 3, 1, 1, 1, 1},   {3, 4, 10, 9, 6, 3, 3, 2, 1, 1, 2},
      {2, 8, 9, 9, 8, 3, 3, 1, 1, 1, 8},   {2, 3, 15, 15, 4, 3, 3, 1, 2, 2, 1},
      {1, 2, 11, 9, 3, 4, 4, 2, 1, 1, 1},  {0, 4, 8, 8, 4, 3, 3, 1, 1, 1, 1},
      {5, 3, 6, 6, 4, 1, 1, 2, 0, 1, 1},   {1, 3, 5, 5, 2, 5, 5, 1, 0, 1, 1},
  };
  for (const ConvCase& k : convs) test_conv(k, at::kDouble, 1e-10);
  setenv("CONVKIT_COLUMN_BUDGET_MB", "0.001", 1);  // one image per chunk
  test_conv(convs[1], at::kDouble, 1e-10);
  test_conv(convs[1], at::kHalf, 2e-2);
  test_conv(convs[1], at::kBFloat16, 1e-1);
  unsetenv("CONVKIT_COLUMN_BUDGET_MB");
  test_conv(convs[0], at::kFloat, 1e-5);
  test_im2col();
  const std::vector<std::vector<int64_t>> shapes = {
      {4, 3, 8, 8}, {4, 3, 5, 7}, {7, 5, 1, 1}, {6, 4}, {64, 2, 9, 9}, {2, 3, 70, 71}};
  const std::vector<ActivationCase> activations = {
      {"none", 0.0, 0.0},       {"relu", 0.0, 0.0}, {"hardtanh", -0.5, 1.0},
      {"leaky_relu", 0.1, 0.0}, {"silu", 0.0, 0.0}, {"hardswish", 0.0, 0.0}};
  for (const auto& shape : shapes) {
    for (bool training : {true, false}) {
      for (const ActivationCase& act : activations) {
        test_batch_norm(shape, training, act, at::kDouble, 1e-10);
      }
    }
  }
  test_batch_norm({8, 4, 6, 6}, true, {"relu", 0.0, 0.0}, at::kFloat, 1e-5);
  test_batch_norm({8, 4, 6, 6}, true, {"silu", 0.0, 0.0}, at::kFloat, 1e-5);
  test_batch_norm({8, 4, 6, 6}, true, {"relu", 0.0, 0.0}, at::kHalf, 2e-2);
  run_self_tests();
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
