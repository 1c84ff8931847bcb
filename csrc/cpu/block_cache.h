// convkit's CPU block cache: large outputs and scratch buffers of the CPU ops come from here.
// See block_cache.cpp for why it exists and how it is bounded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace convkit {

// An uninitialised contiguous CPU tensor, as at::empty(sizes, options), whose memory comes from
// the block cache when it is large (>= 64 KiB). The tensor is an ordinary one: its storage is
// resizable and its memory goes back to the cache (or to the system) when the last reference
// to it is dropped, on whatever thread that happens.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by free blocks, ready for reuse: at most CONVKIT_CPU_CACHE_MB MiB.
int64_t cpu_cache_bytes();

// Returns every free block to the system (blocks in use are returned when they are freed).
void empty_cpu_cache();

}  // namespace convkit
