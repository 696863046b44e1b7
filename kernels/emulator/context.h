// Cooperative switching between the emulator's fibers (one per GPU thread).
//
// Switching is the emulator's innermost loop: every thread of every block
// switches in and out at each barrier and warp intrinsic. glibc's
// swapcontext makes a system call each time (to save and restore the signal
// mask), which was 85% of an emulated model's time; on x86-64 the switch is
// instead a few instructions that save what the System V ABI asks a callee
// to keep. Elsewhere (other CPUs, non-ELF systems, or with
// -DAF_EMU_UCONTEXT) it is ucontext.
#pragma once

#include <cstddef>

#if defined(__x86_64__) && defined(__ELF__) && !defined(AF_EMU_UCONTEXT)
#define AF_EMU_STACK_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace af_emu {

struct Context {
#if AF_EMU_STACK_SWITCH
  void* stack_pointer = nullptr;  // where the saved registers are
#else
  ucontext_t context;
#endif
};

// A fiber's stack: `bytes` usable, above an inaccessible guard page, so that
// an overflow faults at once instead of overwriting another fiber's stack.
class Stack {
 public:
  // An empty stack (base() is null) when the memory cannot be mapped.
  explicit Stack(size_t bytes);
  ~Stack();
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* base() const { return base_; }

 private:
  char* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  char* base_ = nullptr;
};

// Makes `context` start `entry` on the given stack at its first switch.
// `entry` must never return: it switches away for the last time instead.
void start_context(Context& context, char* stack, size_t stack_bytes, void (*entry)());

// Saves the running code's state in `from` and resumes `to`.
void switch_context(Context& from, Context& to);

}  // namespace af_emu
