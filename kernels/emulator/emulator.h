// The CUDA execution model on the CPU, so that `cargo test` runs the same
// kernels/*.cu without a GPU (compiled as C++ by build.rs through `cc`).
//
// Each launch runs its blocks one after another on the calling thread; the
// threads of a block are fibers (context.h) switched cooperatively at
// __syncthreads and warp intrinsics. Consequences the kernels can rely on:
// - `__shared__` variables are `static thread_local` (one block is live at
//   a time on a thread; launches on different threads run side by side);
// - a fiber is never interrupted between two barriers;
// - a barrier some threads never reach is reported as an error, not a hang.
// What the GPU does not promise, the emulator does not give either, so that a
// kernel relying on it fails its tests here: threads run between barriers in
// an order that changes by block and round (ascending, descending,
// shuffled), and blocks in a shuffled order; dynamic shared memory starts as
// the previous block left it, or as all-ones bytes (NaN floats), or zeros,
// by block, and a write past its end is reported; a block larger than the
// kernel's `__launch_bounds__` is refused, and so is a full-mask warp
// intrinsic in a warp of fewer than 32 threads; a vector load at an address
// that is not a multiple of its width is reported (a fault on the GPU).
//
// Built with AUTOFOCUS_EMU_RACECHECK=1 (build.rs), the kernels' code is
// instrumented by ThreadSanitizer, each emulated thread is one of its
// fibers, and only __syncthreads and __syncwarp order memory between them,
// as on the GPU: a shuffle does not, although the emulator must run every
// lane up to it. A launch in which ThreadSanitizer reports a race fails
// (the report is on stderr), which catches a missing barrier that the
// changing thread order cannot, next to a shuffle.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// CUDA's vector types, with their alignment (a 64- and a 128-bit load).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local

namespace af_emu {
// Waits until every live thread of the block has arrived.
void block_barrier();
// Waits until every live thread of the calling thread's warp has arrived.
void warp_barrier();
// This thread's lane.
unsigned lane();
// The launch's dynamic shared memory (stale or poisoned at each block start).
void* dynamic_shared();
// A warp shuffle's exchange: every lane of the warp offers `bits` and gets
// lane `src_lane`'s. Defined with the scheduler, outside the kernels' code,
// so that the race check (emulator.cpp) sees no memory access in it: a
// shuffle passes registers, it orders no memory on the GPU.
uint64_t exchange_bits(uint64_t bits, unsigned src_lane);
// Records a vector access (`bytes` wide) at an address that is not a
// multiple of its width: a misaligned-address fault on the GPU, here an
// error of the launch.
void misaligned(const void* at, unsigned bytes);

template <class T>
T exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t got = exchange_bits(bits, src_lane);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
}  // namespace af_emu

inline void __syncthreads() { af_emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { af_emu::warp_barrier(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return af_emu::exchange(v, af_emu::lane() ^ unsigned(lane_mask));
}
template <class T>
T __shfl_sync(unsigned, T v, int src_lane, int = 32) {
  return af_emu::exchange(v, unsigned(src_lane));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  unsigned src = af_emu::lane() + delta;
  return af_emu::exchange(v, src < 32 ? src : af_emu::lane());
}

// Warp votes, from the same exchange as the shuffles (one per lane offered).
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned bits = 0;
  for (unsigned src = 0; src < 32; ++src) bits |= unsigned(af_emu::exchange(predicate != 0, src)) << src;
  return bits;
}
template <class T>
unsigned __match_any_sync(unsigned, T value) {
  unsigned bits = 0;
  for (unsigned src = 0; src < 32; ++src) bits |= unsigned(af_emu::exchange(value, src) == value) << src;
  return bits;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

// Fibers never interleave inside these, so plain read-modify-writes would
// do; they are relaxed atomics so that the race check counts them as what
// they are on the GPU (atomic, ordering nothing else). Integers only: no
// kernel adds floats atomically (gradients are deterministic).
template <class T>
T atomicAdd(T* address, T v) {
  static_assert(std::is_integral<T>::value, "atomicAdd of a non-integer");
  return __atomic_fetch_add(address, v, __ATOMIC_RELAXED);
}
template <class T>
T atomicMax(T* address, T v) {
  static_assert(std::is_integral<T>::value, "atomicMax of a non-integer");
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < v &&
         !__atomic_compare_exchange_n(address, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// Correctly rounded single operations (the host compiles with
// -ffp-contract=off, so plain operators already round each step).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float_as_int(float v) {
  int i;
  std::memcpy(&i, &v, 4);
  return i;
}
