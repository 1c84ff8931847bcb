// The per-thread CUDA emulation mode (routing.h) and its control ops.
#include "routing.h"

#include <c10/util/Exception.h>

#include "emulator.h"

namespace convkit {
namespace {

struct EmulationMode {
  bool enabled = false;
  int64_t calls = 0;  // op calls routed to the emulated CUDA code on this thread
};

thread_local EmulationMode mode;

}  // namespace

bool cuda_emulation_enabled() { return mode.enabled; }
void count_emulated_call() { ++mode.calls; }

void set_cuda_emulation(bool enabled, int64_t seed, int64_t max_grid_stride_blocks) {
  TORCH_CHECK(max_grid_stride_blocks >= 1 && max_grid_stride_blocks <= (int64_t(1) << 20),
              "convkit.emulated_cuda: max_grid_stride_blocks must be in [1, 2^20], but got ",
              max_grid_stride_blocks);
  TORCH_CHECK(seed >= 0, "convkit.emulated_cuda: expected a non-negative seed, but got ", seed);
  mode.enabled = enabled;
  cuda_emu::set_seed(static_cast<uint64_t>(seed));
  cuda_emu::set_grid_stride_block_cap(max_grid_stride_blocks);
}

std::tuple<bool, int64_t, int64_t, int64_t, int64_t> cuda_emulation_state() {
  return {mode.enabled, static_cast<int64_t>(cuda_emu::seed()), cuda_emu::grid_stride_block_cap(),
          mode.calls, cuda_emu::launches_run()};
}

std::string cuda_emulator_info() {
  std::string info = "context switch: ";
#if defined(__x86_64__) && !defined(CONVKIT_EMU_UCONTEXT)
  info += "x86-64 assembly";
#else
  info += "ucontext";
#endif
  info += "; CUDA headers (__half, __nv_bfloat16, vector types): ";
  info += CONVKIT_EMU_HAS_CUDA_HEADERS ? "yes" : "no (the emulator's own vector types)";
  return info;
}

}  // namespace convkit
