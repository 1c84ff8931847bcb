// The CPU dispatch key's kernels of every op: each calls through the CpuKernelTable in use
// (cpu_kernel_table.h), or hands the call to the emulated CUDA code while CUDA emulation is on
// in the calling thread (cuda_emu/routing.h). Also the capability checks and the ops that
// report the kernels' state.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "column_buffer.h"
#include "cpu_kernel_table.h"
#include "cuda_emu/emulated_ops.h"
#include "cuda_emu/routing.h"

namespace convkit {
namespace {

std::atomic<const CpuKernelTable*> active_table{nullptr};

// Every table installed so far (a module stays loaded once imported).
std::mutex installed_mutex;
std::vector<const CpuKernelTable*> installed_tables;

std::vector<const CpuKernelTable*> installed() {
  std::lock_guard<std::mutex> lock(installed_mutex);
  return installed_tables;
}

const CpuKernelTable& active() {
  const CpuKernelTable* table = active_table.load(std::memory_order_acquire);
  TORCH_CHECK(table != nullptr,
              "convkit: no CPU kernels are loaded. `import convkit` loads those of this CPU's "
              "instruction set (convkit._cpu_avx512, _cpu_avx2 or _cpu_default); a library "
              "loaded without Python must be the CMake build, which links one set in");
  return *table;
}

// The kernel an op registers for the CPU key: the active table's slot `Slot`, whose type is
// that of the emulated CUDA function `Emulated` (the two share the op's C++ signature).
template <auto Slot, typename Signature>
struct TableKernel;

template <auto Slot, typename R, typename... Args>
struct TableKernel<Slot, R (*)(Args...)> {
  static R call(Args... args) { return (active().*Slot)(args...); }
};

template <auto Slot, auto Emulated>
using CpuKernel =
    RoutedKernel<&TableKernel<Slot, decltype(Emulated)>::call, Emulated>;

}  // namespace

std::tuple<std::string, std::string, std::string> active_conv2d_cpu_plan(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> gradient_mask) {
  return active().conv2d_cpu_plan(input, weight, stride, padding, dilation, groups,
                                  gradient_mask);
}

std::vector<int64_t> active_conv2d_cpu_thread_images(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return active().conv2d_cpu_thread_images(input, weight, stride, padding, dilation, groups);
}

// The CPU column buffers are those of the kernel modules, the CUDA ones (also the emulated
// ones) this module's.
int64_t peak_column_buffer_bytes(bool reset) {
  int64_t peak = convkit::column_buffer_peak_bytes(reset);
  for (const CpuKernelTable* table : installed()) {
    peak = std::max(peak, table->column_buffer_peak_bytes(reset));
  }
  return peak;
}

// Each kernel module has a block cache of its own: the bytes of all that were loaded.
int64_t all_cpu_cache_bytes() {
  int64_t bytes = 0;
  for (const CpuKernelTable* table : installed()) bytes += table->cpu_cache_bytes();
  return bytes;
}

void empty_all_cpu_caches() {
  for (const CpuKernelTable* table : installed()) table->empty_cpu_cache();
}

void install_cpu_kernels(const CpuKernelTable* table) {
  TORCH_CHECK(table != nullptr, "convkit: install_cpu_kernels got no table");
  const char* name = table->capability != nullptr ? table->capability : "?";
  TORCH_CHECK(table->size == sizeof(CpuKernelTable), "convkit: the CPU kernel module '", name,
              "' comes from another build (its kernel table has ", table->size,
              " bytes, convkit._C expects ", sizeof(CpuKernelTable),
              "): rebuild convkit (pip install -e .)");
  const bool filled =
      table->capability && table->conv2d_forward && table->conv2d_backward && table->im2col &&
      table->col2im && table->batch_norm_forward && table->batch_norm_backward &&
      table->batch_norm_update_stats && table->batch_norm_stats &&
      table->batch_norm_combine_stats && table->batch_norm_backward_reduce &&
      table->batch_norm_backward_elemt && table->cpu_gemm && table->conv2d_cpu_plan &&
      table->conv2d_cpu_thread_images &&
      table->cpu_cache_bytes && table->empty_cpu_cache && table->column_buffer_peak_bytes;
  TORCH_CHECK(filled, "convkit: the CPU kernel module '", name,
              "' left a slot of its kernel table empty");
  {
    std::lock_guard<std::mutex> lock(installed_mutex);
    bool known = false;
    for (const CpuKernelTable* seen : installed_tables) known = known || seen == table;
    if (!known) installed_tables.push_back(table);
  }
  active_table.store(table, std::memory_order_release);
}

std::string cpu_capability() {
  const CpuKernelTable* table = active_table.load(std::memory_order_acquire);
  return table == nullptr ? std::string() : std::string(table->capability);
}

bool cpu_supports(c10::string_view capability) {
  if (capability == "default") return true;
  const bool known = capability == "avx512" || capability == "avx2";
  TORCH_CHECK(known, "convkit: unknown CPU capability '", std::string(capability),
              "': expected avx512, avx2 or default");
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's check also asks the OS (XGETBV) whether it saves the ymm/zmm registers.
  __builtin_cpu_init();
  if (capability == "avx512") return __builtin_cpu_supports("x86-64-v4");
  return __builtin_cpu_supports("x86-64-v3");
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(convkit, CPU, m) {
  namespace emu = emulated_cuda;
  using T = CpuKernelTable;
  m.impl("conv2d_forward", &CpuKernel<&T::conv2d_forward, &emu::conv2d_forward>::call);
  m.impl("conv2d_backward", &CpuKernel<&T::conv2d_backward, &emu::conv2d_backward>::call);
  m.impl("im2col", &CpuKernel<&T::im2col, &emu::im2col>::call);
  m.impl("col2im", &CpuKernel<&T::col2im, &emu::col2im>::call);
  m.impl("batch_norm_forward",
         &CpuKernel<&T::batch_norm_forward, &emu::batch_norm_forward>::call);
  m.impl("batch_norm_backward",
         &CpuKernel<&T::batch_norm_backward, &emu::batch_norm_backward>::call);
  m.impl("batch_norm_update_stats",
         &CpuKernel<&T::batch_norm_update_stats, &emu::batch_norm_update_stats>::call);
  m.impl("batch_norm_stats", &CpuKernel<&T::batch_norm_stats, &emu::batch_norm_stats>::call);
  m.impl("batch_norm_combine_stats",
         &CpuKernel<&T::batch_norm_combine_stats, &emu::batch_norm_combine_stats>::call);
  m.impl("batch_norm_backward_reduce",
         &CpuKernel<&T::batch_norm_backward_reduce, &emu::batch_norm_backward_reduce>::call);
  m.impl("batch_norm_backward_elemt",
         &CpuKernel<&T::batch_norm_backward_elemt, &emu::batch_norm_backward_elemt>::call);
  // cpu_gemm has no CUDA code to emulate.
  m.impl("cpu_gemm", &TableKernel<&T::cpu_gemm, decltype(T::cpu_gemm)>::call);
}

}  // namespace convkit
