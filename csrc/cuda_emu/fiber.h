// Fibers for the CUDA emulator: one per emulated GPU thread of a block, each with its own
// stack, switched cooperatively on one OS thread. A fiber runs until its thread reaches a
// barrier, a warp collective or the end of the kernel, then switches back to the scheduler.
//
// The switch saves only what the calling convention says a callee must preserve (on x86-64:
// rbx, rbp, r12-r15, the stack pointer, MXCSR and the x87 control word), so it costs a few
// nanoseconds: emulated blocks have hundreds of threads and the test suite launches thousands
// of blocks. Elsewhere the switch is POSIX ucontext (getcontext/makecontext/swapcontext),
// slower (a signal-mask system call per switch) but portable; CONVKIT_EMU_UCONTEXT=1 selects it
// on x86-64 too, so that path is tested here.
//
// Stacks are mmap'd with a PROT_NONE guard page below them: a kernel that overflows its stack
// crashes at once instead of overwriting a neighbour's. Under AddressSanitizer every switch is
// announced to it (__sanitizer_start/finish_switch_fiber), as its documentation asks.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && !defined(CONVKIT_EMU_UCONTEXT)
#define CONVKIT_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace convkit::cuda_emu {

class Fiber {
 public:
  using Entry = void (*)();

  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber();

  // The context of the OS thread itself (the scheduler's): it has no stack of its own here.
  static Fiber& for_this_thread();

  // Makes the fiber start `entry` (which must never return: it switches away for good) on its
  // own stack of `stack_bytes` at the next switch to it. Reuses the stack when large enough.
  void start(Entry entry, size_t stack_bytes);

  // Saves the current context into `from` and resumes `to`; returns when something switches
  // back to `from`.
  static void switch_to(Fiber& from, Fiber& to);

  // The first call of every fiber's entry function, before anything else: completes the
  // switch that started it (AddressSanitizer's bookkeeping; nothing otherwise).
  static void entered();

 private:
  void allocate_stack(size_t stack_bytes);

  unsigned char* mapping_ = nullptr;  // guard page + stack
  size_t mapping_bytes_ = 0;
  unsigned char* stack_bottom_ = nullptr;
  size_t stack_bytes_ = 0;
#if defined(CONVKIT_EMU_ASM_SWITCH)
  void* stack_pointer_ = nullptr;
#else
  ucontext_t context_{};
#endif
};

}  // namespace convkit::cuda_emu
