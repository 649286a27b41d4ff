// Fiber stacks and context switches of the CUDA emulation (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace kfac_kernels {
namespace emulation {

FiberStack::FiberStack(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_ = (bytes + page - 1) / page * page;
  mapping_size_ = size_ + page;
  void* m = mmap(nullptr, mapping_size_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "CUDA emulation: cannot map a fiber stack of %zu bytes\n", bytes);
    std::abort();
  }
  mapping_ = static_cast<char*>(m);
  mprotect(mapping_, page, PROT_NONE);  // guard page: stacks grow down into it
  base_ = mapping_ + page;
}

FiberStack::~FiberStack() {
  if (mapping_) munmap(mapping_, mapping_size_);
}

#if defined(__x86_64__)

extern "C" void kfac_emulation_switch(void** save_sp, void* new_sp);
extern "C" void kfac_emulation_trampoline();

// System V x86-64: rbx, rbp and r12-r15 are callee-saved. (So are the MXCSR and the x87 control
// word, but nothing in the emulation changes rounding modes, so every fiber shares the thread's.)
// A fresh fiber's first switch "returns" into the trampoline with entry in r13 and its argument
// in r12.
asm(R"(
  .text
  .globl kfac_emulation_switch
  .type kfac_emulation_switch,@function
kfac_emulation_switch:
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
  .size kfac_emulation_switch, .-kfac_emulation_switch

  .globl kfac_emulation_trampoline
  .type kfac_emulation_trampoline,@function
kfac_emulation_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size kfac_emulation_trampoline, .-kfac_emulation_trampoline
)");

void make_fiber(FiberContext& ctx, FiberStack& stack, size_t offset, void (*entry)(void*),
                void* arg) {
  uintptr_t top =
      reinterpret_cast<uintptr_t>(stack.base() + stack.size() - offset) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top) - 2;  // return address of the first switch
  slot[0] = reinterpret_cast<uint64_t>(&kfac_emulation_trampoline);
  slot[-1] = 0;                                    // rbp
  slot[-2] = 0;                                    // rbx
  slot[-3] = reinterpret_cast<uint64_t>(arg);      // r12
  slot[-4] = reinterpret_cast<uint64_t>(entry);    // r13
  slot[-5] = 0;                                    // r14
  slot[-6] = 0;                                    // r15
  ctx.sp = slot - 6;
}

void switch_fiber(FiberContext& from, FiberContext& to) { kfac_emulation_switch(&from.sp, to.sp); }

#else

namespace {
void ucontext_entry(unsigned hi_entry, unsigned lo_entry, unsigned hi_arg, unsigned lo_arg) {
  const auto entry = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(hi_entry) << 32) |
                                                       lo_entry);
  void* arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi_arg) << 32) | lo_arg);
  entry(arg);
  std::abort();  // entry never returns
}
}  // namespace

void make_fiber(FiberContext& ctx, FiberStack& stack, size_t offset, void (*entry)(void*),
                void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack.base();
  ctx.uc.uc_stack.ss_size = stack.size() - offset;
  ctx.uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uintptr_t>(entry);
  const auto a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4,
              static_cast<unsigned>(static_cast<uint64_t>(e) >> 32), static_cast<unsigned>(e),
              static_cast<unsigned>(static_cast<uint64_t>(a) >> 32), static_cast<unsigned>(a));
}

void switch_fiber(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

#endif

}  // namespace emulation
}  // namespace kfac_kernels
