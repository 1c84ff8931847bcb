// Every environment setting convkit reads, in one place. Each is read at each use (not cached),
// so that tests and users can change it at run time, and a bad value is an error that quotes it
// and says what is expected, raised by the op that reads it.
//
//   CONVKIT_COLUMN_BUDGET_MB  bound on one conv call's column buffer (all threads' tiles
//                             together), MiB > 0; default 64
//   CONVKIT_CPU_CACHE_MB      bytes the CPU block cache may keep in free blocks, MiB >= 0
//                             (0 turns it off); default 64
//   CONVKIT_CPU_GEMM          "own" (default: our packed GEMM in the avx512 kernels, the BLAS
//                             elsewhere) or "blas"
//   CONVKIT_CPU_JUNK_FILL     "1": every tensor from the CPU block cache starts as 0xff bytes
//                             (NaN), so a kernel that reads what it did not write fails loudly
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace convkit {

constexpr int64_t kDefaultColumnBudgetBytes = int64_t(64) << 20;
constexpr int64_t kDefaultCpuCacheBytes = int64_t(64) << 20;

// The largest MiB setting accepted: 2^42 MiB (4 EiB) in bytes still fits an int64_t.
constexpr double kMaxMebibytes = 4398046511104.0;

// A size in MiB from the environment variable `name`, as bytes: `default_bytes` when it is
// unset or empty. Anything but a finite number (> 0, or >= 0 when `zero_allowed`) of at most
// 2^42 MiB is an error that quotes the value and says what is expected (`expected`, e.g. "a
// positive number of MiB").
inline int64_t mebibytes_from_environment(const char* name, int64_t default_bytes,
                                          bool zero_allowed, const char* expected) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return default_bytes;
  char* end = nullptr;
  const double mib = std::strtod(env, &end);
  TORCH_CHECK(end != env && *end == '\0' && (zero_allowed ? mib >= 0 : mib > 0) &&
                  mib <= kMaxMebibytes,
              name, " must be ", expected, " (at most 2^42), but got '", env, "'");
  return static_cast<int64_t>(mib * double(1 << 20));
}

inline int64_t column_budget_bytes() {
  return std::max<int64_t>(1, mebibytes_from_environment("CONVKIT_COLUMN_BUDGET_MB",
                                                         kDefaultColumnBudgetBytes, false,
                                                         "a positive number of MiB"));
}

inline int64_t cpu_cache_limit_bytes() {
  return mebibytes_from_environment("CONVKIT_CPU_CACHE_MB", kDefaultCpuCacheBytes, true,
                                    "a non-negative number of MiB (0 turns the CPU block cache "
                                    "off)");
}

// Whether CONVKIT_CPU_GEMM asks for our own GEMM ("own" or unset) rather than the BLAS; the
// value is checked on every host, whether or not the build has the packed GEMM.
inline bool cpu_gemm_is_own() {
  const char* env = std::getenv("CONVKIT_CPU_GEMM");
  const bool own = env == nullptr || *env == '\0' || std::strcmp(env, "own") == 0;
  TORCH_CHECK(own || std::strcmp(env, "blas") == 0,
              "CONVKIT_CPU_GEMM must be \"own\" or \"blas\", got \"", env, "\"");
  return own;
}

inline bool cpu_junk_fill() {
  const char* env = std::getenv("CONVKIT_CPU_JUNK_FILL");
  return env != nullptr && env[0] == '1' && env[1] == '\0';
}

}  // namespace convkit
