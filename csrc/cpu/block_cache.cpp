// The CPU block cache: a small caching allocator for the CPU ops' large outputs and scratch.
//
// Why: glibc returns the top of its heap to the system when a free leaves more than its trim
// threshold there, and large blocks come straight from mmap. Either way a training step's
// tensors of a few MiB (the input gradient, the output, the GEMM's tiles) are fresh pages at
// every call, and each first touch of a page is a page fault: 1-2 us each on the development
// VM. The 8->16 chapter layer's fwd+bwd at batch 512 faulted 440-560 times a call and took
// 2.2-2.5 ms against 1.5 ms with MALLOC_TOP_PAD_=64 MiB (no faults; docs/performance-notes.md).
// A process-wide malloc setting is the user's choice, not a library's; keeping our own
// freed blocks mapped is.
//
// How: blocks of >= 64 KiB are rounded up to a size class (8 per power of two, at least a
// page: <= 12.5% waste) and, when freed, kept on one list in the order they were freed. An
// allocation takes the most recently freed block of its class, or asks c10::alloc_cpu for a new
// one. When the free blocks hold more than CONVKIT_CPU_CACHE_MB MiB (default 64; 0 turns the
// cache off), the oldest are returned to the system, so a run whose shapes change holds at most
// that much beyond what its live tensors use. Smaller tensors go to torch's CPU allocator.
// A block's size (and the size asked for) sits in a 64-byte header in front of its data, so the
// data pointer is also the deleter's context (a "simple" DataPtr, as torch's own allocator
// makes) and 64-byte aligned. One mutex guards the list; it is held only to push or take a
// block, never while the system allocates or frees, and across fork() (a child inherits it
// unlocked). When the system is out of memory the free blocks are returned and the allocation
// tried once more. Allocations and frees are reported to torch.profiler's memory profiling, as
// torch's CPU allocator reports its own.
#include "block_cache.h"

#include "../config.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <pthread.h>
#include <vector>

namespace convkit {
namespace {

constexpr size_t kMinCachedBytes = size_t(64) << 10;
constexpr size_t kHeaderBytes = 64;  // keeps the data 64-byte aligned
constexpr size_t kPageBytes = 4096;

size_t size_class(size_t nbytes) {
  const size_t top = size_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(nbytes)));
  const size_t step = std::max(top / 8, kPageBytes);
  return (nbytes + step - 1) / step * step;
}

// The header in front of each large block's data.
struct BlockHeader {
  size_t block_bytes;      // the size class, the header not counted
  size_t requested_bytes;  // what the tensor in it asked for (profiler reports)
};
static_assert(sizeof(BlockHeader) <= kHeaderBytes, "the header must fit before the data");

BlockHeader* header_of(void* data) {
  return reinterpret_cast<BlockHeader*>(static_cast<char*>(data) - kHeaderBytes);
}

struct FreeBlock {
  void* base;
  size_t bytes;  // the block's size class (the header not counted)
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    c10::DataPtr block = allocate_uninitialised(nbytes);
    if (cpu_junk_fill() && nbytes > 0) std::memset(block.get(), 0xff, nbytes);
    return block;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return cached_bytes_;
  }

  void empty() { trim_to(0); }

 private:
  // The deleter of every large block: back on the list, then the oldest blocks out until the
  // list fits the limit. Runs wherever the last reference to a tensor is dropped; never throws.
  static void release(void* data) {
    BlockCache& cache = instance();
    const BlockHeader header = *header_of(data);
    cache.live_bytes_.fetch_sub(static_cast<int64_t>(header.block_bytes),
                                std::memory_order_relaxed);
    cache.report_to_profiler(data, -static_cast<int64_t>(header.requested_bytes));
    cache.give_back(header_of(data), header.block_bytes);
  }

  void give_back(void* base, size_t bytes) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      free_blocks_.push_back({base, bytes});
      cached_bytes_ += static_cast<int64_t>(bytes);
    }
    trim_to(limit_bytes_.load(std::memory_order_relaxed));
  }

  // Returns the oldest free blocks to the system until the rest hold at most `limit` bytes.
  void trim_to(int64_t limit) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      while (cached_bytes_ > limit && !free_blocks_.empty()) {
        to_free.push_back(free_blocks_.front().base);
        cached_bytes_ -= static_cast<int64_t>(free_blocks_.front().bytes);
        free_blocks_.pop_front();
      }
    }
    for (void* old : to_free) c10::free_cpu(old);
  }

  c10::DataPtr allocate_uninitialised(size_t nbytes) {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const int64_t limit = cpu_cache_limit_bytes();
    limit_bytes_.store(limit, std::memory_order_relaxed);
    // A limit lowered since the last free takes effect now, not at the next free.
    if (cached_bytes() > limit) trim_to(limit);
    if (limit == 0) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = size_class(nbytes);
    void* base = take(bytes);
    if (base == nullptr) base = allocate_from_system(bytes);
    void* data = static_cast<char*>(base) + kHeaderBytes;
    BlockHeader* header = header_of(data);
    header->block_bytes = bytes;
    header->requested_bytes = nbytes;
    live_bytes_.fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed);
    report_to_profiler(data, static_cast<int64_t>(nbytes));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void* allocate_from_system(size_t bytes) {
    try {
      return c10::alloc_cpu(bytes + kHeaderBytes);
    } catch (const c10::Error&) {
      trim_to(0);  // out of memory: the free blocks first, then once more
      return c10::alloc_cpu(bytes + kHeaderBytes);
    }
  }

  void report_to_profiler(void* data, int64_t signed_bytes) {
    if (!c10::memoryProfilingEnabled()) return;
    const int64_t live = live_bytes_.load(std::memory_order_relaxed);
    c10::reportMemoryUsageToProfiler(data, signed_bytes, static_cast<size_t>(live),
                                     static_cast<size_t>(live + cached_bytes()),
                                     c10::Device(c10::DeviceType::CPU));
  }

  // The most recently freed block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto it = free_blocks_.rbegin(); it != free_blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* base = it->base;
        cached_bytes_ -= static_cast<int64_t>(bytes);
        free_blocks_.erase(std::next(it).base());
        return base;
      }
    }
    return nullptr;
  }

 public:
  // Never destroyed: tensors can outlive static destructors (at interpreter exit), and their
  // deleter must still find the cache.
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  BlockCache() {
    // fork() copies the mutex as it is at that moment: hold it across the fork, so that a
    // child never starts with it locked by a thread the child does not have.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  std::mutex mutex_;
  std::deque<FreeBlock> free_blocks_;  // oldest first
  int64_t cached_bytes_ = 0;
  std::atomic<int64_t> live_bytes_{0};  // blocks in use, by size class
  std::atomic<int64_t> limit_bytes_{kDefaultCpuCacheBytes};
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "cached_empty: expected a CPU tensor");
  return at::detail::empty_generic(sizes, &BlockCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()),
                                   c10::MemoryFormat::Contiguous);
}

int64_t cpu_cache_bytes() { return BlockCache::instance().cached_bytes(); }

void empty_cpu_cache() { BlockCache::instance().empty(); }

}  // namespace convkit
