// Shared by every kernel: the element types, the kernel-definition macro
// (CUDA and CPU emulator alike), warp reductions, and the parameter structs.
#pragma once

#ifndef __CUDACC__
#include "emulator/emulator.h"
#endif

#include "params.h"  // and the fixed-width integer types

// ---------------------------------------------------------------- types ----
// Storage types: f32, f16, bf16. Arithmetic is always f32. The half types
// are their bit patterns, on the GPU as in the emulator.
struct af_f16 { uint16_t bits; };
struct af_bf16 { uint16_t bits; };
#ifdef __CUDACC__
// The half types as bit patterns, converted by the same instructions as
// cuda_fp16.h's `__half2float`/`__float2half_rn` and cuda_bf16.h's
// equivalents: no toolkit header, so NVRTC compiles these sources too.
__device__ __forceinline__ float to_f32(af_f16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float to_f32(af_bf16 v) {
  return __uint_as_float(uint32_t(v.bits) << 16);
}
template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ af_f16 from_f32<af_f16>(float v) {
  af_f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}
template <>
__device__ __forceinline__ af_bf16 from_f32<af_bf16>(float v) {
  af_bf16 h;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#else  // no bf16 conversion instruction before sm_80: round to nearest even by hand
  uint32_t u = __float_as_uint(v);
  h.bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u)
                                            : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  return h;
}
#else
// Round-to-nearest-even conversions in plain C++, as the GPU rounds.
inline float to_f32(af_bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(af_f16 v) {
  uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <class T>
T from_f32(float v);
template <>
inline af_bf16 from_f32<af_bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return af_bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return af_bf16{uint16_t(u >> 16)};
}
template <>
inline af_f16 from_f32<af_f16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return af_f16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return af_f16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // subnormal half (or zero): round at 2^-24
    float m = std::fabs(v) * 16777216.0f;  // exact scaling
    float r = std::nearbyint(m);            // ties to even (default mode)
    return af_f16{uint16_t(sign | uint16_t(r))};
  }
  uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return af_f16{uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
}
#endif
__device__ __forceinline__ float to_f32(float v) { return v; }
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }

// --------------------------------------------------------- vector loads ----
// Two adjacent elements of a 2-byte storage type in one 32-bit load, two
// (four) floats in one 64-bit (128-bit) load: fewer load instructions than
// element loads (inner loops over shared-memory rows are bound by
// instruction issue, not bytes). The address must be a multiple of the
// load's width: a
// misaligned-address fault on the GPU, an error of the launch in the
// emulator.
#ifdef __CUDACC__
__device__ __forceinline__ uint32_t load_word(const void* at) {
  return *static_cast<const uint32_t*>(at);
}
__device__ __forceinline__ float2 load_float2(const float* at) {
  return *reinterpret_cast<const float2*>(at);
}
__device__ __forceinline__ float4 load_float4(const float* at) {
  return *reinterpret_cast<const float4*>(at);
}
#else
template <class V>
inline V load_vector(const void* at) {
  if (reinterpret_cast<uintptr_t>(at) % sizeof(V) != 0) af_emu::misaligned(at, sizeof(V));
  V v;
  std::memcpy(&v, at, sizeof(V));
  return v;
}
inline uint32_t load_word(const void* at) { return load_vector<uint32_t>(at); }
inline float2 load_float2(const float* at) { return load_vector<float2>(at); }
inline float4 load_float4(const float* at) { return load_vector<float4>(at); }
#endif

// The two elements of a 32-bit word of 2-byte storage type T (element 2k,
// at the lower address, in the low half), as f32.
template <class T>
__device__ __forceinline__ void word_to_f32(uint32_t word, float& lo, float& hi) {
  static_assert(sizeof(T) == 2, "a word holds two elements of a 2-byte type");
  lo = to_f32(T{uint16_t(word)});
  hi = to_f32(T{uint16_t(word >> 16)});
}

// ------------------------------------------------------------- kernels ----
// AF_KERNEL(name, Params, body) defines `extern "C" __global__ void name(const
// Params p)` and, in the emulator build, `af_emu_<name>` that runs it on the
// CPU. Every kernel takes one parameter struct from params.h by value.
#ifdef __CUDACC__
#define AF_KERNEL(name, Params, ...) \
  extern "C" __global__ void name(const Params p) { __VA_ARGS__; }
#define AF_DYNAMIC_SHARED(T, var)                                   \
  extern __shared__ __align__(16) unsigned char af_dynamic_shared[]; \
  T* var = reinterpret_cast<T*>(af_dynamic_shared)
#else
struct af_emu_launch;
// `max_threads`: the kernel's `__launch_bounds__` (1024 without), which the
// GPU refuses to exceed, so the emulator refuses too.
extern "C" int af_emu_run(const af_emu_launch*, unsigned max_threads, void (*)(const void*),
                          const void*, char*, size_t);
#define AF_EMU_KERNEL(name, Params, max_threads, ...)                          \
  static void name(const Params p) { __VA_ARGS__; }                           \
  extern "C" int af_emu_##name(const af_emu_launch* cfg, const void* params,  \
                               char* error, size_t error_len) {               \
    return af_emu_run(                                                        \
        cfg, max_threads,                                                     \
        [](const void* raw) { name(*static_cast<const Params*>(raw)); },      \
        params, error, error_len);                                            \
  }
#define AF_KERNEL(name, Params, ...) AF_EMU_KERNEL(name, Params, 1024, __VA_ARGS__)
#define AF_DYNAMIC_SHARED(T, var) T* var = reinterpret_cast<T*>(af_emu::dynamic_shared())
#endif

// One kernel per storage type: name_f32, name_f16, name_bf16.
#define AF_KERNEL_ALL_TYPES(name, Params, impl)   \
  AF_KERNEL(name##_f32, Params, impl<float>(p))   \
  AF_KERNEL(name##_f16, Params, impl<af_f16>(p))  \
  AF_KERNEL(name##_bf16, Params, impl<af_bf16>(p))

// As AF_KERNEL_ALL_TYPES, for kernels launched with at most `threads` per
// block (`__launch_bounds__`: the register budget is planned for that).
#ifdef __CUDACC__
#define AF_KERNEL_BOUNDED(name, Params, threads, ...) \
  extern "C" __global__ void __launch_bounds__(threads) name(const Params p) { __VA_ARGS__; }
#else
#define AF_KERNEL_BOUNDED(name, Params, threads, ...) \
  AF_EMU_KERNEL(name, Params, threads, __VA_ARGS__)
#endif
#define AF_KERNEL_ALL_TYPES_BOUNDED(name, Params, impl, threads)   \
  AF_KERNEL_BOUNDED(name##_f32, Params, threads, impl<float>(p))   \
  AF_KERNEL_BOUNDED(name##_f16, Params, threads, impl<af_f16>(p))  \
  AF_KERNEL_BOUNDED(name##_bf16, Params, threads, impl<af_bf16>(p))

// −∞ without <math.h>'s INFINITY, which NVRTC lacks.
__device__ __forceinline__ float negative_infinity() { return __int_as_float(int(0xff800000u)); }

// ---------------------------------------------------------- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Offers candidate `id` at distance `d` to the k nearest so far (`filled`
// of them, ascending by (distance, id)): ties go to the lower id whatever
// order the candidates come in.
template <class D>
__device__ __forceinline__ bool nearer(D da, int ida, D db, int idb) {
  return da < db || (da == db && ida < idb);
}
template <class D>
__device__ __forceinline__ void insert_nearest(D* best_d, int* best_id, int& filled, int k, D d,
                                               int id) {
  if (filled == k && !nearer(d, id, best_d[k - 1], best_id[k - 1])) return;
  int at = filled < k ? filled : k - 1;
  while (at > 0 && nearer(d, id, best_d[at - 1], best_id[at - 1])) {
    best_d[at] = best_d[at - 1];
    best_id[at] = best_id[at - 1];
    --at;
  }
  best_d[at] = d;
  best_id[at] = id;
  if (filled < k) ++filled;
}

// e^x as a fixed sequence of correctly rounded f32 operations, step for
// step `vector_math::exp` of the CPU reference (Cody–Waite reduction by
// ln 2, degree-7 Taylor series, 2^n through the exponent bits), so both
// give the same bits: CUDA's expf and a libm exp may differ in the last place.
__device__ __forceinline__ float exp_exact_twin(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.69314575f,
              kLn2Lo = 1.4286068e-6f, kRound = 12582912.0f;
  const float x_in = x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = __fadd_rn(__fmul_rn(x, kLog2e), kRound);
  const float n = __fsub_rn(shifted, kRound);
  const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, kLn2Hi)), __fmul_rn(n, kLn2Lo));
  float p = 1.0f / 5040.0f;
  p = __fadd_rn(1.0f / 720.0f, __fmul_rn(r, p));
  p = __fadd_rn(1.0f / 120.0f, __fmul_rn(r, p));
  p = __fadd_rn(1.0f / 24.0f, __fmul_rn(r, p));
  p = __fadd_rn(1.0f / 6.0f, __fmul_rn(r, p));
  p = __fadd_rn(0.5f, __fmul_rn(r, p));
  p = __fadd_rn(1.0f, __fmul_rn(r, p));
  p = __fadd_rn(1.0f, __fmul_rn(r, p));
  const uint32_t biased =
      uint32_t(__float_as_int(shifted)) - uint32_t(__float_as_int(kRound)) + 127u;
  const float scale = __int_as_float(int(biased << 23));
  return x_in < -87.0f ? 0.0f : __fmul_rn(p, scale);
}

// The logistic sigmoid, the same bits as `activation::sigmoid` on the CPU.
__device__ __forceinline__ float sigmoid_exact_twin(float x) {
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_exact_twin(-x)));
}

// Exact GELU, as torch.nn.GELU().
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// Its derivative, Φ(x) + x·φ(x).
__device__ __forceinline__ float gelu_grad(float x) {
  return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}

// The relative-position features of spec §5 for offset (dx, dy).
__device__ __forceinline__ void rel_pos_features(float dx, float dy, float f[5]) {
  float d = sqrtf(__fadd_rn(__fmul_rn(dy, dy), __fmul_rn(dx, dx)));
  f[0] = dx;
  f[1] = dy;
  f[2] = d;
  f[3] = d == 0.0f ? 0.0f : __fdiv_rn(dy, d);
  f[4] = d == 0.0f ? 0.0f : __fdiv_rn(dx, d);
}

// An index from a buffer, clamped into [0, bound): a bad index gives wrong
// values but never an access outside the buffer (the safe Rust wrappers
// cannot check indices that live on the device).
__device__ __forceinline__ int clamp_index(int i, int bound) { return i < 0 ? 0 : (i >= bound ? bound - 1 : i); }

// The (query, slot) pairs that hold token j, from the inverse lists of a
// backward pass (image list `list` of tokens × m slots); with no lists (a
// global stage) every query holds token j in slot j.
struct InversePairs {
  int first, last;
  const int32_t* pairs;  // null: global
  int tokens, m, j;
  __device__ __forceinline__ int query(int e) const { return pairs ? clamp_index(pairs[2 * e], tokens) : e; }
  __device__ __forceinline__ int slot(int e) const { return pairs ? clamp_index(pairs[2 * e + 1], m) : j; }
};

__device__ __forceinline__ InversePairs inverse_pairs(const int32_t* inv_start, const int32_t* inv_pairs,
                                                      int list, int tokens, int m, int j) {
  if (!inv_start) return InversePairs{0, tokens, nullptr, tokens, m, j};
  const int32_t* start = inv_start + size_t(list) * (tokens + 1);
  return InversePairs{start[j], start[j + 1], inv_pairs + size_t(list) * tokens * m * 2, tokens, m, j};
}

// Offset from `from` to `to`, clamped to ±clamp per axis (segmentation mode).
__device__ __forceinline__ float clamped_offset(float from, float to, float clamp) {
  float d = to - from;
  return fminf(fmaxf(d, -clamp), clamp);
}

// The features of neighbour j seen from token i (positions n × 2), offsets
// clamped to ±clamp per axis.
__device__ __forceinline__ void neighbour_features(const float* pos, int i, int j, float clamp,
                                                   float f[5]) {
  rel_pos_features(clamped_offset(pos[2 * i], pos[2 * j], clamp),
                   clamped_offset(pos[2 * i + 1], pos[2 * j + 1], clamp), f);
}
