// The scheduler of the CUDA emulation: launches checked like the device checks them, blocks run
// one after another, the threads of a block as cooperative fibers; block and warp barriers
// (strict: every thread of the block / every lane of the mask, at the same barrier), and the
// report of a barrier that can never complete.
//
// Whenever the running thread waits (or ends), the schedule picks the next ready thread: forward,
// the lowest thread index; reverse, the highest; random, any (seeded). Picking the lowest (or
// highest) every time lets a warp whose warp-level barrier completes run ahead of the other warps
// up to the next block barrier, and the first (last) thread read what the others have not
// written yet: a missing __syncthreads() on either side of a shared-memory access shows.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "fiber.h"
#include "kfac_emulation/launch.h"
#include "state.h"

namespace kfac_kernels {
namespace emulation {
namespace {

constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr size_t kArenaBytes = 320 * 1024;  // dynamic + static shared memory of one block
constexpr unsigned kMaxThreads = 1024;

enum class State : uint8_t { kReady, kBlockWait, kWarpWait, kDone };

struct Thread {
  FiberContext ctx;
  uint3 idx{0, 0, 0};
  int linear = 0;
  State state = State::kReady;
  const char* wait_file = nullptr;
  int wait_line = 0;
  WarpOp wait_op = WarpOp::kSync;
  uint64_t result = 0;
};

// The lanes of one warp that wait at one warp operation (one group per mask).
struct WarpGroup {
  unsigned mask = 0;
  unsigned arrived = 0;
  WarpOp op = WarpOp::kSync;
  const char* file = nullptr;
  int line = 0;
  int width = 32;
  bool conflict = false;
  uint64_t value[32] = {};
  int param[32] = {};
};

struct Block {
  const LaunchSpec* spec = nullptr;
  const Settings* settings = nullptr;
  uint3 index{0, 0, 0};
  int n = 0;
  int done = 0;
  std::vector<Thread> threads;
  std::vector<std::vector<WarpGroup>> warps;  // per warp, reused from block to block
  // the schedule: bit r of `ready` is set while the thread of rank r may run (forward: rank =
  // linear id; reverse: n - 1 - linear id; random: the rank does not matter)
  Schedule schedule = Schedule::kForward;
  std::vector<uint64_t> ready;
  uint64_t* rng = nullptr;
  // the block barrier being gathered
  int arrived = 0;
  const char* file = nullptr;
  int line = 0;
  BlockReduce op = BlockReduce::kNone;
  bool conflict = false;
  int acc = 0;
  // shared memory
  unsigned char* arena = nullptr;
  size_t dynamic_bytes = 0;
  size_t static_end = 0;
  size_t static_bytes = 0;
  std::vector<std::pair<const void*, void*>> statics;
  // the first fault of a thread
  std::string fault;
};

thread_local Block* g_block = nullptr;
thread_local Thread* g_thread = nullptr;
thread_local FiberContext g_scheduler;

struct FreeDeleter {
  void operator()(unsigned char* p) const { std::free(p); }
};

struct Resources {
  std::vector<std::unique_ptr<FiberStack>> stacks;
  // page-aligned, so an alignment asked of a shared variable holds for its address
  std::unique_ptr<unsigned char, FreeDeleter> arena;
  size_t arena_dirty = 0;  // bytes of the arena the previous block may have written
};
thread_local Resources g_resources;

bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && std::strcmp(f1, f2) == 0));
}

bool ends_with(const char* s, const std::string& suffix) {
  const size_t n = std::strlen(s);
  return n >= suffix.size() && std::strcmp(s + n - suffix.size(), suffix.c_str()) == 0;
}

int rank_of(const Block& b, int linear) {  // also the linear id of a rank
  return b.schedule == Schedule::kReverse ? b.n - 1 - linear : linear;
}

void make_ready(Block& b, Thread& t) {
  t.state = State::kReady;
  const int r = rank_of(b, t.linear);
  b.ready[static_cast<size_t>(r >> 6)] |= uint64_t{1} << (r & 63);
}

uint64_t next_random(uint64_t& s);

// The thread the schedule resumes next (taken off the ready set), or null when none is ready.
Thread* next_ready(Block& b) {
  const size_t words = b.ready.size();
  size_t w = 0;
  int bit = -1;
  if (b.schedule == Schedule::kRandom) {
    int total = 0;
    for (uint64_t v : b.ready) total += __builtin_popcountll(v);
    if (total == 0) return nullptr;
    int k = static_cast<int>(next_random(*b.rng) % static_cast<uint64_t>(total));
    for (w = 0; w < words; ++w) {
      const int c = __builtin_popcountll(b.ready[w]);
      if (k < c) break;
      k -= c;
    }
    uint64_t v = b.ready[w];
    for (; k > 0; --k) v &= v - 1;  // drop the k lowest set bits
    bit = __builtin_ctzll(v);
  } else {
    while (w < words && b.ready[w] == 0) ++w;
    if (w == words) return nullptr;
    bit = __builtin_ctzll(b.ready[w]);
  }
  b.ready[w] &= ~(uint64_t{1} << bit);
  return &b.threads[static_cast<size_t>(rank_of(b, static_cast<int>(w * 64) + bit))];
}

// The running thread stops (it waits, or has finished): resume the next ready thread directly,
// or the scheduler when there is none (the block is finished, or deadlocked).
void yield_to_next() {
  Thread* self = g_thread;
  Thread* next = next_ready(*g_block);
  if (next == nullptr) {
    switch_fiber(self->ctx, g_scheduler);
    return;
  }
  g_thread = next;
  threadIdx = next->idx;
  switch_fiber(self->ctx, next->ctx);
}

[[noreturn]] void fiber_main(void* arg) {
  auto* t = static_cast<Thread*>(arg);
  g_block->spec->run_thread(g_block->spec->args);
  t->state = State::kDone;
  ++g_block->done;
  yield_to_next();
  std::abort();  // a finished fiber is never resumed
}

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    default: return "wmma *_sync";
  }
}

std::string dim_text(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}
std::string dim_text(dim3 v) { return dim_text(uint3{v.x, v.y, v.z}); }

std::string launch_text(const LaunchSpec& s) {
  return std::string("kernel ") + s.kernel_name + " (launched at " + s.file + ":" +
         std::to_string(s.line) + ")";
}

void record_fault(const std::string& what) {
  Block& b = *g_block;
  if (!b.fault.empty()) return;
  b.fault = what;
  if (g_thread) b.fault += ", thread " + dim_text(g_thread->idx);
}

// Lanes that exist in warp w of a block of n threads.
unsigned lanes_of(int n, int w) {
  const int count = std::min(32, n - 32 * w);
  return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

void complete_warp_group(Block& b, int w, WarpGroup& g) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(g.mask >> lane & 1u)) continue;
    const int width = g.width;
    const int base = lane & ~(width - 1);
    int src = lane;
    uint64_t result = g.value[lane];
    switch (g.op) {
      case WarpOp::kShflIdx:
        src = base + (g.param[lane] & (width - 1));
        break;
      case WarpOp::kShflUp:
        src = (lane - base) >= g.param[lane] ? lane - g.param[lane] : lane;
        break;
      case WarpOp::kShflDown:
        src = (lane - base) + g.param[lane] < width ? lane + g.param[lane] : lane;
        break;
      case WarpOp::kShflXor:
        src = lane ^ g.param[lane];
        if (src < 0 || src >= 32 || (src & ~(width - 1)) != base) src = lane;
        break;
      case WarpOp::kBallot:
      case WarpOp::kAny:
      case WarpOp::kAll: {
        uint64_t ballot = 0;
        for (int l = 0; l < 32; ++l)
          if ((g.mask >> l & 1u) && g.value[l]) ballot |= uint64_t{1} << l;
        result = g.op == WarpOp::kBallot ? ballot
                 : g.op == WarpOp::kAny  ? (ballot != 0)
                                         : (ballot == g.mask);
        break;
      }
      default:
        result = 0;
        break;
    }
    if (g.op == WarpOp::kShflIdx || g.op == WarpOp::kShflUp || g.op == WarpOp::kShflDown ||
        g.op == WarpOp::kShflXor) {
      if (!(g.mask >> src & 1u)) {
        Thread* saved = g_thread;
        g_thread = &b.threads[32 * w + lane];
        record_fault(std::string(warp_op_name(g.op)) + " at " + g.file + ":" +
                     std::to_string(g.line) + " reads lane " + std::to_string(src) +
                     ", which is not in the mask");
        g_thread = saved;
      }
      result = g.value[src];
    }
    Thread& t = b.threads[32 * w + lane];
    t.result = result;
    make_ready(b, t);
  }
  g.arrived = 0;
  g.mask = 0;
}

// Why the threads of the block cannot go on: who waits where, who has exited.
std::string deadlock_report(const Block& b) {
  struct Group {
    int count = 0;
    int first = -1, last = -1;
  };
  std::map<std::string, Group> groups;
  for (const Thread& t : b.threads) {
    std::string key;
    if (t.state == State::kDone) {
      key = "exited";
    } else if (t.state == State::kBlockWait) {
      key = std::string("wait at __syncthreads() ") + t.wait_file + ":" +
            std::to_string(t.wait_line);
    } else if (t.state == State::kWarpWait) {
      key = std::string("wait at ") + warp_op_name(t.wait_op) + " " + t.wait_file + ":" +
            std::to_string(t.wait_line) + " (warp " + std::to_string(t.linear / 32) + ")";
    } else {
      key = "ready";
    }
    Group& g = groups[key];
    ++g.count;
    if (g.first < 0) g.first = t.linear;
    g.last = t.linear;
  }
  std::string out;
  for (const auto& [key, g] : groups) {
    out += "\n    " + std::to_string(g.count) + " thread(s) " + key + " (linear ids " +
           std::to_string(g.first) + (g.first == g.last ? "" : ".." + std::to_string(g.last)) +
           ")";
  }
  return out;
}

FiberStack& stack(size_t i) {
  auto& stacks = g_resources.stacks;
  while (stacks.size() <= i) stacks.push_back(std::make_unique<FiberStack>(kFiberStackBytes));
  return *stacks[i];
}

uint64_t next_random(uint64_t& s) {  // splitmix64
  s += 0x9e3779b97f4a7c15ULL;
  uint64_t z = s;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename V>
void shuffle(V& v, uint64_t& s) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(s) % i]);
}

// Runs one block to its end. Returns false (with the message in `error`) on a deadlock or fault.
bool run_block(Block& b, uint64_t& rng, std::string& error) {
  const LaunchSpec& spec = *b.spec;
  const dim3 bd = spec.block;
  b.n = static_cast<int>(bd.x * bd.y * bd.z);
  b.threads.assign(static_cast<size_t>(b.n), Thread{});
  b.warps.resize(static_cast<size_t>((b.n + 31) / 32));
  for (auto& groups : b.warps)
    for (WarpGroup& g : groups) g.arrived = 0;
  b.done = 0;
  b.arrived = 0;
  b.conflict = false;
  b.static_end = b.dynamic_bytes;
  b.static_bytes = 0;
  b.statics.clear();
  b.fault.clear();
  // fresh shared memory: 0xff bytes
  const size_t dirty = std::max(g_resources.arena_dirty, b.dynamic_bytes);
  std::memset(b.arena, 0xff, std::min(dirty, kArenaBytes));
  for (int i = 0; i < b.n; ++i) {
    Thread& t = b.threads[static_cast<size_t>(i)];
    t.linear = i;
    t.idx = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    // stack tops staggered by 17 cache lines over 32 KB (see make_fiber)
    make_fiber(t.ctx, stack(static_cast<size_t>(i)), (static_cast<size_t>(i) * 1088) % 32768,
               &fiber_main, &t);
  }
  blockIdx = b.index;
  b.schedule = b.settings->schedule;
  b.rng = &rng;
  b.ready.assign(static_cast<size_t>((b.n + 63) / 64), 0);
  for (Thread& t : b.threads) make_ready(b, t);
  g_block = &b;
  bool ok = true;
  while (b.done < b.n) {
    Thread* next = next_ready(b);
    if (next == nullptr) {
      error = "deadlock in " + launch_text(spec) + ", block " + dim_text(b.index) +
              ": a barrier can never complete" + deadlock_report(b);
      ok = false;
      break;
    }
    g_thread = next;
    threadIdx = next->idx;
    switch_fiber(g_scheduler, next->ctx);
  }
  g_thread = nullptr;
  g_resources.arena_dirty = b.static_end;
  if (ok && !b.fault.empty()) {
    error = "fault in " + launch_text(spec) + ", block " + dim_text(b.index) + ": " + b.fault;
    ok = false;
  }
  g_block = nullptr;
  return ok;
}

// ---- invalid memory accesses: name the kernel before the process dies -------------------------

void on_fault(int sig, siginfo_t* info, void*) {
  const Block* b = g_block;
  if (b != nullptr && b->spec != nullptr) {
    char msg[1024];
    const Thread* t = g_thread;
    const int len = std::snprintf(
        msg, sizeof msg,
        "CUDA emulation: invalid memory access at %p in kernel %s (launched at %s:%d), block "
        "(%u, %u, %u), thread (%u, %u, %u)\n",
        info ? info->si_addr : nullptr, b->spec->kernel_name, b->spec->file, b->spec->line,
        b->index.x, b->index.y, b->index.z, t ? t->idx.x : 0u, t ? t->idx.y : 0u,
        t ? t->idx.z : 0u);
    if (len > 0) {
      const ssize_t unused = write(2, msg, static_cast<size_t>(std::min<int>(len, sizeof msg - 1)));
      (void)unused;
    }
  }
  signal(sig, SIG_DFL);  // returning re-executes the access, which now terminates the process
}

void install_fault_handler() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  static std::vector<char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

// The device's checks of a launch configuration; empty when it may run.
std::string check_configuration(const LaunchSpec& s, cudaError_t& code) {
  const dim3 b = s.block, g = s.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  code = cudaErrorInvalidConfiguration;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0)
    return "a block or grid dimension is 0: block " + dim_text(b) + ", grid " + dim_text(g);
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > kMaxThreads)
    return "block " + dim_text(b) + " exceeds 1024 threads (x, y <= 1024, z <= 64)";
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return "grid " + dim_text(g) + " exceeds the limits (x < 2^31, y, z <= 65535)";
  const DeviceLimits& lim = device_limits();
  code = cudaErrorInvalidValue;
  if (s.dynamic_shared_bytes > lim.shared_per_block_optin)
    return std::to_string(s.dynamic_shared_bytes) + " bytes of dynamic shared memory exceed the " +
           std::to_string(lim.shared_per_block_optin) + " of a block on " + lim.name;
  if (s.dynamic_shared_bytes > lim.static_shared_per_block) {
    const int attr = max_dynamic_shared_attribute(s.kernel);
    if (static_cast<size_t>(attr) < s.dynamic_shared_bytes)
      return std::to_string(s.dynamic_shared_bytes) +
             " bytes of dynamic shared memory need cudaFuncSetAttribute("
             "cudaFuncAttributeMaxDynamicSharedMemorySize) >= that (set: " +
             std::to_string(attr) + ")";
  }
  code = cudaSuccess;
  return {};
}

}  // namespace

// ---- called by kernels (from a fiber) ---------------------------------------------------------

int block_barrier(BlockReduce op, int value, const char* file, int line) {
  Block& b = *g_block;
  Thread& t = *g_thread;
  const Settings& cfg = *b.settings;
  if (op == BlockReduce::kNone && line == cfg.skip_barrier_line &&
      !cfg.skip_barrier_file.empty() && ends_with(file, cfg.skip_barrier_file))
    return 0;
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
    b.op = op;
    b.conflict = false;
    b.acc = op == BlockReduce::kAnd ? 1 : 0;
  } else if (!same_site(b.file, b.line, file, line) || b.op != op) {
    b.conflict = true;
  }
  ++b.arrived;
  switch (op) {
    case BlockReduce::kOr: b.acc |= value; break;
    case BlockReduce::kAnd: b.acc &= value; break;
    case BlockReduce::kCount: b.acc += value; break;
    default: break;
  }
  t.state = State::kBlockWait;
  t.wait_file = file;
  t.wait_line = line;
  if (b.arrived == b.n && !b.conflict) {
    for (Thread& u : b.threads) {
      u.result = static_cast<uint64_t>(b.acc);
      make_ready(b, u);
    }
    b.arrived = 0;
  }
  yield_to_next();
  return static_cast<int>(t.result);
}

uint64_t warp_operation(WarpOp op, unsigned mask, uint64_t value, int param, int width,
                        const char* file, int line) {
  Block& b = *g_block;
  Thread& t = *g_thread;
  const int w = t.linear / 32, lane = t.linear % 32;
  const unsigned lanes = lanes_of(b.n, w);
  if (!(mask >> lane & 1u) || (mask & ~lanes) || width < 1 || width > 32 ||
      (width & (width - 1)) != 0) {
    const std::string where = std::string(warp_op_name(op)) + " at " + file + ":" +
                              std::to_string(line);
    if (!(mask >> lane & 1u))
      record_fault(where + ": the calling lane " + std::to_string(lane) + " is not in the mask");
    else if (mask & ~lanes)
      record_fault(where + ": the mask names lanes that do not exist in this warp");
    else
      record_fault(where + ": width " + std::to_string(width) + " is not a power of 2 <= 32");
    return value;
  }
  auto& groups = b.warps[static_cast<size_t>(w)];
  WarpGroup* g = nullptr;
  for (WarpGroup& cand : groups) {
    if (cand.arrived == 0) continue;
    if (cand.mask == mask) {
      g = &cand;
    } else if (cand.mask & mask) {
      cand.conflict = true;  // overlapping masks at the same time: never completes
    }
  }
  if (g == nullptr) {
    for (WarpGroup& cand : groups)
      if (cand.arrived == 0) g = &cand;
    if (g == nullptr) {
      groups.emplace_back();
      g = &groups.back();
    }
    g->mask = mask;
    g->op = op;
    g->file = file;
    g->line = line;
    g->width = width;
    g->conflict = false;
  } else if (g->op != op || g->width != width || !same_site(g->file, g->line, file, line)) {
    g->conflict = true;
  }
  g->value[lane] = value;
  g->param[lane] = param;
  g->arrived |= 1u << lane;
  t.state = State::kWarpWait;
  t.wait_file = file;
  t.wait_line = line;
  t.wait_op = op;
  if (g->arrived == g->mask && !g->conflict) complete_warp_group(b, w, *g);
  yield_to_next();
  return t.result;
}

unsigned active_lanes() {
  const Block& b = *g_block;
  const int w = g_thread->linear / 32;
  unsigned out = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int i = 32 * w + lane;
    if (i < b.n && b.threads[static_cast<size_t>(i)].state != State::kDone) out |= 1u << lane;
  }
  return out;
}

void kernel_fault(const char* file, int line, const char* what) {
  record_fault(std::string(what) + " at " + file + ":" + std::to_string(line));
}

void* dynamic_shared_memory() { return g_block->arena; }

void* static_shared_memory(const void* declaration, size_t bytes, size_t align) {
  Block& b = *g_block;
  for (const auto& [decl, ptr] : b.statics)
    if (decl == declaration) return ptr;
  const size_t offset = (b.static_end + align - 1) / align * align;
  if (offset + bytes > kArenaBytes) {
    std::fprintf(stderr, "CUDA emulation: %s uses more shared memory than any device has\n",
                 launch_text(*b.spec).c_str());
    std::abort();
  }
  b.static_end = offset + bytes;
  b.static_bytes += bytes;
  const DeviceLimits& lim = device_limits();
  if (b.static_bytes > lim.static_shared_per_block)
    record_fault(std::to_string(b.static_bytes) + " bytes of static shared memory exceed " +
                 std::to_string(lim.static_shared_per_block));
  else if (b.static_bytes + b.dynamic_bytes > lim.shared_per_block_optin)
    record_fault(std::to_string(b.static_bytes) + " bytes of static and " +
                 std::to_string(b.dynamic_bytes) + " of dynamic shared memory exceed the " +
                 std::to_string(lim.shared_per_block_optin) + " of a block on " + lim.name);
  void* ptr = b.arena + offset;
  b.statics.emplace_back(declaration, ptr);
  return ptr;
}

std::string kernel_name_from_signature(const char* pretty, const char* fallback) {
  // GCC: "... [with auto Kernel = ns::{anonymous}::k<float, true>; ...]"
  // Clang: "... [Kernel = &ns::(anonymous namespace)::k<float, true>, ...]"
  const char* p = std::strstr(pretty, "Kernel = ");
  if (p == nullptr) return fallback;
  p += std::strlen("Kernel = ");
  if (*p == '&') ++p;
  std::string out;
  int depth = 0;
  for (; *p; ++p) {
    const char c = *p;
    if (c == '<' || c == '(' || c == '{') ++depth;
    if (c == '>' || c == ')' || c == '}') --depth;
    if (depth < 0 || (depth == 0 && (c == ';' || c == ',' || c == ']'))) break;
    out += c;
  }
  for (const char* anon : {"{anonymous}::", "(anonymous namespace)::"}) {
    for (size_t at; (at = out.find(anon)) != std::string::npos;) out.erase(at, std::strlen(anon));
  }
  return out.empty() ? std::string(fallback) : out;
}

void execute(const LaunchSpec& spec) {
  announce();
  install_fault_handler();
  if (sticky_error() != cudaSuccess) return;
  if (g_block != nullptr) {
    std::fprintf(stderr, "CUDA emulation: %s launched from inside a kernel (not supported)\n",
                 launch_text(spec).c_str());
    std::abort();
  }
  cudaError_t code = cudaSuccess;
  const std::string bad = check_configuration(spec, code);
  if (!bad.empty()) {
    std::fprintf(stderr, "CUDA emulation: launch of %s failed: %s\n", launch_text(spec).c_str(),
                 bad.c_str());
    set_launch_error(code);
    return;
  }
  if (!g_resources.arena) {
    g_resources.arena.reset(static_cast<unsigned char*>(std::aligned_alloc(4096, kArenaBytes)));
    std::memset(g_resources.arena.get(), 0xff, kArenaBytes);
    g_resources.arena_dirty = 0;
  }
  Block b;
  b.spec = &spec;
  b.settings = &settings();
  b.arena = g_resources.arena.get();
  b.dynamic_bytes = spec.dynamic_shared_bytes;
  blockDim = spec.block;
  gridDim = spec.grid;
  const uint64_t gx = spec.grid.x, gy = spec.grid.y, gz = spec.grid.z;
  const uint64_t blocks = gx * gy * gz;
  const Schedule schedule = settings().schedule;
  uint64_t rng = settings().seed * 0x9e3779b97f4a7c15ULL + 12345;
  // Random schedule: blocks in a random order too (for grids of up to 2^22 blocks; larger ones
  // from a random start, wrapping around).
  std::vector<uint32_t> perm;
  uint64_t start = 0;
  if (schedule == Schedule::kRandom) {
    if (blocks <= (uint64_t{1} << 22)) {
      perm.resize(static_cast<size_t>(blocks));
      std::iota(perm.begin(), perm.end(), 0u);
      shuffle(perm, rng);
    } else {
      start = next_random(rng) % blocks;
    }
  }
  for (uint64_t k = 0; k < blocks; ++k) {
    uint64_t id = k;
    if (schedule == Schedule::kReverse) id = blocks - 1 - k;
    if (schedule == Schedule::kRandom) id = perm.empty() ? (start + k) % blocks : perm[k];
    b.index = uint3{static_cast<unsigned>(id % gx), static_cast<unsigned>((id / gx) % gy),
                    static_cast<unsigned>(id / (gx * gy))};
    std::string error;
    if (!run_block(b, rng, error)) {
      std::fprintf(stderr, "CUDA emulation: %s\n", error.c_str());
      set_sticky_error(cudaErrorLaunchFailure);
      return;
    }
  }
}

}  // namespace emulation
}  // namespace kfac_kernels
