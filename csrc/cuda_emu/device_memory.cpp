// empty_device and its guard bytes (see device_memory.h): an allocator that puts kGuardBytes of a
// fixed pattern before and after every block it hands out, and keeps a registry of the live
// blocks, which every launch checks when it ends. The tensors it makes look exactly like
// at::empty's (storage offset 0, storage of the requested size).
#include "device_memory.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "scheduler.h"

#include "sanitizer.h"

namespace convkit::cuda_emu {
namespace {

constexpr size_t kGuardBytes = 64;  // also the data's alignment
constexpr unsigned char kGuard = 0xa5;
constexpr unsigned char kJunk = 0xff;  // NaN in every float type

// Live blocks: base address (the front guard) -> bytes of data. Blocks may be freed on any
// thread, so the registry is shared and locked.
std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<unsigned char*, size_t>& live_blocks() {
  static std::map<unsigned char*, size_t> blocks;
  return blocks;
}

// Under AddressSanitizer the guards are poisoned instead of checked after the launch: the
// offending access itself is then reported, with its stack.
void poison_guards(unsigned char* base, size_t bytes, size_t total, bool poison) {
#if defined(CONVKIT_EMU_ASAN)
  if (poison) {
    ASAN_POISON_MEMORY_REGION(base, kGuardBytes);
    ASAN_POISON_MEMORY_REGION(base + kGuardBytes + bytes, total - kGuardBytes - bytes);
  } else {
    ASAN_UNPOISON_MEMORY_REGION(base, total);
  }
#else
  (void)base, (void)bytes, (void)total, (void)poison;
#endif
}

size_t total_bytes(size_t bytes) {
  return (kGuardBytes + bytes + kGuardBytes + kGuardBytes - 1) / kGuardBytes * kGuardBytes;
}

void free_guarded(void* base) {
  size_t bytes = 0;
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    auto found = live_blocks().find(static_cast<unsigned char*>(base));
    if (found != live_blocks().end()) {
      bytes = found->second;
      live_blocks().erase(found);
    }
  }
  poison_guards(static_cast<unsigned char*>(base), bytes, total_bytes(bytes), false);
  std::free(base);
}

class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const size_t total = total_bytes(bytes);
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(kGuardBytes, total));
    TORCH_CHECK(base != nullptr, "convkit CUDA emulator: out of memory allocating ", bytes,
                " bytes of emulated device memory");
    std::memset(base, kGuard, kGuardBytes);
    std::memset(base + kGuardBytes, kJunk, bytes);
    std::memset(base + kGuardBytes + bytes, kGuard, total - kGuardBytes - bytes);
    poison_guards(base, bytes, total, true);
    {
      const std::lock_guard<std::mutex> lock(registry_mutex());
      live_blocks()[base] = bytes;
    }
    return c10::DataPtr(base + kGuardBytes, base, &free_guarded, c10::Device(c10::kCPU));
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

GuardedAllocator& guarded_allocator() {
  static GuardedAllocator allocator;
  return allocator;
}

bool intact(const unsigned char* guard, size_t* first_changed) {
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (guard[i] != kGuard) {
      *first_changed = i;
      return false;
    }
  }
  return true;
}

void check_guards(const char* kernel_name) {
#if defined(CONVKIT_EMU_ASAN)
  return;  // the guards are poisoned: AddressSanitizer reports the access itself
#endif
  std::string error;
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    for (const auto& [base, bytes] : live_blocks()) {
      unsigned char* front = base;
      unsigned char* back = base + kGuardBytes + bytes;
      size_t changed = 0;
      if (error.empty() && !intact(front, &changed)) {
        error = "wrote byte -" + std::to_string(kGuardBytes - changed) + " of a " +
                std::to_string(bytes) + "-byte buffer the op allocated, before its start";
      } else if (error.empty() && !intact(back, &changed)) {
        error = "wrote byte " + std::to_string(bytes + changed) + " of a " + std::to_string(bytes) +
                "-byte buffer the op allocated, past its end";
      }
      std::memset(front, kGuard, kGuardBytes);  // each overrun is reported once
      std::memset(back, kGuard, kGuardBytes);
    }
  }
  if (!error.empty()) {
    throw std::runtime_error(std::string("CUDA emulator: kernel ") + kernel_name + " " + error +
                             ": the guard bytes around it changed during the launch");
  }
}

[[maybe_unused]] const bool registered = [] {
  add_after_launch_check(&check_guards);
  return true;
}();

}  // namespace

at::Tensor empty_device(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "convkit CUDA emulator: emulated device memory is CPU ",
              "memory, but got options for ", options.device());
  return at::detail::empty_generic(sizes, &guarded_allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t guarded_buffers() {
  const std::lock_guard<std::mutex> lock(registry_mutex());
  return static_cast<int64_t>(live_blocks().size());
}

}  // namespace convkit::cuda_emu
