// The functions emulator.h declares, each forwarding to the calling OS thread's Emulator
// (scheduler.h), and the names the emulator's messages use.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "emulator.h"
#include "scheduler.h"

namespace convkit::cuda_emu {

[[noreturn]] void fail(const std::string& what) {
  Emulator::instance().fail_current(what);
  std::abort();
}

int block_barrier(BarrierReduction reduction, int predicate) {
  return Emulator::instance().barrier(reduction, predicate);
}

uint64_t warp_collective(Collective kind, unsigned int mask, uint64_t value, int argument,
                         int width) {
  return Emulator::instance().collective(kind, mask, value, argument, width);
}

unsigned int active_lanes() { return Emulator::instance().active_lanes(); }

void run_launch(const LaunchConfig& config, void (*thread_body)(void*), void* parameters) {
  Emulator::instance().launch(config, thread_body, parameters);
}

int64_t launches_run() { return Emulator::instance().launches(); }
void set_seed(uint64_t seed) { Emulator::instance().set_seed(seed); }
uint64_t seed() { return Emulator::instance().seed(); }
int64_t grid_stride_block_cap() { return Emulator::instance().grid_stride_block_cap(); }
void set_grid_stride_block_cap(int64_t blocks) {
  if (blocks < 1) throw std::runtime_error("CUDA emulator: the grid-stride block cap must be positive");
  Emulator::instance().set_grid_stride_block_cap(blocks);
}

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kShuffleIndex: return "__shfl_sync";
    case Collective::kShuffleUp: return "__shfl_up_sync";
    case Collective::kShuffleDown: return "__shfl_down_sync";
    case Collective::kShuffleXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kSyncWarp: return "__syncwarp";
  }
  return "a warp collective";
}

std::string kernel_name_from_signature(const char* pretty_function) {
  const std::string text = pretty_function;
  const std::string key = "Kernel = ";
  size_t start = text.find(key);
  if (start == std::string::npos) return text;
  start += key.size();
  if (start < text.size() && text[start] == '&') ++start;
  int depth = 0;
  size_t end = start;
  for (; end < text.size(); ++end) {
    const char c = text[end];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if (depth == 0 && (c == ';' || c == ',' || c == ']')) break;
    if (depth < 0) break;
  }
  return text.substr(start, end - start);
}

}  // namespace convkit::cuda_emu
