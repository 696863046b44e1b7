// Kernels that break the GPU's rules on purpose, so that a Rust test
// (src/gpu/emulator.rs) can show the emulator catching each break. Built into
// the emulator only; nvcc never sees them.
#include "../common.cuh"

struct EmuSelfTestParams {
  float* out;  // one float per thread of the launch
  int sync;    // 1: the barrier the kernel needs; 0: without it
  int tag;     // a number the launch writes, to tell launches apart
};

// Thread t publishes t in shared memory and reads its left neighbour's
// value. Without the barrier the result depends on the order the threads
// run in: ascending order happens to give the right answer.
AF_KERNEL(emu_selftest_neighbour, EmuSelfTestParams, {
  AF_DYNAMIC_SHARED(float, shared);
  const int t = threadIdx.x;
  shared[t] = float(t);
  if (p.sync) __syncthreads();
  p.out[blockIdx.x * blockDim.x + t] = t > 0 ? shared[t - 1] : 0.0f;
})

// Block b reads what block b − 1 wrote: a chain that only ascending block
// order completes (launched with one thread per block).
AF_KERNEL(emu_selftest_previous_block, EmuSelfTestParams, {
  const int b = blockIdx.x;
  p.out[b] = b == 0 ? 0.0f : p.out[b - 1] + 1.0f;
})

// Reads dynamic shared memory that the block has not written, then writes
// its own index there.
AF_KERNEL(emu_selftest_unwritten, EmuSelfTestParams, {
  AF_DYNAMIC_SHARED(float, shared);
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = shared[threadIdx.x];
  shared[threadIdx.x] = float(blockIdx.x);
})

// The last thread writes one float past the end of its shared memory
// (launched with a float per thread).
AF_KERNEL(emu_selftest_overrun, EmuSelfTestParams, {
  AF_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x + 1] = 0.0f;
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
})

// Declared for blocks of at most 64 threads.
AF_KERNEL_BOUNDED(emu_selftest_bounded, EmuSelfTestParams, 64, {
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
})

// A full-mask warp sum: needs whole warps.
AF_KERNEL(emu_selftest_warp_sum, EmuSelfTestParams, {
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = warp_sum(1.0f);
})

// Each thread stores its launch's tag and block in a static __shared__
// array, waits at barriers (where the other threads of the block run) and
// reads its value back. Launches running side by side on several threads
// must each see only their own values.
AF_KERNEL(emu_selftest_static_shared, EmuSelfTestParams, {
  __shared__ float values[1024];
  const float mine = float(p.tag * 1000 + int(blockIdx.x));
  values[threadIdx.x] = mine;
  float seen = mine;
  for (int round = 0; round < 4; ++round) {
    __syncthreads();
    if (values[threadIdx.x] != mine) seen = values[threadIdx.x];
  }
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = seen;
})

// Lane t publishes t in shared memory, the warp sums (shuffles), then lane t
// reads lane t ^ 1's value. Every lane must reach the shuffles before any
// passes them, so the emulator's thread orders always give the right
// answer; but on the GPU a shuffle orders no memory, and only the
// __syncwarp makes the neighbour's write visible. The race check
// (AUTOFOCUS_EMU_RACECHECK=1) reports the launch without it.
AF_KERNEL(emu_selftest_shuffle_then_read, EmuSelfTestParams, {
  AF_DYNAMIC_SHARED(float, shared);
  const int t = threadIdx.x;
  shared[t] = float(t);
  const float lanes = warp_sum(1.0f);
  if (p.sync) __syncwarp();
  p.out[blockIdx.x * blockDim.x + t] = shared[t ^ 1] + lanes;
})

// The warp votes the tiled attention numbers its union with: lane t writes
// the bits set in the ballot of (t % 3 == 0) and its own bit there, then
// the lanes holding its value t / 4, then the lowest of those (1-based),
// all packed into one float.
AF_KERNEL(emu_selftest_votes, EmuSelfTestParams, {
  const int t = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, t % 3 == 0);
  const unsigned same = __match_any_sync(0xffffffffu, t / 4);
  const float packed = float(__popc(ballot)) * 1e6f + float((ballot >> t) & 1u) * 1e5f +
                       float(same >> (t / 4 * 4)) * 100.0f + float(__ffs(int(same)));
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = packed;
})

// Thread t reads the 32-bit word of dynamic shared memory at byte 4·(t / 2),
// or, without `sync`, two bytes past it: a misaligned address on the GPU.
AF_KERNEL(emu_selftest_misaligned, EmuSelfTestParams, {
  AF_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(shared);
  const uint32_t word = load_word(bytes + 4 * (threadIdx.x / 2) + (p.sync ? 0 : 2));
  float value;
  std::memcpy(&value, &word, 4);
  p.out[blockIdx.x * blockDim.x + threadIdx.x] = value;
})
