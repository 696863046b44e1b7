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

// One warp stages the relative-position features of query i's m neighbours
// (5 × m) in its shared scratch. A null `nbrs` means global attention:
// neighbour s is token s.
__device__ __forceinline__ void load_features(const AttentionParams& p, const float* pos, int i,
                                              const int32_t* nbrs, float* features) {
  const int lane = threadIdx.x % 32, m = p.m;
  for (int s = lane; s < m; s += 32) {
    float f[5];
    neighbour_features(pos, i, nbrs ? clamp_index(nbrs[s], p.tokens) : s, p.offset_clamp, f);
    for (int k = 0; k < 5; ++k) features[k * m + s] = f[k];
  }
  // Kept for any reader, though today's callers need none: until their next
  // barrier each lane reads back only what it wrote (the race check passes
  // without it).
  __syncwarp();
}

// One warp stages `count` channels of a query row from channel `first`,
// scaled, in its shared scratch (lane e % 32 writes channel e; the caller
// orders the reads).
template <class T>
__device__ __forceinline__ void load_query(const AttentionParams& p, const T* q, int first,
                                           int count, float* query) {
  for (int e = threadIdx.x % 32; e < count; e += 32) query[e] = to_f32(q[first + e]) * p.q_scale;
}

// What a neighbour slot adds to its logit besides q·k: the position bias
// P_t(f) of head t from the slot's features f, and −100 when masked.
__device__ __forceinline__ float position_bias(const AttentionParams& p, int t, const float f[5],
                                               bool masked) {
  float bias = p.pos_bias[t];
  for (int k = 0; k < 5; ++k) bias += p.pos_weight[5 * t + k] * f[k];
  return masked ? bias + kMaskedLogit : bias;
}

// position_bias of slot `s` from the features staged by load_features.
__device__ __forceinline__ float bias_and_mask(const AttentionParams& p, int t,
                                               const float* features, int m, int s,
                                               const uint8_t* mask) {
  float f[5];
  for (int k = 0; k < 5; ++k) f[k] = features[k * m + s];
  return position_bias(p, t, f, mask && !mask[s]);
}

// The softmax over one query's m neighbour logits and the blank token
// (logit q·blank_k), by the whole warp: turns `logits` into unnormalised
// weights, sets the blank token's weight, and returns 1 / (sum of weights),
// applied after the weighted sum of values (d multiplies instead of m + 1).
__device__ __forceinline__ float softmax_with_blank(float* logits, int m, float local_max,
                                                    const float* qt, const float* blank_k,
                                                    int d, float* blank_weight) {
  const int lane = threadIdx.x % 32;
  float blank = 0.0f;
  for (int e = lane; e < d; e += 32) blank += qt[e] * blank_k[e];
  blank = warp_sum(blank);
  const float max = warp_max(fmaxf(local_max, blank));
  float sum = 0.0f;
  for (int s = lane; s < m; s += 32) {
    const float w = expf(logits[s] - max);
    logits[s] = w;
    sum += w;
  }
  *blank_weight = expf(blank - max);
  const float inv_sum = 1.0f / (warp_sum(sum) + *blank_weight);
  __syncwarp();
  return inv_sum;
}

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

  load_query(p, q, 0, c, query);
  load_features(p, pos, i, nbrs, features);

  for (int t = 0; t < p.heads; ++t) {
    const float* qt = query + t * d;
    // One neighbour at a time, lanes over its key's channels: each key row
    // is read by consecutive lanes (coalesced), then summed by the warp.
    for (int s = 0; s < m; ++s) {
      const int j = nbrs ? clamp_index(nbrs[s], p.tokens) : s;
      const T* key = kv + size_t(j) * 2 * c + t * 2 * d;
      float partial = 0.0f;
      for (int e = lane; e < d; e += 32) partial += qt[e] * to_f32(key[e]);
      const float dot = warp_sum(partial);
      if (lane == 0) logits[s] = dot;
    }
    __syncwarp();
    float local_max = negative_infinity();
    for (int s = lane; s < m; s += 32) {
      const float logit = logits[s] + bias_and_mask(p, t, features, m, s, mask);
      logits[s] = logit;
      local_max = fmaxf(local_max, logit);
    }
    float blank_weight;
    const float inv_sum = softmax_with_blank(logits, m, local_max, qt, p.blank_k + t * d, d, &blank_weight);
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

// Channels e and e + 1 of a shared-memory tile row (e even, the row 4-byte
// aligned): one 32-bit load for the 2-byte types, two loads for f32 (whose
// rows, an odd number of words long, are not 8-byte aligned). Without
// `has_hi` (e + 1 is past an odd head's channels) `hi` is the 2-byte row's
// padding, unused, and f32 reads nothing there: its rows have none.
template <class T>
__device__ __forceinline__ void row_pair(const T* row, int e, bool has_hi, float& lo, float& hi) {
  if constexpr (sizeof(T) == 2) {
    word_to_f32<T>(load_word(row + e), lo, hi);
  } else {
    lo = to_f32(row[e]);
    hi = has_hi ? to_f32(row[e + 1]) : 0.0f;
  }
}

// query · row over d channels, in channel order (the bits of a loop over
// single channels), two channels per step: the staged query (f32, 8-byte
// aligned) in one 64-bit load, the row's pair as row_pair reads it.
template <class T>
__device__ __forceinline__ float tile_dot(const float* query, const T* row, int d) {
  float acc = 0.0f;
  const int pairs = d / 2;
#ifdef __CUDACC__  // (the emulator's compiler does not know the pragma)
#pragma unroll 8
#endif
  for (int k = 0; k < pairs; ++k) {
    const float2 q = load_float2(query + 2 * k);
    float k0, k1;
    row_pair(row, 2 * k, true, k0, k1);
    acc += q.x * k0;
    acc += q.y * k1;
  }
  if (d % 2 != 0) acc += query[d - 1] * to_f32(row[d - 1]);
  return acc;
}

// The tiled variant, for neighbour lists made of whole clusters (spec §4):
// one block per query cluster (S queries, one warp each). The S queries
// mostly share their nearest clusters, so the block stages, per head, the
// keys and values of the union of their neighbour clusters in shared memory
// once, instead of each query gathering its own from L2. Clusters beyond
// the tile's capacity are read from global memory, as the generic kernel does.
//
// The cluster size S is a template parameter for the sizes the presets use
// (every index split by S is then a multiply and shift); S = 0 reads it from
// the parameters (any other size). Inner loops run over (cluster, member)
// pairs, so they divide by nothing.
//
// Shared memory: two int arrays of S·nnc (the union bookkeeping), each
// warp's scratch (this head's scaled query, d; logits, m + 1; and, when
// features_stored, the neighbours' features, 5·m; rounded up to an even
// number of floats, so each query is 8-byte aligned), then the tile: the keys
// of tile_clusters·S rows, then their values, in the storage type T (the
// conversion to f32 is exact either way, and 2-byte types fit twice the
// rows), each row tile_row_stride elements (an odd number of 4-byte words:
// lanes reading consecutive rows hit different banks). Recomputing the
// features per head costs a square root and two divisions per slot, and
// frees 5·m floats per warp: the wrapper chooses (see `attention_plan`).
template <class T, int S>
__device__ void cluster_attention_tiled_impl(const AttentionParams p) {
  AF_DYNAMIC_SHARED(float, shared);
  const int s = S > 0 ? S : p.cluster_size, d = p.head_dim, c = p.heads * d, m = p.m;
  const int nnc = m / s, entries = m, row_stride = p.tile_row_stride;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int clusters = (p.tokens + s - 1) / s;
  const int img = blockIdx.x / clusters, query_cluster = blockIdx.x - img * clusters;
  const int i = query_cluster * s + warp;  // this warp's query token
  const bool has_query = i < p.tokens;

  int* slot_base = reinterpret_cast<int*>(shared);  // entries: union index of (query, r)
  int* union_ids = slot_base + entries;             // entries: the distinct clusters
  int* union_count = union_ids + entries;           // 1
  const int ints = ((2 * entries + 1 + 3) / 4) * 4;
  const int per_warp = (d + m + 1 + (p.features_stored ? 5 * m : 0) + 1) & ~1;
  float* query = shared + ints + warp * per_warp;  // d: this head's
  float* logits = query + d;                       // m + 1
  float* features = logits + m + 1;                // 5 × m, when stored
  T* key_tile = reinterpret_cast<T*>(shared + ints + s * per_warp);  // tile_clusters·S × row_stride
  T* value_tile = key_tile + p.tile_clusters * s * row_stride;

  const size_t nbhd_image = size_t(p.nbhd_images == 1 ? 0 : img) * p.tokens;
  const int32_t* nbrs = p.nbhd + (nbhd_image + (has_query ? i : 0)) * m;
  const uint8_t* mask = p.mask ? p.mask + (nbhd_image + (has_query ? i : 0)) * m : nullptr;
  const float* pos = p.pos + size_t(img) * p.tokens * 2;
  const T* kv = static_cast<const T*>(p.kv) + size_t(img) * p.tokens * 2 * c;

  // The union of the block's neighbour clusters in order of first
  // appearance (warp 0; entries ≤ 1024), 32 entries (query, r) at a time:
  // each looks its cluster up among those found so far (a union is ~1.5
  // nnc clusters on the model's layouts), and a chunk's new clusters are
  // numbered by the lowest lane holding each, through warp votes.
  if (warp == 0) {
    int count = 0;
    for (int e0 = 0; e0 < entries; e0 += 32) {
      const int e = e0 + lane;
      int id = -1;  // none: past the entries, or a padding query's
      if (e < entries) {
        const int member = e / nnc, r = e - member * nnc;  // once per entry
        const int q = query_cluster * s + member;
        if (q < p.tokens) id = clamp_index(p.nbhd[(nbhd_image + q) * m + r * s], p.tokens) / s;
      }
      int base = -1;
      for (int u = 0; u < count && base < 0; ++u)
        if (union_ids[u] == id) base = u;
      const bool fresh = id >= 0 && base < 0;
      const unsigned holders = __match_any_sync(0xffffffffu, fresh ? id : -1);
      const int leader = __ffs(int(holders)) - 1;
      const unsigned leaders = __ballot_sync(0xffffffffu, fresh && leader == lane);
      if (fresh) base = count + __popc(leaders & ((1u << leader) - 1u));
      if (fresh && leader == lane) union_ids[base] = id;
      if (e < entries) slot_base[e] = base;
      count += __popc(leaders);
      __syncwarp();  // the next chunk looks up this one's clusters
    }
    if (lane == 0) *union_count = count;
  }

  // Each query's features, as the generic kernel, when kept for all heads.
  if (has_query && p.features_stored) load_features(p, pos, i, nbrs, features);
  __syncthreads();
  const int staged = *union_count < p.tile_clusters ? *union_count : p.tile_clusters;
  const int* my_bases = slot_base + warp * nnc;  // union index of each of my clusters

  for (int t = 0; t < p.heads; ++t) {
    // Stage this head's keys and values of the first `staged` clusters: a
    // warp per row, lanes over channels (coalesced reads).
    for (int row = warp; row < staged * s; row += warps) {
      const int u = row / s;
      const int member = union_ids[u] * s + (row - u * s);
      const int token = member < p.tokens ? member : 0;  // padding reads token 0, as its slot does
      const T* at = kv + size_t(token) * 2 * c + t * 2 * d;
      for (int ch = lane; ch < d; ch += 32) {
        key_tile[row * row_stride + ch] = at[ch];
        value_tile[row * row_stride + ch] = at[d + ch];
      }
    }
    __syncthreads();
    if (has_query) {
      load_query(p, static_cast<const T*>(p.q) + (size_t(img) * p.tokens + i) * c, t * d, d, query);
      __syncwarp();  // each lane scores its slots with all d channels
      float local_max = negative_infinity();
      for (int sl = lane; sl < m; sl += 32) {
        const int r = sl / s;
        const int base = my_bases[r];
        float logit = 0.0f;
        if (base < staged) {
          logit = tile_dot(query, key_tile + (base * s + (sl - r * s)) * row_stride, d);
        } else {
          const T* key = kv + size_t(clamp_index(nbrs[sl], p.tokens)) * 2 * c + t * 2 * d;
          for (int e = 0; e < d; ++e) logit += query[e] * to_f32(key[e]);
        }
        float f[5];
        if (p.features_stored) {
          for (int k = 0; k < 5; ++k) f[k] = features[k * m + sl];
        } else {
          neighbour_features(pos, i, clamp_index(nbrs[sl], p.tokens), p.offset_clamp, f);
        }
        logit += position_bias(p, t, f, mask && !mask[sl]);
        logits[sl] = logit;
        local_max = fmaxf(local_max, logit);
      }
      float blank_weight;
      const float inv_sum = softmax_with_blank(logits, m, local_max, query, p.blank_k + t * d, d, &blank_weight);
      T* out = static_cast<T*>(p.out) + (size_t(img) * p.tokens + i) * c + t * d;
      // Lanes over channel pairs (row_pair's), so a head of up to 32
      // channels needs 16 lanes: the warp's halves then take alternate
      // clusters and add their sums in one shuffle. Pairs past d (an odd
      // head's last) are summed from the row's padding and never written.
      const int row_lanes = (d + 1) / 2;
      const int halves = row_lanes <= 16 ? 2 : 1;
      const int half = halves == 2 ? lane / 16 : 0;
      const int step = 32 / halves;
      for (int first = 0; first < row_lanes; first += step) {  // the same trips for all lanes
        const int e = 2 * (first + lane % step);
        const bool active = e < d;
        float acc0 = 0.0f, acc1 = 0.0f;
        for (int r = half; active && r < nnc; r += halves) {
          const int base = my_bases[r];
          const float* weights = logits + r * s;
          if (base < staged) {
            const T* values = value_tile + base * s * row_stride + e;
            for (int k = 0; k < s; ++k) {
              float v0, v1;
              row_pair(values + k * row_stride, 0, e + 1 < d, v0, v1);
              acc0 += weights[k] * v0;
              acc1 += weights[k] * v1;
            }
          } else {
            for (int k = 0; k < s; ++k) {
              const T* v = kv + size_t(clamp_index(nbrs[r * s + k], p.tokens)) * 2 * c + t * 2 * d + d + e;
              acc0 += weights[k] * to_f32(v[0]);
              if (e + 1 < d) acc1 += weights[k] * to_f32(v[1]);
            }
          }
        }
        if (halves == 2) {
          acc0 += __shfl_xor_sync(0xffffffffu, acc0, 16);
          acc1 += __shfl_xor_sync(0xffffffffu, acc1, 16);
        }
        if (active && half == 0) {
          out[e] = from_f32<T>((acc0 + blank_weight * p.blank_v[t * d + e]) * inv_sum);
          if (e + 1 < d) out[e + 1] = from_f32<T>((acc1 + blank_weight * p.blank_v[t * d + e + 1]) * inv_sum);
        }
      }
    }
    __syncthreads();  // the tile is rewritten for the next head
  }
}

// The instances: cluster sizes 6, 8 and 24 (the presets'), and any other.
template <class T>
__device__ void cluster_attention_tiled_s6_impl(const AttentionParams p) { cluster_attention_tiled_impl<T, 6>(p); }
template <class T>
__device__ void cluster_attention_tiled_s8_impl(const AttentionParams p) { cluster_attention_tiled_impl<T, 8>(p); }
template <class T>
__device__ void cluster_attention_tiled_s24_impl(const AttentionParams p) { cluster_attention_tiled_impl<T, 24>(p); }
template <class T>
__device__ void cluster_attention_tiled_any_impl(const AttentionParams p) { cluster_attention_tiled_impl<T, 0>(p); }

AF_KERNEL_ALL_TYPES_BOUNDED(cluster_attention_tiled_s6, AttentionParams, cluster_attention_tiled_s6_impl, 6 * 32)
AF_KERNEL_ALL_TYPES_BOUNDED(cluster_attention_tiled_s8, AttentionParams, cluster_attention_tiled_s8_impl, 8 * 32)
AF_KERNEL_ALL_TYPES_BOUNDED(cluster_attention_tiled_s24, AttentionParams, cluster_attention_tiled_s24_impl, 24 * 32)
AF_KERNEL_ALL_TYPES_BOUNDED(cluster_attention_tiled_any, AttentionParams, cluster_attention_tiled_any_impl, 32 * 32)
