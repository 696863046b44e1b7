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
//    Or, for neighbourhoods of whole clusters, its tiled variant
//    (cluster_attention_backward_key_tiled): the same gather with the
//    query rows a key cluster's members share staged once per block.
// 3. column_sums (kernels/tensor_ops.cu) adds the rows' shares of the
//    parameter gradients, in a fixed order.
#include "common.cuh"

constexpr float kMaskedLogitBackward = -100.0f;  // as the forward
// Channels per lane kept in registers: head dims up to 32·8 = 256.
constexpr int kMaxPerLane = 8;

// The logit of neighbour j of query i (head t), by one thread: the scaled
// query (head t's channels, `q_head`) and the key over all d channels, the
// position bias and the mask. Where the rows are read from (global or
// shared memory, stored or as f32) changes no bit.
template <class Q, class K>
__device__ __forceinline__ float slot_logit(const AttentionParams& p, const Q* q_head, const K* key,
                                            const float* pos, int i, int j, int t, bool masked,
                                            float f[5]) {
  const int d = p.head_dim;
  float acc = 0.0f;
  for (int e = 0; e < d; ++e) acc += to_f32(q_head[e]) * p.q_scale * to_f32(key[e]);
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
    da[s] = slot_logit(p, q_row + t * d, kv + size_t(j) * 2 * c + t * 2 * d, pos, i, j, t,
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
      const float a = slot_logit(p, q_img + size_t(i) * c + t * d, key, pos, i, j, t, masked, f);
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

// Where `query` sits among the `staged` sorted query ids, or −1: `guess`
// first (a cluster's members have the same holders, so a member's e-th pair
// is mostly the e-th staged row), then a binary search.
__device__ __forceinline__ int find_staged(const int* ids, int staged, int query, int guess) {
  if (guess >= 0 && guess < staged && ids[guess] == query) return guess;
  int lo = 0, hi = staged;  // the first id ≥ query
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ids[mid] < query) lo = mid + 1;
    else hi = mid;
  }
  return lo < staged && ids[lo] == query ? lo : -1;
}

// The tiled key kernel, for neighbourhoods of whole clusters (spec §4): one
// block per key cluster (S members, a warp each) over all heads. A query
// whose neighbourhood holds one member of a cluster holds every member (in
// slots r·S + member), so the members' inverse lists name the same ~m
// queries. Per head, the block stages the q and dO rows, lse and D of the
// first member's holders (at most staged_queries: the rest are read from
// global memory, as is any query a member's list holds beyond them); each
// warp then gathers its key's pairs as the kernel above does, the same
// pairs in the same order with the same arithmetic, so the same bits, but
// reading the rows from shared memory: the query rows cross L2 once per
// cluster instead of once per member.
//
// Shared memory: staged query ids, lse and D (staged_queries each); per
// warp, this head's key and value (2·d floats) and 32 staged pairs (da, p,
// query, staged row); then the q rows and the dO rows, staged_queries each,
// staged_row_stride elements of T (an odd number of 4-byte words: lanes
// scoring different pairs read different banks).
template <class T>
__device__ void cluster_attention_backward_key_tiled_impl(const AttentionBackwardParams bp) {
  AF_DYNAMIC_SHARED(float, shared);
  const AttentionParams& p = bp.forward;
  const int s = p.cluster_size, d = p.head_dim, c = p.heads * d, m = p.m;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int capacity = bp.staged_queries, row_stride = bp.staged_row_stride;
  const int clusters = (p.tokens + s - 1) / s;
  const int img = blockIdx.x / clusters, key_cluster = blockIdx.x - img * clusters;
  const int j = key_cluster * s + warp;  // this warp's key token
  const bool has_key = j < p.tokens;
  const int list = p.nbhd_images == 1 ? 0 : img;

  int* staged_ids = reinterpret_cast<int*>(shared);
  float* staged_lse = shared + capacity;
  float* staged_delta = staged_lse + capacity;
  float* key_row = staged_delta + capacity + warp * (2 * d + 4 * 32);  // d
  float* value_row = key_row + d;                                      // d
  float* pair_da = value_row + d;                                      // 32
  float* pair_p = pair_da + 32;                                        // 32
  int* pair_query = reinterpret_cast<int*>(pair_p + 32);               // 32
  int* pair_row = pair_query + 32;  // 32: the staged row's first element, or −1
  T* q_rows = reinterpret_cast<T*>(staged_delta + capacity + warps * (2 * d + 4 * 32));
  T* go_rows = q_rows + size_t(capacity) * row_stride;

  const float* pos = p.pos + size_t(img) * p.tokens * 2;
  const T* q_img = static_cast<const T*>(p.q) + size_t(img) * p.tokens * c;
  const T* go_img = static_cast<const T*>(bp.grad_out) + size_t(img) * p.tokens * c;
  const T* key = static_cast<const T*>(p.kv) + (size_t(img) * p.tokens + (has_key ? j : 0)) * 2 * c;
  const InversePairs lead =
      inverse_pairs(bp.inv_start, bp.inv_pairs, list, p.tokens, m, key_cluster * s);
  const int staged = lead.last - lead.first < capacity ? lead.last - lead.first : capacity;
  for (int u = threadIdx.x; u < staged; u += blockDim.x) staged_ids[u] = lead.query(lead.first + u);
  const InversePairs holders = inverse_pairs(bp.inv_start, bp.inv_pairs, list, p.tokens, m, has_key ? j : 0);
  __syncthreads();

  for (int t = 0; t < p.heads; ++t) {
    // Stage this head's rows of the holders: a warp per row, lanes over
    // channels (coalesced); and each warp's key and value.
    for (int u = warp; u < staged; u += warps) {
      const size_t qrow = size_t(staged_ids[u]);
      for (int ch = lane; ch < d; ch += 32) {
        q_rows[u * row_stride + ch] = q_img[qrow * c + t * d + ch];
        go_rows[u * row_stride + ch] = go_img[qrow * c + t * d + ch];
      }
      if (lane == 0) {
        const size_t at = (size_t(img) * p.tokens + qrow) * p.heads + t;
        staged_lse[u] = bp.lse[at];
        staged_delta[u] = bp.delta[at];
      }
    }
    for (int ch = lane; ch < d; ch += 32) {
      key_row[ch] = to_f32(key[t * 2 * d + ch]);
      value_row[ch] = to_f32(key[t * 2 * d + d + ch]);
    }
    __syncthreads();

    if (has_key) {
      float dk[kMaxPerLane] = {}, dv[kMaxPerLane] = {};
      for (int base = holders.first; base < holders.last; base += 32) {
        const int e = base + lane;
        int u = 0;  // past the list: counts as staged
        if (e < holders.last) {
          const int i = holders.query(e), slot = holders.slot(e);
          u = find_staged(staged_ids, staged, i, e - holders.first);
          const size_t qrow = size_t(img) * p.tokens + i;
          const bool masked = p.mask && !p.mask[(size_t(list) * p.tokens + i) * m + slot];
          float f[5];
          float a, lse, delta, dp;
          if (u >= 0) {
            a = slot_logit(p, q_rows + u * row_stride, key_row, pos, i, j, t, masked, f);
            lse = staged_lse[u];
            delta = staged_delta[u];
            dp = row_dot(go_rows + u * row_stride, value_row, d);
          } else {
            a = slot_logit(p, q_img + size_t(i) * c + t * d, key_row, pos, i, j, t, masked, f);
            lse = bp.lse[qrow * p.heads + t];
            delta = bp.delta[qrow * p.heads + t];
            dp = row_dot(go_img + size_t(i) * c + t * d, value_row, d);
          }
          const float prob = expf(a - lse);
          pair_da[lane] = prob * (dp - delta);
          pair_p[lane] = prob;
          pair_query[lane] = i;
          pair_row[lane] = u >= 0 ? u * row_stride : -1;
        }
        // Mostly every pair of the batch is staged: then the sums below
        // take no branch per pair (the same arithmetic either way).
        const bool all_staged = __ballot_sync(0xffffffffu, u >= 0) == 0xffffffffu;
        __syncwarp();
        const int count = holders.last - base < 32 ? holders.last - base : 32;
        for (int r = 0, ch = lane; ch < d; ++r, ch += 32) {
          float k_acc = dk[r], v_acc = dv[r];
          if (all_staged) {
            for (int v = 0; v < count; ++v) {
              const int at = pair_row[v] + ch;
              k_acc += pair_da[v] * to_f32(q_rows[at]) * p.q_scale;
              v_acc += pair_p[v] * to_f32(go_rows[at]);
            }
          } else {
            for (int v = 0; v < count; ++v) {
              const int at = pair_row[v];
              float qv, gv;
              if (at >= 0) {
                qv = to_f32(q_rows[at + ch]);
                gv = to_f32(go_rows[at + ch]);
              } else {
                const size_t qi = size_t(pair_query[v]) * c + t * d + ch;
                qv = to_f32(q_img[qi]);
                gv = to_f32(go_img[qi]);
              }
              k_acc += pair_da[v] * qv * p.q_scale;
              v_acc += pair_p[v] * gv;
            }
          }
          dk[r] = k_acc;
          dv[r] = v_acc;
        }
        __syncwarp();
      }
      T* grad = static_cast<T*>(bp.grad_kv) + (size_t(img) * p.tokens + j) * 2 * c + t * 2 * d;
      for (int r = 0, ch = lane; ch < d; ++r, ch += 32) {
        grad[ch] = from_f32<T>(dk[r]);
        grad[d + ch] = from_f32<T>(dv[r]);
      }
    }
    __syncthreads();  // the staged rows are rewritten for the next head
  }
}

AF_KERNEL_ALL_TYPES(cluster_attention_backward_query, AttentionBackwardParams,
                    cluster_attention_backward_query_impl)
AF_KERNEL_ALL_TYPES(cluster_attention_backward_key, AttentionBackwardParams,
                    cluster_attention_backward_key_impl)
AF_KERNEL_ALL_TYPES_BOUNDED(cluster_attention_backward_key_tiled, AttentionBackwardParams,
                            cluster_attention_backward_key_tiled_impl, 32 * 32)
