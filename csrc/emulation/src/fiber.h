// Cooperative fibers of the CUDA emulation: one per CUDA thread of the block being run, each with
// its own stack; a fiber runs until it waits at a barrier (or finishes) and then switches back to
// the scheduler or the next fiber. On x86-64 the switch is a few instructions of assembly (the
// callee-saved registers and the stack pointer); elsewhere it falls back to ucontext, which is
// correct but slower (a signal-mask system call per switch).
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace kfac_kernels {
namespace emulation {

struct FiberContext {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// A fiber stack: mapped once with a guard page below it (an overflow faults instead of
// corrupting a neighbour) and reused for every block.
class FiberStack {
 public:
  explicit FiberStack(size_t bytes);
  ~FiberStack();
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  char* base() const { return base_; }  // lowest usable address
  size_t size() const { return size_; }

 private:
  char* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  char* base_ = nullptr;
  size_t size_ = 0;
};

// Prepares `ctx` so that switching to it calls entry(arg) on `stack`, whose top is lowered by
// `offset` bytes: fibers given different offsets do not put their hot frames at addresses that
// compete for the same cache sets (stacks are a power of two apart). entry must never return (it
// switches away for the last time instead).
void make_fiber(FiberContext& ctx, FiberStack& stack, size_t offset, void (*entry)(void*),
                void* arg);

// Saves the running context into `from` and resumes `to`.
void switch_fiber(FiberContext& from, FiberContext& to);

}  // namespace emulation
}  // namespace kfac_kernels
