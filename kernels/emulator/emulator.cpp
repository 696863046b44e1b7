// Fiber scheduler behind emulator.h: runs one kernel launch on the CPU.
#include "emulator.h"

#include "context.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#if AF_EMU_RACECHECK
#include <sanitizer/tsan_interface.h>
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

// The race check (AF_EMU_RACECHECK, set by build.rs with
// AUTOFOCUS_EMU_RACECHECK=1): the kernels are compiled with
// -fsanitize=thread, this scheduler is not, so ThreadSanitizer sees the
// kernels' memory accesses only. Each emulated thread is a ThreadSanitizer
// fiber, switched without implied ordering; the order the GPU guarantees is
// declared by hand: a barrier's arrivals release and its departures acquire
// one sync object (per warp or per block, by the barrier's parity, so that a
// lane that has left barrier k and reached k + 1 cannot hand a late lane of
// k what it wrote in between); blocks and launches are ordered as a whole.
// Elsewhere these are no-ops.
namespace race {
#if AF_EMU_RACECHECK
void* current_fiber() { return __tsan_get_current_fiber(); }
void* create_fiber() { return __tsan_create_fiber(0); }
void destroy_fiber(void* fiber) { __tsan_destroy_fiber(fiber); }
void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void release(void* sync) { __tsan_release(sync); }
void acquire(void* sync) { __tsan_acquire(sync); }
#else
void* current_fiber() { return nullptr; }
void* create_fiber() { return nullptr; }
void destroy_fiber(void*) {}
void switch_to(void*) {}
void release(void*) {}
void acquire(void*) {}
#endif
// Races ThreadSanitizer has reported on this thread (its hook below): a
// report comes from the racing access, in the launch running here.
thread_local unsigned long reports = 0;
}  // namespace race

using af_emu::Context;
using af_emu::start_context;
using af_emu::switch_context;

// What a fiber is doing when it hands control back to the scheduler.
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  Context context;
  dim3 index;
  unsigned linear = 0;
  State state = State::Runnable;
  void* race_fiber = nullptr;  // its ThreadSanitizer fiber (race check only)
  unsigned warp_barriers = 0, block_barriers = 0;  // passed so far in the block
};

// Fiber stacks are generous: kernels keep small arrays in "registers".
constexpr size_t kStackBytes = 256 * 1024;

// Bytes after the launch's dynamic shared memory, set to kGuardByte at each
// block start and checked at its end: a write past the end is an error.
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuardByte = 0xA5;

struct Launch {
  void (*body)(const void*) = nullptr;
  const void* params = nullptr;
  Context scheduler;
  std::vector<Fiber> fibers;
  const std::vector<std::unique_ptr<af_emu::Stack>>* stacks = nullptr;  // a stack per fiber
  std::vector<uint64_t> warp_slots;
  std::vector<unsigned char> shared;
  Fiber* current = nullptr;
  void* race_scheduler = nullptr;  // the launching thread's own fiber
  // Race-check sync objects: two per warp, then two for the block (by
  // barrier parity), then the two that order each block after what came
  // before it (the host's writes, earlier blocks) and before what follows:
  // separate, so that a thread finishing orders nothing before a thread of
  // its own block starting.
  std::vector<uint64_t> race_syncs;
  uint64_t* warp_sync(unsigned linear, unsigned parity) {
    return &race_syncs[(linear / 32) * 2 + parity];
  }
  uint64_t* block_sync(unsigned parity) { return &race_syncs[race_syncs.size() - 4 + parity]; }
  uint64_t* block_start_sync() { return &race_syncs[race_syncs.size() - 2]; }
  uint64_t* block_end_sync() { return &race_syncs.back(); }
  // Set when a warp of fewer than 32 threads calls a full-mask warp
  // intrinsic (every kernel's mask is 0xffffffff): undefined on the GPU.
  bool partial_warp_sync = false;
  // The first misaligned vector access (kernels' load_word/load_float2),
  // and its width; null when none.
  const void* misaligned_at = nullptr;
  unsigned misaligned_bytes = 0;
};

thread_local Launch* active = nullptr;

void yield_as(State state) {
  Launch* launch = active;
  Fiber* self = launch->current;
  self->state = state;
  race::switch_to(launch->race_scheduler);
  switch_context(self->context, launch->scheduler);
}

// A fiber's first (and only) function: it runs the block's body for its
// thread, then hands control back for good.
void fiber_entry() {
  Launch* launch = active;
  race::acquire(launch->block_start_sync());
  launch->body(launch->params);
  race::release(launch->block_end_sync());
  yield_as(State::Done);
  std::abort();  // a finished fiber is never resumed
}

// The fibers' stacks, kept from launch to launch on the calling thread (and
// freed with it): allocating them per launch cost a page fault per touched
// page every time. Null when `threads` stacks cannot be mapped.
const std::vector<std::unique_ptr<af_emu::Stack>>* stacks(unsigned threads) {
  static thread_local std::vector<std::unique_ptr<af_emu::Stack>> pool;
  while (pool.size() < threads) {
    auto stack = std::make_unique<af_emu::Stack>(kStackBytes);
    if (!stack->base()) return nullptr;
    pool.push_back(std::move(stack));
  }
  return &pool;
}

// The race check's fibers, one per emulated thread, kept as the stacks are.
struct RaceFibers {
  std::vector<void*> fibers;
  ~RaceFibers() { clear(); }
  // After a block left unfinished: its fibers' call stacks are abandoned.
  void clear() {
    for (void* fiber : fibers) race::destroy_fiber(fiber);
    fibers.clear();
  }
};
thread_local RaceFibers race_fiber_pool;

const std::vector<void*>& race_fibers(unsigned threads) {
  while (race_fiber_pool.fibers.size() < threads)
    race_fiber_pool.fibers.push_back(race::create_fiber());
  return race_fiber_pool.fibers;
}

// Fisher-Yates over `order` with SplitMix64 steps from `seed`.
void shuffle(std::vector<unsigned>& order, uint64_t seed) {
  for (size_t t = order.size(); t > 1; --t) {
    seed += 0x9E3779B97F4A7C15ull;
    uint64_t z = seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::swap(order[t - 1], order[z % t]);
  }
}

// The order in which a round runs the block's fibers. The GPU promises no
// order between barriers, so neither does the emulator: by block and round
// it runs them ascending, descending or shuffled (seeded, so a rerun gives
// the same bits). A kernel whose result depends on the order (a missing
// __syncthreads or __syncwarp, two threads writing one address) then differs
// from the CPU reference in some block, where one fixed order could hide it.
void schedule(std::vector<unsigned>& order, unsigned block, unsigned round) {
  for (unsigned t = 0; t < order.size(); ++t) order[t] = t;
  switch ((block + round) % 3) {
    case 0:
      return;
    case 1:
      std::reverse(order.begin(), order.end());
      return;
    default:
      shuffle(order, (uint64_t(block) << 32) ^ round);
  }
}

// Dynamic shared memory at a block's start. The GPU's is never cleared: it
// holds what the SM's previous block left. So, by block, the emulator leaves
// it as the previous block left it, or sets all-ones bytes (NaN floats, -1
// indices) or zero bytes: a read before the block's own write then changes
// some block's results whatever the kernel takes as a harmless value. The
// guard after it is reset too.
void start_shared(std::vector<unsigned char>& shared, unsigned bytes, unsigned block,
                  bool first_block) {
  shared.resize(bytes + kGuardBytes);
  const unsigned mode = block / 3 % 3;  // not in step with the thread order's
  if (mode == 0 || (mode == 2 && first_block))
    std::fill(shared.begin(), shared.begin() + bytes, 0xFF);
  else if (mode == 1)
    std::fill(shared.begin(), shared.begin() + bytes, 0);
  std::fill(shared.begin() + bytes, shared.end(), kGuardByte);
}

enum class BlockEnd { Finished, Stuck, Raced };

// Runs every fiber until it blocks, in the round's order; then releases
// whole warps waiting at a warp barrier, else the whole block waiting at a
// block barrier. Stops when the block cannot make progress (a divergent
// barrier), or at the first switch after a race report: the launch fails
// anyway, and the block's other threads would only add copies of it.
BlockEnd run_block(Launch& launch, unsigned threads, unsigned block) {
  const unsigned long races_before = race::reports;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = launch.fibers[t];
    f.state = State::Runnable;
    f.warp_barriers = f.block_barriers = 0;
    // Stack tops 64 bytes apart modulo 4 KiB: tops a whole number of pages
    // apart would all fall in one L1 cache set and evict each other.
    start_context(f.context, (*launch.stacks)[t]->base(), kStackBytes - t % 64 * 64, fiber_entry);
  }
  std::vector<unsigned> order(threads);
  for (unsigned round = 0;; ++round) {
    schedule(order, block, round);
    for (unsigned t : order) {
      Fiber& f = launch.fibers[t];
      if (f.state != State::Runnable) continue;
      launch.current = &f;
      threadIdx = f.index;
      race::switch_to(f.race_fiber);
      switch_context(launch.scheduler, f.context);
      if (race::reports != races_before) return BlockEnd::Raced;
    }
    bool released = false;
    bool all_done = true;
    bool block_ready = true;
    for (unsigned w = 0; w * 32 < threads; ++w) {
      unsigned end = (w + 1) * 32 < threads ? (w + 1) * 32 : threads;
      bool warp_ready = false, other = false;
      for (unsigned t = w * 32; t < end; ++t) {
        State s = launch.fibers[t].state;
        if (s != State::Done) all_done = false;
        if (s == State::AtWarpBarrier) warp_ready = true;
        if (s == State::AtBlockBarrier) other = true;
        if (s != State::AtBlockBarrier && s != State::Done) block_ready = false;
      }
      if (warp_ready && !other) {
        for (unsigned t = w * 32; t < end; ++t)
          if (launch.fibers[t].state == State::AtWarpBarrier)
            launch.fibers[t].state = State::Runnable;
        released = true;
      }
    }
    if (all_done) return BlockEnd::Finished;
    if (released) continue;
    if (!block_ready) return BlockEnd::Stuck;
    for (unsigned t = 0; t < threads; ++t)
      if (launch.fibers[t].state == State::AtBlockBarrier)
        launch.fibers[t].state = State::Runnable;
  }
}

}  // namespace

#if AF_EMU_RACECHECK
// ThreadSanitizer's hook, called for each report it prints.
extern "C" void __tsan_on_report(const void*) { ++race::reports; }
// Reports are turned into launch errors, so they decide the tests, not the
// exit code; every report is printed, even where one with the same stack was.
// Only the kernels are checked: the Rust code is not instrumented, and what
// orders its threads (atomics in rayon and the test harness) is invisible
// to ThreadSanitizer, so the libc calls it makes (memcpy, free: a block
// allocated on one thread and freed on another) are not checked either.
extern "C" const char* __tsan_default_options() {
  return "exitcode=0:suppress_equal_stacks=0:suppress_equal_addresses=0:"
         "ignore_interceptors_accesses=1";
}
#endif

namespace af_emu {

namespace {
// Waits for the whole warp, as a warp barrier and a shuffle both do.
void warp_rendezvous() {
  Launch* launch = active;
  if (launch->fibers.size() < (launch->current->linear / 32 + 1) * 32)
    launch->partial_warp_sync = true;
  yield_as(State::AtWarpBarrier);
}
}  // namespace

void block_barrier() {
  Launch* launch = active;
  Fiber* self = launch->current;
  uint64_t* sync = launch->block_sync(self->block_barriers++ % 2);
  race::release(sync);
  yield_as(State::AtBlockBarrier);
  race::acquire(sync);
}
void warp_barrier() {
  Launch* launch = active;
  Fiber* self = launch->current;
  uint64_t* sync = launch->warp_sync(self->linear, self->warp_barriers++ % 2);
  race::release(sync);
  warp_rendezvous();
  race::acquire(sync);
}
unsigned lane() { return active->current->linear % 32; }
uint64_t exchange_bits(uint64_t bits, unsigned src_lane) {
  Launch* launch = active;
  uint64_t* slots = launch->warp_slots.data() + (launch->current->linear / 32) * 32;
  slots[lane()] = bits;
  warp_rendezvous();
  const uint64_t got = slots[src_lane % 32];
  warp_rendezvous();
  return got;
}
void* dynamic_shared() { return active->shared.data(); }

void misaligned(const void* at, unsigned bytes) {
  if (!active->misaligned_at) {
    active->misaligned_at = at;
    active->misaligned_bytes = bytes;
  }
}

}  // namespace af_emu

// The launch geometry, mirrored by `EmulatedLaunch` in src/gpu/emulator.rs.
struct af_emu_launch {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_bytes;
};

// Runs `body(params)` over the launch's grid. Returns 0, or 1 with a message
// in `error` (bad geometry, or a barrier the block's threads cannot all reach).
extern "C" int af_emu_run(const af_emu_launch* cfg, unsigned max_threads,
                          void (*body)(const void*), const void* params, char* error,
                          size_t error_len) {
  unsigned threads = cfg->block[0] * cfg->block[1] * cfg->block[2];
  if (threads == 0 || threads > max_threads) {
    std::snprintf(error, error_len,
                  "block of %u threads (must be 1..=%u: the kernel's launch bounds)", threads,
                  max_threads);
    return 1;
  }
  Launch launch;
  launch.stacks = stacks(threads);
  if (!launch.stacks) {
    std::snprintf(error, error_len, "could not map the stacks of %u emulated threads", threads);
    return 1;
  }
  launch.body = body;
  launch.params = params;
  launch.fibers.resize(threads);
  launch.warp_slots.assign((threads + 31) / 32 * 32, 0);
  launch.race_scheduler = race::current_fiber();
  launch.race_syncs.assign((threads + 31) / 32 * 2 + 4, 0);
  const std::vector<void*>& race_fibers_of_threads = race_fibers(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = launch.fibers[t];
    f.linear = t;
    f.race_fiber = race_fibers_of_threads[t];
    f.index.x = t % cfg->block[0];
    f.index.y = (t / cfg->block[0]) % cfg->block[1];
    f.index.z = t / (cfg->block[0] * cfg->block[1]);
  }
  Launch* outer = active;
  active = &launch;
  blockDim = dim3{cfg->block[0], cfg->block[1], cfg->block[2]};
  gridDim = dim3{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
  // Blocks run one at a time, in a shuffled order (seeded by the grid's
  // size): the GPU promises no order between blocks either, so a block that
  // reads what another block of the launch writes shows here too.
  const uint64_t blocks = uint64_t(cfg->grid[0]) * cfg->grid[1] * cfg->grid[2];
  std::vector<unsigned> block_order;
  if (blocks <= (1u << 24)) {
    block_order.resize(blocks);
    for (unsigned b = 0; b < blocks; ++b) block_order[b] = b;
    shuffle(block_order, blocks);
  }
  int status = 0;
  for (uint64_t b = 0; b < blocks && status == 0; ++b) {
    const uint64_t block = block_order.empty() ? b : block_order[b];
    const unsigned x = unsigned(block % cfg->grid[0]);
    const unsigned y = unsigned(block / cfg->grid[0] % cfg->grid[1]);
    const unsigned z = unsigned(block / cfg->grid[0] / cfg->grid[1]);
    blockIdx = dim3{x, y, z};
    start_shared(launch.shared, cfg->shared_bytes, unsigned(block), b == 0);
    // Whatever came before (the host's writes, earlier blocks) is ordered
    // before the block's threads, which are ordered before what follows.
    race::release(launch.block_start_sync());
    const BlockEnd end = run_block(launch, threads, unsigned(block));
    race::acquire(launch.block_end_sync());
    const bool overrun =
        std::any_of(launch.shared.begin() + cfg->shared_bytes, launch.shared.end(),
                    [](unsigned char byte) { return byte != kGuardByte; });
    if (end == BlockEnd::Raced) {
      race_fiber_pool.clear();
      std::snprintf(error, error_len,
                    "block (%u, %u, %u): ThreadSanitizer reports a data race between its "
                    "threads (its report is on stderr): a missing __syncthreads or __syncwarp?",
                    x, y, z);
      status = 1;
    } else if (end == BlockEnd::Stuck) {
      std::snprintf(error, error_len, "block (%u, %u, %u): threads wait at different barriers",
                    x, y, z);
      status = 1;
    } else if (overrun) {
      std::snprintf(error, error_len,
                    "block (%u, %u, %u) wrote past its %u bytes of dynamic shared memory", x, y,
                    z, cfg->shared_bytes);
      status = 1;
    } else if (launch.misaligned_at) {
      std::snprintf(error, error_len,
                    "block (%u, %u, %u): a %u-byte vector access at %p, not a multiple of %u "
                    "(a misaligned address on the GPU)",
                    x, y, z, launch.misaligned_bytes, launch.misaligned_at,
                    launch.misaligned_bytes);
      status = 1;
    } else if (launch.partial_warp_sync) {
      std::snprintf(error, error_len,
                    "block of %u threads: a warp of fewer than 32 used a full-mask warp "
                    "intrinsic (__syncwarp, __shfl_*_sync)",
                    threads);
      status = 1;
    }
  }
  active = outer;
  return status;
}
