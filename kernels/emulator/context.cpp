// The two implementations behind context.h.
#include "context.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

namespace af_emu {

Stack::Stack(size_t bytes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t usable = (bytes + page - 1) / page * page;
  void* mapping = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) return;
  mapping_ = static_cast<char*>(mapping);
  mapping_bytes_ = usable + page;
  // Stacks grow down: the guard is the lowest page.
  if (mprotect(mapping_, page, PROT_NONE) != 0) return;
  base_ = mapping_ + page;
}

Stack::~Stack() {
  if (mapping_) munmap(mapping_, mapping_bytes_);
}

}  // namespace af_emu

#if AF_EMU_STACK_SWITCH

// af_emu_switch_stack(save, load): pushes the callee-saved registers on the
// current stack, stores the stack pointer in *save, then loads `load`, pops
// the same from there and returns into the code that was switched away from
// (or, the first time, into the fiber's entry: see start_context). The
// floating-point control words (MXCSR, x87), also callee-saved, are left
// alone: no kernel changes rounding or exception modes, so every fiber runs
// in the launching thread's, and saving them made a switch about 8 times as
// slow.
asm(R"(
    .pushsection .text
    .globl af_emu_switch_stack
    .hidden af_emu_switch_stack
    .type af_emu_switch_stack, @function
af_emu_switch_stack:
    endbr64
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size af_emu_switch_stack, .-af_emu_switch_stack
    .popsection
)");

extern "C" void af_emu_switch_stack(void** save, void* load);

namespace af_emu {

void start_context(Context& context, char* stack, size_t stack_bytes, void (*entry)()) {
  // What af_emu_switch_stack pops, from the top of the stack down: a
  // return address for `entry` (never used), `entry` itself for the `ret`,
  // and six zeroed registers. `entry` then starts with the stack 8 bytes
  // below a 16-byte boundary, as after a call.
  auto top = (reinterpret_cast<uintptr_t>(stack) + stack_bytes) & ~uintptr_t{15};
  void** slot = reinterpret_cast<void**>(top);
  *--slot = nullptr;
  *--slot = reinterpret_cast<void*>(entry);
  for (int reg = 0; reg < 6; ++reg) *--slot = nullptr;
  context.stack_pointer = slot;
}

void switch_context(Context& from, Context& to) {
  af_emu_switch_stack(&from.stack_pointer, to.stack_pointer);
}

}  // namespace af_emu

#else

namespace af_emu {

void start_context(Context& context, char* stack, size_t stack_bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = stack_bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

}  // namespace af_emu

#endif
