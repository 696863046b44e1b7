// Fused cluster attention (spec §6). One warp per query row handles all its
// heads: the lanes gather the neighbours' relative-position features once
// (computed from the two positions: no table, no index tensor), then per
// head score the neighbours (lane per neighbour), softmax with the blank
// token through warp reductions, and sum the values (lane per channel).
// Logits live in shared memory only: the attention matrix never reaches
// device memory.
//
// Shared memory per warp: the scaled query (c), the features (5·m) and the
// logits (m + 1) — see `attention_shared_floats` in the Rust wrapper.
#include "common.cuh"

constexpr float kMaskedLogit = -100.0f;  // added, not −∞, as published

template <class T>
__device__ void cluster_attention_impl(const AttentionParams p) {
  AF_DYNAMIC_SHARED(float, shared);
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int d = p.head_dim, c = p.heads * d, m = p.m;
  const size_t row = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // img·tokens + i
  if (row >= size_t(p.batch) * p.tokens) return;
  float* query = shared + (threadIdx.x / 32) * (c + 6 * m + 1);  // c
  float* features = query + c;                                   // 5 × m
  float* logits = features + 5 * m;                              // m + 1
  const int img = int(row / p.tokens), i = int(row % p.tokens);
  const size_t nbhd_row = (size_t(p.nbhd_images == 1 ? 0 : img) * p.tokens + i) * m;
  const int32_t* nbrs = p.nbhd ? p.nbhd + nbhd_row : nullptr;
  const uint8_t* mask = p.mask ? p.mask + nbhd_row : nullptr;
  const float* pos = p.pos + size_t(img) * p.tokens * 2;
  const T* kv = static_cast<const T*>(p.kv) + size_t(img) * p.tokens * 2 * c;
  const T* q = static_cast<const T*>(p.q) + row * c;
  T* out = static_cast<T*>(p.out) + row * c;

  for (int e = lane; e < c; e += 32) query[e] = to_f32(q[e]) * p.q_scale;
  const float xi = pos[2 * i], yi = pos[2 * i + 1];
  for (int s = lane; s < m; s += 32) {
    const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
    float f[5];
    rel_pos_features(clamped_offset(xi, pos[2 * j], p.offset_clamp),
                     clamped_offset(yi, pos[2 * j + 1], p.offset_clamp), f);
    for (int k = 0; k < 5; ++k) features[k * m + s] = f[k];
  }
  __syncwarp();

  for (int t = 0; t < p.heads; ++t) {
    const float* qt = query + t * d;
    const float* pw = p.pos_weight + 5 * t;
    float local_max = -INFINITY;
    for (int s = lane; s < m; s += 32) {
      const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
      const T* key = kv + size_t(j) * 2 * c + t * 2 * d;
      float logit = 0.0f;
      for (int e = 0; e < d; ++e) logit += qt[e] * to_f32(key[e]);
      float bias = p.pos_bias[t];
      for (int k = 0; k < 5; ++k) bias += pw[k] * features[k * m + s];
      logit += bias;
      if (mask && !mask[s]) logit += kMaskedLogit;
      logits[s] = logit;
      local_max = fmaxf(local_max, logit);
    }
    float blank = 0.0f;
    for (int e = lane; e < d; e += 32) blank += qt[e] * p.blank_k[t * d + e];
    blank = warp_sum(blank);
    const float max = warp_max(fmaxf(local_max, blank));
    float sum = 0.0f;
    for (int s = lane; s < m; s += 32) {
      const float w = expf(logits[s] - max);
      logits[s] = w;
      sum += w;
    }
    const float blank_weight = expf(blank - max);
    const float inv_sum = 1.0f / (warp_sum(sum) + blank_weight);
    __syncwarp();
    // Normalised after the weighted sum: d multiplies instead of m + 1.
    for (int e = lane; e < d; e += 32) {
      float acc = blank_weight * p.blank_v[t * d + e];
      const T* value = kv + t * 2 * d + d + e;
      for (int s = 0; s < m; ++s) {
        const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
        acc += logits[s] * to_f32(value[size_t(j) * 2 * c]);
      }
      out[t * d + e] = from_f32<T>(acc * inv_sum);
    }
    __syncwarp();
  }
}

AF_KERNEL_ALL_TYPES(cluster_attention, AttentionParams, cluster_attention_impl)
