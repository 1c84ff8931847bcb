// Device memory under the CUDA emulator: CPU tensors, allocated so that two bugs a GPU would
// show (or hide) are caught on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

namespace convkit::cuda_emu {

// at::empty for the emulated CUDA ops. Every byte starts as 0xFF (NaN in every float type),
// as freshly allocated device memory holds whatever it held, so that an output element a
// kernel never writes shows up in the results. 64 guard bytes before and after the tensor
// hold a fixed pattern that is checked after every launch on this thread: a kernel writing
// past either end of a buffer the op allocated fails with an error naming it.
at::Tensor empty_device(at::IntArrayRef sizes, const at::TensorOptions& options);

// Buffers from empty_device still alive (on any thread).
int64_t guarded_buffers();

}  // namespace convkit::cuda_emu
