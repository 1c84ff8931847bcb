// Shared memory under the emulator: junk at the start of every block, a shadow record per byte,
// and the checks of emulator.h's file comment (uninitialised reads, hazards between threads
// with no barrier between them, indices past the end, the per-block limits). Also the
// alignment check of vector accesses and the registries of launch attributes and checks.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "scheduler.h"

namespace convkit::cuda_emu {

namespace {

constexpr size_t kStaticSharedLimit = size_t(48) << 10;  // per block, without opt-in
constexpr size_t kSharedLimit = size_t(227) << 10;       // per block, an H100's maximum
constexpr unsigned char kJunk = 0xff;                    // NaN in every float type

std::string location(SourceLocation where) {
  const std::string file = where.file != nullptr ? where.file : "?";
  const size_t slash = file.find_last_of('/');
  return (slash == std::string::npos ? file : file.substr(slash + 1)) + ":" + std::to_string(where.line);
}

std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::map<std::string, size_t>& dynamic_shared_limits() {
  static std::map<std::string, size_t> limits;
  return limits;
}

std::vector<AfterLaunchCheck>& after_launch_checks() {
  static std::vector<AfterLaunchCheck> checks;
  return checks;
}

}  // namespace

std::string Emulator::thread_name(int32_t linear) const {
  const dim3 b = config_->block;
  const uint32_t i = static_cast<uint32_t>(linear);
  std::ostringstream text;
  text << "thread (" << i % b.x << ", " << (i / b.x) % b.y << ", " << i / (b.x * b.y) << ")";
  return text.str();
}

bool Emulator::ordered(int32_t other, uint32_t other_barrier, uint32_t other_warp_epoch,
                       const EmulatedThread& me) const {
  if (other == static_cast<int32_t>(me.linear)) return true;
  if (other_barrier != block_.barrier_epoch) return true;  // a __syncthreads came between
  const bool same_warp = static_cast<uint32_t>(other) / 32 == me.linear / 32;
  return same_warp && threads_[other].warp_epoch > other_warp_epoch &&
         me.warp_epoch > other_warp_epoch;
}

void Emulator::shared_access(SharedRegionState& state, unsigned char* data, size_t size,
                             int64_t offset, size_t bytes, bool write, bool is_dynamic,
                             SourceLocation where) {
  EmulatedThread& me = require_thread("a shared-memory access");
  const char* kind = is_dynamic ? "dynamic shared memory" : "a __shared__ array";
  if (state.block_serial != block_.serial) {
    // The first access of this block: the memory is the block's own from here on, and junk.
    if (!is_dynamic) {
      block_.static_shared_bytes += size;
      if (block_.static_shared_bytes > kStaticSharedLimit) {
        fail_current("uses " + std::to_string(block_.static_shared_bytes) +
                     " bytes of static shared memory; a block has at most 48 KB of it");
      }
      if (block_.static_shared_bytes + config_->dynamic_shared_bytes > kSharedLimit) {
        fail_current("uses " + std::to_string(block_.static_shared_bytes) + " static and " +
                     std::to_string(config_->dynamic_shared_bytes) +
                     " dynamic bytes of shared memory; a block has at most 227 KB");
      }
    }
    std::memset(data, kJunk, size);
    if (state.shadow_bytes < size) {
      shadows_.push_back(std::make_unique<ShadowByte[]>(size));
      state.shadow = shadows_.back().get();
      state.shadow_bytes = size;
    }
    state.block_serial = block_.serial;
  }
  if (offset < 0 || static_cast<uint64_t>(offset) + bytes > size) {
    fail_current(std::string(write ? "writes" : "reads") + " bytes [" + std::to_string(offset) +
                 ", " + std::to_string(offset + int64_t(bytes)) + ") of " + kind + " of " +
                 std::to_string(size) + " bytes, past its end, at " + location(where));
  }
  auto* shadow = static_cast<ShadowByte*>(state.shadow);
  const int32_t self = static_cast<int32_t>(me.linear);
  for (size_t k = 0; k < bytes; ++k) {
    const size_t at = static_cast<size_t>(offset) + k;
    ShadowByte& cell = shadow[at];
    const bool written = cell.block_serial == block_.serial;
    auto what = [&] {
      return "byte " + std::to_string(at) + " of " + kind + " of " + std::to_string(size) +
             " bytes at " + location(where);
    };
    if (!write) {
      if (!written) {
        fail_current("reads " + what() + ", which no thread of this block has written (shared "
                     "memory starts as junk)");
      }
      if (!ordered(cell.writer, cell.write_barrier, cell.write_warp_epoch, me)) {
        fail_current("read-after-write hazard: reads " + what() + ", written by " +
                     thread_name(cell.writer) + " with no __syncthreads between the two");
      }
      cell.reader = self;
      cell.read_barrier = block_.barrier_epoch;
      cell.read_warp_epoch = me.warp_epoch;
      continue;
    }
    if (written) {
      if (!ordered(cell.writer, cell.write_barrier, cell.write_warp_epoch, me)) {
        fail_current("write-after-write hazard: writes " + what() + ", also written by " +
                     thread_name(cell.writer) + " with no __syncthreads between the two");
      }
      if (cell.reader >= 0 && !ordered(cell.reader, cell.read_barrier, cell.read_warp_epoch, me)) {
        fail_current("write-after-read hazard: writes " + what() + ", read by " +
                     thread_name(cell.reader) + " with no __syncthreads between the two");
      }
    } else {
      cell.block_serial = block_.serial;
    }
    cell.writer = self;
    cell.write_barrier = block_.barrier_epoch;
    cell.write_warp_epoch = me.warp_epoch;
    cell.reader = -1;
  }
}

SharedRegionState& Emulator::dynamic_shared(unsigned char** data, size_t* size) {
  require_thread("dynamic_shared");
  *data = dynamic_bytes_.data();
  *size = dynamic_bytes_.size();
  return dynamic_state_;
}

void shared_access(SharedRegionState& state, unsigned char* data, size_t size, int64_t offset,
                   size_t bytes, bool write, bool is_dynamic, SourceLocation where) {
  Emulator::instance().shared_access(state, data, size, offset, bytes, write, is_dynamic, where);
}

SharedRegionState& dynamic_shared_state(unsigned char** data, size_t* size) {
  return Emulator::instance().dynamic_shared(data, size);
}

void check_alignment(const void* address, size_t alignment, size_t bytes, const char* what,
                     SourceLocation where) {
  const auto value = reinterpret_cast<uintptr_t>(address);
  if (value % alignment == 0) return;
  std::ostringstream text;
  text << what << " of " << bytes << " bytes at " << address << " (address % " << alignment
       << " = " << value % alignment << ") at " << location(where)
       << ": a vector access needs an address aligned to its size";
  fail(text.str());
}

void set_dynamic_shared_limit(const std::string& kernel_name, size_t bytes) {
  if (bytes > kSharedLimit) {
    throw std::runtime_error("CUDA emulator: cudaFuncSetAttribute for " + kernel_name + ": " +
                             std::to_string(bytes) +
                             " bytes of dynamic shared memory is above a block's 227 KB");
  }
  const std::lock_guard<std::mutex> lock(registry_mutex());
  dynamic_shared_limits()[kernel_name] = bytes;
}

size_t dynamic_shared_limit(const char* kernel_name) {
  const std::lock_guard<std::mutex> lock(registry_mutex());
  const auto found = dynamic_shared_limits().find(kernel_name);
  return found == dynamic_shared_limits().end() ? kStaticSharedLimit : found->second;
}

void add_after_launch_check(AfterLaunchCheck check) {
  const std::lock_guard<std::mutex> lock(registry_mutex());
  after_launch_checks().push_back(check);
}

void run_after_launch_checks(const char* kernel_name) {
  std::vector<AfterLaunchCheck> checks;
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    checks = after_launch_checks();
  }
  for (AfterLaunchCheck check : checks) check(kernel_name);
}

}  // namespace convkit::cuda_emu
