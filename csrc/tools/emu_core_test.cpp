// The CUDA emulator's core (fibers, scheduler, shared memory, warp collectives) tested without
// torch: a few kernels whose results are known, and a few bugs it must catch. CMakeLists.txt
// builds it twice: as the library is built, and with the portable context switch (ucontext)
// and the emulator's own vector types (no CUDA headers), so both paths are exercised.
//   usage: convkit_emu_core_test      (exit status 0 when every check passes)
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda_emu/emulator.h"

namespace {

using convkit::cuda_emu::launch;
using convkit::cuda_emu::SharedArray;

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what.c_str());
    ++failures;
  }
}

// Runs `body`, which must throw an emulator error containing `fragment`.
void check_caught(const std::function<void()>& body, const std::string& fragment) {
  try {
    body();
  } catch (const std::exception& error) {
    check(std::string(error.what()).find(fragment) != std::string::npos,
          "expected '" + fragment + "', got: " + error.what());
    return;
  }
  check(false, "not caught: " + fragment);
}

// A grid-stride sum: per-thread sums, a shuffle reduction per warp, the warps' sums through
// shared memory.
__global__ void sum_kernel(const float* x, int64_t n, float* partial) {
  __shared__ SharedArray<float, 32> warp_sums;
  float sum = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    sum += x[i];
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

// Reads a neighbour's slot with no barrier after the writes.
__global__ void racy_kernel(float* out) {
  __shared__ SharedArray<float, 64> tile;
  tile[threadIdx.x] = 1.0f;
  out[threadIdx.x] = tile[(threadIdx.x + 1) % 64];
}

__global__ void vector_kernel(const float* x, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(x + 4 * threadIdx.x);
  const float2 w = make_float2(v.x + v.y, v.z + v.w);
  out[threadIdx.x] = w.x + w.y + static_cast<float>(__ballot_sync(0xffffffffu, 1) == ~0u);
}

__global__ void exit_early_kernel(float* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

}  // namespace

int main() {
  const int64_t n = 100000;
  std::vector<float> x(n, 0.5f);
  std::vector<float> partial(64, -1.0f);
  for (uint64_t seed = 0; seed < 3; ++seed) {
    convkit::cuda_emu::set_seed(seed);
    launch<sum_kernel>(dim3(64), dim3(256), 0, x.data(), n, partial.data());
    double total = 0;
    for (float p : partial) total += p;
    check(total == 0.5 * n, "sum_kernel with seed " + std::to_string(seed));
  }
  std::vector<float> out(64);
  check_caught([&] { launch<racy_kernel>(dim3(1), dim3(64), 0, out.data()); },
               "no thread of this block has written");
  alignas(16) float values[128];
  for (int i = 0; i < 128; ++i) values[i] = 1.0f;
  launch<vector_kernel>(dim3(1), dim3(32), 0, values, out.data());
  for (int t = 0; t < 32; ++t) check(out[t] == 5.0f, "vector_kernel lane " + std::to_string(t));
  check_caught([&] { launch<exit_early_kernel>(dim3(1), dim3(32), 0, out.data()); },
               "every lane named in the mask must reach the collective");
  check_caught([&] { launch<sum_kernel>(dim3(1, 65536), dim3(32), 0, x.data(), n, out.data()); },
               "gridDim.y is at most 65535");
  check(convkit::cuda_emu::launches_run() == 6, "launches that ran (the refused one does not count)");
  std::printf("%s: %s\n", CONVKIT_EMU_HAS_CUDA_HEADERS ? "CUDA headers" : "own vector types",
              failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
