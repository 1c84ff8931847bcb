// Fiber stacks and the context switch (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "sanitizer.h"

#if defined(CONVKIT_EMU_ASM_SWITCH)
// convkit_emu_switch_stack(void** save_sp, void* load_sp): pushes the callee-saved registers
// and the floating-point control state on the current stack, stores the stack pointer in
// *save_sp, loads load_sp and pops the same frame from there, returning into the other
// context. A new fiber's stack is prepared (Fiber::start) to look like such a frame whose
// return address is the fiber's entry function.
#if defined(__APPLE__)
#define CONVKIT_EMU_SYMBOL "_convkit_emu_switch_stack"
#define CONVKIT_EMU_TYPE ""
#else
#define CONVKIT_EMU_SYMBOL "convkit_emu_switch_stack"
#define CONVKIT_EMU_TYPE ".type convkit_emu_switch_stack, @function\n"
#endif
extern "C" void convkit_emu_switch_stack(void** save_sp, void* load_sp);
asm(".text\n"
    ".globl " CONVKIT_EMU_SYMBOL "\n"
    CONVKIT_EMU_TYPE
    ".p2align 4\n"
    CONVKIT_EMU_SYMBOL ":\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n");
#endif

namespace convkit::cuda_emu {
namespace {

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

#if defined(CONVKIT_EMU_ASAN)
// The stack being left, so that the one resumed can tell AddressSanitizer where it came from.
thread_local Fiber* switching_from = nullptr;
thread_local const void* thread_stack_bottom = nullptr;
thread_local size_t thread_stack_bytes = 0;
#endif

}  // namespace

Fiber& Fiber::for_this_thread() {
  thread_local Fiber thread_fiber;
  return thread_fiber;
}

Fiber::~Fiber() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
}

void Fiber::allocate_stack(size_t stack_bytes) {
  const size_t page = page_size();
  stack_bytes = (stack_bytes + page - 1) / page * page;
  if (stack_bytes_ >= stack_bytes) return;
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
  mapping_bytes_ = stack_bytes + page;
  void* mapping = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping == MAP_FAILED) {
    mapping_ = nullptr;
    stack_bytes_ = 0;
    throw std::bad_alloc();
  }
  mapping_ = static_cast<unsigned char*>(mapping);
  mprotect(mapping_, page, PROT_NONE);  // the guard page: stacks grow down into it
  stack_bottom_ = mapping_ + page;
  stack_bytes_ = stack_bytes;
}

void Fiber::start(Entry entry, size_t stack_bytes) {
  allocate_stack(stack_bytes);
#if defined(CONVKIT_EMU_ASAN)
  // The thread that last ran here ended by switching away, so its frames' redzones are still
  // poisoned: the new thread starts on a clean stack.
  ASAN_UNPOISON_MEMORY_REGION(stack_bottom_, stack_bytes_);
#endif
#if defined(CONVKIT_EMU_ASM_SWITCH)
  // The frame convkit_emu_switch_stack pops, from the lowest address up: MXCSR and the x87
  // control word, r15, r14, r13, r12, rbx, rbp, then the return address (entry) and a null
  // return address for entry itself, so that debuggers end the backtrace there. After the
  // `ret`, the stack pointer is 8 below a 16-byte boundary, as at any function's entry.
  auto* top = reinterpret_cast<uint64_t*>(
      reinterpret_cast<uintptr_t>(stack_bottom_ + stack_bytes_) & ~uintptr_t(15));
  uint64_t* sp = top - 9;
  uint32_t control_state[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(control_state[0]));
  asm volatile("fnstcw %0" : "=m"(control_state[1]));
  std::memcpy(&sp[0], control_state, sizeof(control_state));
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 .. rbp
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;
  stack_pointer_ = sp;
#else
  if (getcontext(&context_) != 0) throw std::runtime_error("getcontext failed");
  context_.uc_stack.ss_sp = stack_bottom_;
  context_.uc_stack.ss_size = stack_bytes_;
  context_.uc_link = nullptr;
  makecontext(&context_, entry, 0);
#endif
}

void Fiber::switch_to(Fiber& from, Fiber& to) {
#if defined(CONVKIT_EMU_ASAN)
  void* fake_stack = nullptr;
  const bool to_thread = to.stack_bottom_ == nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, to_thread ? thread_stack_bottom : to.stack_bottom_,
                                 to_thread ? thread_stack_bytes : to.stack_bytes_);
  switching_from = &from;
#endif
#if defined(CONVKIT_EMU_ASM_SWITCH)
  convkit_emu_switch_stack(&from.stack_pointer_, to.stack_pointer_);
#else
  swapcontext(&from.context_, &to.context_);
#endif
#if defined(CONVKIT_EMU_ASAN)
  const void* old_bottom = nullptr;
  size_t old_bytes = 0;
  __sanitizer_finish_switch_fiber(fake_stack, &old_bottom, &old_bytes);
#endif
}

// With AddressSanitizer, also learns the OS thread's own stack (the first switch away from it).
void Fiber::entered() {
#if defined(CONVKIT_EMU_ASAN)
  const void* old_bottom = nullptr;
  size_t old_bytes = 0;
  __sanitizer_finish_switch_fiber(nullptr, &old_bottom, &old_bytes);
  if (switching_from != nullptr && switching_from->stack_bottom_ == nullptr &&
      thread_stack_bottom == nullptr) {
    thread_stack_bottom = old_bottom;
    thread_stack_bytes = old_bytes;
  }
#endif
}

}  // namespace convkit::cuda_emu
