// Backward of the fused cluster attention (spec §6); the CPU reference is
// src/ops/cluster_attention/backward.rs. Deterministic: no float atomics.
//
// 1. cluster_attention_backward_query: one warp per (query row, head).
//    Recomputes the logits (lane per slot, as the forward), the log-sum-exp
//    and D = dO·O, and with da = p·(dO·v − D) writes dq, the row's lse and D
//    (for step 2) and the row's share of the gradients of pos_embed,
//    blank_k and blank_v (one row of row_partials).
// 2. cluster_attention_backward_key: one warp per (key row, head): dk and
//    dv gathered over the (query, slot) pairs that hold the key (the
//    inverse lists; every query, slot = key, for a global stage), in list
//    order.
// 3. column_sums (kernels/tensor_ops.cu) adds the rows' shares of the
//    parameter gradients, in a fixed order.
#include "common.cuh"

constexpr float kMaskedLogitBackward = -100.0f;  // as the forward
// Channels per lane kept in registers: head dims up to 32·8 = 256.
constexpr int kMaxPerLane = 8;

// The logit of neighbour j of query i (head t), by one thread: the scaled
// query and the key over all d channels, the position bias and the mask.
template <class T>
__device__ __forceinline__ float slot_logit(const AttentionParams& p, const T* q_row, const T* key,
                                            const float* pos, int i, int j, int t, bool masked,
                                            float f[5]) {
  const int d = p.head_dim;
  float acc = 0.0f;
  for (int e = 0; e < d; ++e) acc += to_f32(q_row[t * d + e]) * p.q_scale * to_f32(key[e]);
  neighbour_features(pos, i, j, p.offset_clamp, f);
  float bias = p.pos_bias[t];
  for (int k = 0; k < 5; ++k) bias += p.pos_weight[5 * t + k] * f[k];
  return acc + bias + (masked ? kMaskedLogitBackward : 0.0f);
}

// Dot product of two rows of d channels, by one thread.
template <class A, class B>
__device__ __forceinline__ float row_dot(const A* a, const B* b, int d) {
  float acc = 0.0f;
  for (int e = 0; e < d; ++e) acc += to_f32(a[e]) * to_f32(b[e]);
  return acc;
}

// The query kernel. Lanes take the neighbour slots (each a whole logit, as
// the forward scores them), meet in warp reductions for the log-sum-exp and
// the parameter shares, and leave da in shared memory (m floats per warp),
// from which lanes over channels sum dq.
template <class T>
__device__ void cluster_attention_backward_query_impl(const AttentionBackwardParams bp) {
  AF_DYNAMIC_SHARED(float, shared);
  const AttentionParams& p = bp.forward;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int d = p.head_dim, c = p.heads * d, m = p.m;
  const size_t item = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // row·heads + t
  if (item >= size_t(p.batch) * p.tokens * p.heads) return;
  float* da = shared + (threadIdx.x / 32) * m;
  const size_t row = item / p.heads;
  const int t = int(item % p.heads);
  const int img = int(row / p.tokens), i = int(row % p.tokens);
  const size_t nbhd_row = (size_t(p.nbhd_images == 1 ? 0 : img) * p.tokens + i) * m;
  const int32_t* nbrs = p.nbhd ? p.nbhd + nbhd_row : nullptr;
  const uint8_t* mask = p.mask ? p.mask + nbhd_row : nullptr;
  const float* pos = p.pos + size_t(img) * p.tokens * 2;
  const T* kv = static_cast<const T*>(p.kv) + size_t(img) * p.tokens * 2 * c;
  const T* q_row = static_cast<const T*>(p.q) + row * c;
  const T* go = static_cast<const T*>(bp.grad_out) + row * c + t * d;
  const T* o = static_cast<const T*>(bp.out) + row * c + t * d;
  const float* bk = p.blank_k + t * d;
  const float* bv = p.blank_v + t * d;

  // The log-sum-exp over the neighbours and the blank token; D = dO·O.
  float blank = 0.0f, delta = 0.0f;
  for (int e = lane; e < d; e += 32) {
    blank += to_f32(q_row[t * d + e]) * p.q_scale * bk[e];
    delta += to_f32(go[e]) * to_f32(o[e]);
  }
  blank = warp_sum(blank);
  delta = warp_sum(delta);
  float local_max = blank;
  for (int s = lane; s < m; s += 32) {
    const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
    float f[5];
    da[s] = slot_logit(p, q_row, kv + size_t(j) * 2 * c + t * 2 * d, pos, i, j, t,
                       mask && !mask[s], f);
    local_max = fmaxf(local_max, da[s]);
  }
  const float max = warp_max(local_max);
  float sum = lane == 0 ? expf(blank - max) : 0.0f;
  for (int s = lane; s < m; s += 32) sum += expf(da[s] - max);
  const float lse = max + logf(warp_sum(sum));

  // da per slot (replacing its logit) and the position-bias shares.
  float dpos[6] = {};  // pos_weight (5), pos_bias
  for (int s = lane; s < m; s += 32) {
    const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
    const T* key = kv + size_t(j) * 2 * c + t * 2 * d;
    float f[5];
    neighbour_features(pos, i, j, p.offset_clamp, f);
    const float prob = expf(da[s] - lse);
    const float g = prob * (row_dot(go, key + d, d) - delta);
    da[s] = g;
    for (int k = 0; k < 5; ++k) dpos[k] += g * f[k];
    dpos[5] += g;
  }
  for (int k = 0; k < 6; ++k) dpos[k] = warp_sum(dpos[k]);
  __syncwarp();

  const float p_blank = expf(blank - lse);
  float dp_blank = 0.0f;
  for (int e = lane; e < d; e += 32) dp_blank += to_f32(go[e]) * bv[e];
  const float da_blank = p_blank * (warp_sum(dp_blank) - delta);
  T* grad_q = static_cast<T*>(bp.grad_q) + row * c + t * d;
  float* part = bp.row_partials + row * size_t(6 * p.heads + 2 * c);
  for (int e = lane; e < d; e += 32) {
    float acc = da_blank * bk[e];
    for (int s = 0; s < m; ++s) {
      const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
      acc += da[s] * to_f32(kv[size_t(j) * 2 * c + t * 2 * d + e]);
    }
    const float qs = to_f32(q_row[t * d + e]) * p.q_scale;
    grad_q[e] = from_f32<T>(acc * p.q_scale);
    part[6 * p.heads + t * d + e] = da_blank * qs;                // blank_k
    part[6 * p.heads + c + t * d + e] = p_blank * to_f32(go[e]);  // blank_v
  }
  if (lane == 0) {
    for (int k = 0; k < 5; ++k) part[5 * t + k] = dpos[k];
    part[5 * p.heads + t] = dpos[5];
    bp.lse[item] = lse;
    bp.delta[item] = delta;
  }
}

// The key kernel. The pairs holding the key are taken 32 at a time, a lane
// each (its whole logit, p and da), staged in shared memory (3 × 32 floats
// per warp); then lanes over channels add them to dk and dv in pair order.
template <class T>
__device__ void cluster_attention_backward_key_impl(const AttentionBackwardParams bp) {
  AF_DYNAMIC_SHARED(float, shared);
  const AttentionParams& p = bp.forward;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int d = p.head_dim, c = p.heads * d, m = p.m;
  const size_t item = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // key row·heads + t
  if (item >= size_t(p.batch) * p.tokens * p.heads) return;
  float* staged_da = shared + (threadIdx.x / 32) * 3 * 32;
  float* staged_p = staged_da + 32;
  int* staged_query = reinterpret_cast<int*>(staged_p + 32);
  const size_t row = item / p.heads;
  const int t = int(item % p.heads);
  const int img = int(row / p.tokens), j = int(row % p.tokens);
  const int list = p.nbhd_images == 1 ? 0 : img;
  const float* pos = p.pos + size_t(img) * p.tokens * 2;
  const T* key = static_cast<const T*>(p.kv) + row * 2 * c + t * 2 * d;
  const T* q_img = static_cast<const T*>(p.q) + size_t(img) * p.tokens * c;
  const T* go_img = static_cast<const T*>(bp.grad_out) + size_t(img) * p.tokens * c;
  float dk[kMaxPerLane] = {}, dv[kMaxPerLane] = {};
  const InversePairs holders = inverse_pairs(bp.inv_start, bp.inv_pairs, list, p.tokens, m, j);
  const int first = holders.first, last = holders.last;
  for (int base = first; base < last; base += 32) {
    const int e = base + lane;
    if (e < last) {
      const int i = holders.query(e), slot = holders.slot(e);
      const size_t qrow = size_t(img) * p.tokens + i;
      const bool masked = p.mask && !p.mask[(size_t(list) * p.tokens + i) * m + slot];
      float f[5];
      const float a = slot_logit(p, q_img + size_t(i) * c, key, pos, i, j, t, masked, f);
      const float prob = expf(a - bp.lse[qrow * p.heads + t]);
      const float dp = row_dot(go_img + size_t(i) * c + t * d, key + d, d);
      staged_da[lane] = prob * (dp - bp.delta[qrow * p.heads + t]);
      staged_p[lane] = prob;
      staged_query[lane] = i;
    }
    __syncwarp();
    const int count = last - base < 32 ? last - base : 32;
    for (int r = 0, ch = lane; ch < d; ++r, ch += 32) {
      for (int u = 0; u < count; ++u) {
        const size_t qi = size_t(staged_query[u]) * c + t * d + ch;
        dk[r] += staged_da[u] * to_f32(q_img[qi]) * p.q_scale;
        dv[r] += staged_p[u] * to_f32(go_img[qi]);
      }
    }
    __syncwarp();
  }
  T* grad = static_cast<T*>(bp.grad_kv) + row * 2 * c + t * 2 * d;
  for (int r = 0, ch = lane; ch < d; ++r, ch += 32) {
    grad[ch] = from_f32<T>(dk[r]);
    grad[d + ch] = from_f32<T>(dv[r]);
  }
}

AF_KERNEL_ALL_TYPES(cluster_attention_backward_query, AttentionBackwardParams,
                    cluster_attention_backward_query_impl)
AF_KERNEL_ALL_TYPES(cluster_attention_backward_key, AttentionBackwardParams,
                    cluster_attention_backward_key_impl)
