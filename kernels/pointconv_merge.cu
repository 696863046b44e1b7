// PointConv merge (spec §7). One warp per centre: the lanes evaluate the
// weight net GELU(LN(Linear(5 → 4)(f))) for its neighbours from the
// positions, scaled by importance and mask, into shared memory (per warp:
// m slots of the 4 weights, one 16-byte load each, then each neighbour's
// row offset, 64-bit, so that the sums do no index arithmetic; 6·m floats,
// rounded up to 16 bytes); then each lane sums its channels over the
// neighbourhood.
#include "common.cuh"

constexpr int kInner = 4;

template <class T>
__device__ void pointconv_merge_impl(const MergeParams p) {
  AF_DYNAMIC_SHARED(float, shared);
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int m = p.m, C = p.channels;
  const size_t row = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // img·kept + r
  if (row >= size_t(p.batch) * p.kept) return;
  float* weights = shared + (threadIdx.x / 32) * ((6 * m + 3) & ~3);  // m × 4
  int64_t* rows = reinterpret_cast<int64_t*>(weights + kInner * m);    // m
  const int img = int(row / p.kept);
  const int i = clamp_index(p.centres[row], p.n);
  const size_t nbhd_row = (size_t(p.nbhd_images == 1 ? 0 : img) * p.n + i) * m;
  const int32_t* nbrs = p.nbhd ? p.nbhd + nbhd_row : nullptr;
  const uint8_t* mask = p.mask ? p.mask + nbhd_row : nullptr;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  const float* importance = p.importance + size_t(img) * p.n;
  const T* feat = static_cast<const T*>(p.feat) + size_t(img) * p.n * C;

  for (int s = lane; s < m; s += 32) {
    const int j = nbrs ? clamp_index(nbrs[s], p.n) : s;
    float f[5], h[kInner];
    neighbour_features(pos, i, j, p.offset_clamp, f);
    for (int o = 0; o < kInner; ++o) {
      h[o] = p.net_bias[o];
      for (int k = 0; k < 5; ++k) h[o] += p.net_weight[5 * o + k] * f[k];
    }
    const float mean = (((h[0] + h[1]) + h[2]) + h[3]) / 4.0f;
    float var = 0.0f;
    for (int o = 0; o < kInner; ++o) var += (h[o] - mean) * (h[o] - mean);
    const float inv = 1.0f / sqrtf(var / 4.0f + p.eps);
    // As published: the mask multiplies the importance, which scales the weights.
    const float scale = importance[j] * (mask && !mask[s] ? 0.0f : 1.0f);
    for (int o = 0; o < kInner; ++o)
      weights[s * kInner + o] = gelu((h[o] - mean) * inv * p.norm_weight[o] + p.norm_bias[o]) * scale;
    rows[s] = int64_t(j) * C;
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + row * kInner * C;
  for (int c = lane; c < C; c += 32) {
    float acc[kInner] = {};
    const T* column = feat + c;
    for (int s = 0; s < m; ++s) {
      const float x = to_f32(column[rows[s]]);
      const float4 w = load_float4(weights + s * kInner);
      acc[0] += w.x * x;
      acc[1] += w.y * x;
      acc[2] += w.z * x;
      acc[3] += w.w * x;
    }
    for (int o = 0; o < kInner; ++o) out[o * C + c] = from_f32<T>(acc[o]);
  }
}

AF_KERNEL_ALL_TYPES(pointconv_merge, MergeParams, pointconv_merge_impl)
