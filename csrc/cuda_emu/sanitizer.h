// Whether this translation unit is built with AddressSanitizer (gcc says so with
// __SANITIZE_ADDRESS__, clang with __has_feature): the fibers and the guard bytes then tell it
// about stack switches and poisoned memory.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define CONVKIT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CONVKIT_EMU_ASAN 1
#endif
#endif

#if defined(CONVKIT_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
