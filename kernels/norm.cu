// LayerNorm over the last dimension: one warp per row, two passes (mean,
// then the mean squared deviation) as torch computes it.
#include "common.cuh"

template <class T>
__device__ void layer_norm_impl(const LayerNormParams p) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * warps + threadIdx.x / 32;
  if (row >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + size_t(row) * p.dim;
  T* out = static_cast<T*>(p.out) + size_t(row) * p.dim;
  float sum = 0.0f;
  for (int e = lane; e < p.dim; e += 32) sum += to_f32(x[e]);
  const float mean = warp_sum(sum) / p.dim;
  float dev = 0.0f;
  for (int e = lane; e < p.dim; e += 32) {
    const float d = to_f32(x[e]) - mean;
    dev += d * d;
  }
  const float inv = 1.0f / sqrtf(warp_sum(dev) / p.dim + p.eps);
  for (int e = lane; e < p.dim; e += 32)
    out[e] = from_f32<T>((to_f32(x[e]) - mean) * inv * p.weight[e] + p.bias[e]);
}

AF_KERNEL_ALL_TYPES(layer_norm, LayerNormParams, layer_norm_impl)
