// The seam between convkit._C and the CPU kernels of one instruction set.
//
// The kernels of csrc/cpu/ are compiled once per CPU capability (avx512, avx2, default: see
// setup.py) into extension modules of their own, convkit._cpu_<capability>. Each fills one
// CpuKernelTable (csrc/cpu/kernel_module.cpp); convkit._C registers the CPU dispatch key's
// kernels once (cpu_kernels.cpp) and calls through the table of the capability in use, picked
// at import from the CPU's features (convkit/cpu_kernels.py).
//
// Why separate modules rather than one library with per-ISA files: every inline function of a
// header (ours, ATen's, the standard library's) compiled into an AVX-512 file is a weak symbol
// the linker may pick for the whole library, so a baseline caller could run AVX-512 code on a
// CPU without it. A module built with -fvisibility=hidden and loaded RTLD_LOCAL (as Python
// loads extension modules) binds its inline code to itself only, and nothing else binds to it;
// and a module is loaded only on a CPU that has its instruction set, so even its static
// initialisers run where they can.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emu/emulated_ops.h"  // the ops' C++ signatures, which the CPU kernels share

namespace convkit {

struct CpuKernelTable {
  // sizeof(CpuKernelTable) of the build that filled it: a module from another build (an
  // older layout) is refused rather than called through the wrong slots.
  std::size_t size = 0;
  const char* capability = nullptr;  // "avx512", "avx2", "default" (or the CMake build's)

  // The ops registered for the CPU dispatch key.
  decltype(&emulated_cuda::conv2d_forward) conv2d_forward = nullptr;
  decltype(&emulated_cuda::conv2d_backward) conv2d_backward = nullptr;
  decltype(&emulated_cuda::im2col) im2col = nullptr;
  decltype(&emulated_cuda::col2im) col2im = nullptr;
  decltype(&emulated_cuda::batch_norm_forward) batch_norm_forward = nullptr;
  decltype(&emulated_cuda::batch_norm_backward) batch_norm_backward = nullptr;
  decltype(&emulated_cuda::batch_norm_update_stats) batch_norm_update_stats = nullptr;
  decltype(&emulated_cuda::batch_norm_stats) batch_norm_stats = nullptr;
  decltype(&emulated_cuda::batch_norm_combine_stats) batch_norm_combine_stats = nullptr;
  decltype(&emulated_cuda::batch_norm_backward_reduce) batch_norm_backward_reduce = nullptr;
  decltype(&emulated_cuda::batch_norm_backward_elemt) batch_norm_backward_elemt = nullptr;
  at::Tensor (*cpu_gemm)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                         bool transpose_a, bool transpose_b, double alpha,
                         double beta) = nullptr;

  // The module's own state, which the ops of convkit.cpp report.
  std::tuple<std::string, std::string, std::string> (*conv2d_cpu_plan)(
      const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
      std::array<bool, 2> gradient_mask) = nullptr;
  std::vector<int64_t> (*conv2d_cpu_thread_images)(
      const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) = nullptr;
  int64_t (*cpu_cache_bytes)() = nullptr;
  void (*empty_cpu_cache)() = nullptr;
  int64_t (*column_buffer_peak_bytes)(bool reset) = nullptr;
};

// Each fills its slots (in the file that holds the kernels, next to them).
void add_conv2d_kernels(CpuKernelTable& table);        // cpu/conv2d/ops.cpp
void add_batch_norm_kernels(CpuKernelTable& table);    // cpu/batch_norm.cpp
void add_sync_batch_norm_kernels(CpuKernelTable& table);  // cpu/sync_batch_norm.cpp
void add_gemm_kernels(CpuKernelTable& table);          // cpu/gemm_op.cpp

// The table of this module's capability, every slot filled (cpu/kernel_module.cpp).
const CpuKernelTable* cpu_kernel_table();

// convkit._C's side (cpu_kernels.cpp). install_cpu_kernels checks a table (layout, every slot
// filled), keeps it and makes it the one the ops call; a table installed before is kept for
// cpu_cache_bytes and empty_cpu_cache. Thread-safe: a call already running finishes on the
// table it started with.
void install_cpu_kernels(const CpuKernelTable* table);
// The capability whose kernels the CPU ops run, or "" before any is installed.
std::string cpu_capability();
// Whether this CPU (and its OS, which must save the wider registers) runs `capability`'s
// instructions: avx512 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), avx2 = x86-64-v3 (AVX2, FMA, BMI2,
// F16C), default = the baseline of the build's target. An unknown name is an error.
bool cpu_supports(c10::string_view capability);

// The ops of convkit.cpp that report the kernels' state: the active table's conv2d_cpu_plan;
// the largest column buffer of the kernel modules' and this module's (the CUDA ones); the
// block caches of all installed modules (each has its own).
std::tuple<std::string, std::string, std::string> active_conv2d_cpu_plan(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 2> gradient_mask);
std::vector<int64_t> active_conv2d_cpu_thread_images(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
int64_t peak_column_buffer_bytes(bool reset);
int64_t all_cpu_cache_bytes();
void empty_all_cpu_caches();

}  // namespace convkit
