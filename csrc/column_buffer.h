// The im2col column buffer, shared by the CPU and CUDA conv drivers: its size bound and the
// chunk of images that fits in it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "checks.h"
#include "config.h"  // column_budget_bytes
#include "conv2d.h"

namespace convkit {

// Images per chunk: as many as fit the column budget, at least one.
inline int64_t images_per_chunk(const Conv2dGeometry& g, int64_t element_size) {
  const int64_t bytes_per_image = g.column_rows() * g.out_area() * element_size;
  const int64_t fit = column_budget_bytes() / std::max<int64_t>(bytes_per_image, 1);
  return std::max<int64_t>(1, std::min<int64_t>(fit, g.batch));
}

// The largest column buffer (all threads' tiles together on the CPU, one chunk's on CUDA) of
// any conv call since the last reset: the memory CONVKIT_COLUMN_BUDGET_MB bounds, reported by
// the op column_buffer_peak_bytes and the benchmark.
inline std::atomic<int64_t> column_buffer_peak{0};

inline void record_column_buffer(int64_t bytes) {
  int64_t seen = column_buffer_peak.load();
  while (bytes > seen && !column_buffer_peak.compare_exchange_weak(seen, bytes)) {
  }
}

inline int64_t column_buffer_peak_bytes(bool reset) {
  const int64_t peak = column_buffer_peak.load();
  if (reset) column_buffer_peak.store(0);
  return peak;
}

// A contiguous [rows, cols] matrix view over the start of a flat buffer.
inline at::Tensor matrix_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace convkit
