// Fiber scheduler behind emulator.h: runs one kernel launch on the CPU.
#include "emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

// What a fiber is doing when it hands control back to the scheduler.
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ucontext_t context;
  dim3 index;
  unsigned linear = 0;
  State state = State::Runnable;
};

// Fiber stacks are generous: kernels keep small arrays in "registers".
constexpr size_t kStackBytes = 256 * 1024;

struct Launch {
  void (*body)(const void*) = nullptr;
  const void* params = nullptr;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<uint64_t> warp_slots;
  std::vector<unsigned char> shared;
  Fiber* current = nullptr;
};

thread_local Launch* active = nullptr;

void yield_as(State state) {
  Launch* launch = active;
  Fiber* self = launch->current;
  self->state = state;
  swapcontext(&self->context, &launch->scheduler);
}

void fiber_entry() {
  Launch* launch = active;
  launch->body(launch->params);
  launch->current->state = State::Done;
  // uc_link returns to the scheduler.
}

// Runs every fiber until it blocks; then releases whole warps waiting at a
// warp barrier, else the whole block waiting at a block barrier. Returns
// false when the block cannot make progress (a divergent barrier).
bool run_block(Launch& launch, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = launch.fibers[t];
    f.state = State::Runnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = launch.stacks[t].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &launch.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = launch.fibers[t];
      if (f.state != State::Runnable) continue;
      launch.current = &f;
      threadIdx = f.index;
      swapcontext(&launch.scheduler, &f.context);
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
    if (all_done) return true;
    if (released) continue;
    if (!block_ready) return false;
    for (unsigned t = 0; t < threads; ++t)
      if (launch.fibers[t].state == State::AtBlockBarrier)
        launch.fibers[t].state = State::Runnable;
  }
}

std::mutex launches;

}  // namespace

namespace af_emu {

void block_barrier() { yield_as(State::AtBlockBarrier); }
void warp_barrier() { yield_as(State::AtWarpBarrier); }
unsigned lane() { return active->current->linear % 32; }
uint64_t* warp_slots() {
  return active->warp_slots.data() + (active->current->linear / 32) * 32;
}
void* dynamic_shared() { return active->shared.data(); }

}  // namespace af_emu

// The launch geometry, mirrored by `EmulatedLaunch` in src/gpu/emulator.rs.
struct af_emu_launch {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_bytes;
};

// Runs `body(params)` over the launch's grid. Returns 0, or 1 with a message
// in `error` (bad geometry, or a barrier the block's threads cannot all reach).
extern "C" int af_emu_run(const af_emu_launch* cfg, void (*body)(const void*),
                          const void* params, char* error, size_t error_len) {
  // Static shared memory is per process: one launch at a time.
  std::lock_guard<std::mutex> guard(launches);
  unsigned threads = cfg->block[0] * cfg->block[1] * cfg->block[2];
  if (threads == 0 || threads > 1024) {
    std::snprintf(error, error_len, "block of %u threads (must be 1..=1024)", threads);
    return 1;
  }
  Launch launch;
  launch.body = body;
  launch.params = params;
  launch.fibers.resize(threads);
  launch.warp_slots.assign((threads + 31) / 32 * 32, 0);
  for (unsigned t = 0; t < threads; ++t) {
    launch.stacks.emplace_back(new char[kStackBytes]);
    Fiber& f = launch.fibers[t];
    f.linear = t;
    f.index.x = t % cfg->block[0];
    f.index.y = (t / cfg->block[0]) % cfg->block[1];
    f.index.z = t / (cfg->block[0] * cfg->block[1]);
  }
  Launch* outer = active;
  active = &launch;
  blockDim = dim3{cfg->block[0], cfg->block[1], cfg->block[2]};
  gridDim = dim3{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
  int status = 0;
  for (unsigned z = 0; z < cfg->grid[2] && status == 0; ++z)
    for (unsigned y = 0; y < cfg->grid[1] && status == 0; ++y)
      for (unsigned x = 0; x < cfg->grid[0] && status == 0; ++x) {
        blockIdx = dim3{x, y, z};
        launch.shared.assign(cfg->shared_bytes + 16, 0);
        if (!run_block(launch, threads)) {
          std::snprintf(error, error_len,
                        "block (%u, %u, %u): threads wait at different barriers", x, y, z);
          status = 1;
        }
      }
  active = outer;
  return status;
}
