// CUDA emulation as a mode of the calling thread: while it is on (convkit.emulated_cuda() in
// Python), convkit's CPU kernels hand each call to the op's CUDA implementation compiled for
// the emulator (emulated_ops.h), so that everything above the kernel (autograd, torch.compile,
// opcheck, the nn modules) runs the CUDA path unchanged, on CPU tensors.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

namespace convkit {

bool cuda_emulation_enabled();
void count_emulated_call();

// The CPU kernel registered for an op: `Cpu`, or `Emulated` while emulation is on.
template <auto Cpu, auto Emulated>
struct RoutedKernel;

template <typename R, typename... Args, R (*Cpu)(Args...), R (*Emulated)(Args...)>
struct RoutedKernel<Cpu, Emulated> {
  static R call(Args... args) {
    if (cuda_emulation_enabled()) {
      count_emulated_call();
      return Emulated(args...);
    }
    return Cpu(args...);
  }
};

// The ops of convkit.cpp that control the emulation (see there).
void set_cuda_emulation(bool enabled, int64_t seed, int64_t max_grid_stride_blocks);
std::tuple<bool, int64_t, int64_t, int64_t, int64_t> cuda_emulation_state();
std::string cuda_emulator_info();

}  // namespace convkit
