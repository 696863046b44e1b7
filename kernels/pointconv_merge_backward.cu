// Backward of the PointConv merge (spec §7); the CPU reference is
// src/ops/pointconv_merge/backward.rs. Deterministic: no float atomics.
//
// 1. pointconv_merge_backward_clear / _centres: each token's output row if it
//    is a centre (−1 otherwise), so step 3 can tell centres apart.
// 2. pointconv_merge_backward_rows: one warp per centre, lane per neighbour
//    slot: the weight net GELU(LN(Linear(5 → 4)(f))) recomputed from the
//    positions and differentiated from dW = mask·p_j·(dU·x_j); the centre's
//    share of the 32 weight-net parameter gradients, warp-summed.
// 3. pointconv_merge_backward_tokens: one warp per token: its feature and
//    importance gradients gathered over the (centre, slot) pairs holding it
//    (inverse lists), 32 pairs at a time staged in shared memory.
// 4. column_sums (kernels/tensor_ops.cu) adds the centres' shares of the
//    weight-net gradients, in a fixed order.
#include "common.cuh"

constexpr int kInnerBackward = 4;
constexpr int kNetParams = 32;  // net_weight 4×5, net_bias 4, norm_weight 4, norm_bias 4

// The weight net's forward for one offset: z = Linear(f), ẑ = LN's
// normalised z, its 1/σ, and the output w = GELU(ẑ·γ + β).
__device__ __forceinline__ void weight_net_forward(const MergeParams& p, const float f[5],
                                                   float zhat[kInnerBackward], float* inv_std,
                                                   float w[kInnerBackward]) {
  float z[kInnerBackward];
  for (int o = 0; o < kInnerBackward; ++o) {
    z[o] = p.net_bias[o];
    for (int k = 0; k < 5; ++k) z[o] += p.net_weight[5 * o + k] * f[k];
  }
  const float mean = (((z[0] + z[1]) + z[2]) + z[3]) / 4.0f;
  float var = 0.0f;
  for (int o = 0; o < kInnerBackward; ++o) var += (z[o] - mean) * (z[o] - mean);
  *inv_std = 1.0f / sqrtf(var / 4.0f + p.eps);
  for (int o = 0; o < kInnerBackward; ++o) {
    zhat[o] = (z[o] - mean) * *inv_std;
    w[o] = gelu(zhat[o] * p.norm_weight[o] + p.norm_bias[o]);
  }
}

__device__ void pointconv_merge_backward_clear_impl(const MergeBackwardParams bp) {
  const size_t t = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < size_t(bp.forward.batch) * bp.forward.n) bp.centre_row[t] = -1;
}

__device__ void pointconv_merge_backward_centres_impl(const MergeBackwardParams bp) {
  const MergeParams& p = bp.forward;
  const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= size_t(p.batch) * p.kept) return;
  const int img = int(e / p.kept);
  bp.centre_row[size_t(img) * p.n + clamp_index(p.centres[e], p.n)] = int(e % p.kept);
}

template <class T>
__device__ void pointconv_merge_backward_rows_impl(const MergeBackwardParams bp) {
  const MergeParams& p = bp.forward;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int m = p.m, C = p.channels;
  const size_t e = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // img·kept + r
  if (e >= size_t(p.batch) * p.kept) return;
  const int img = int(e / p.kept);
  const int i = clamp_index(p.centres[e], p.n);
  const size_t nbhd_row = (size_t(p.nbhd_images == 1 ? 0 : img) * p.n + i) * m;
  const int32_t* nbrs = p.nbhd ? p.nbhd + nbhd_row : nullptr;
  const uint8_t* mask = p.mask ? p.mask + nbhd_row : nullptr;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  const T* feat = static_cast<const T*>(p.feat) + size_t(img) * p.n * C;
  const T* du = static_cast<const T*>(bp.grad_out) + e * kInnerBackward * C;
  float part[kNetParams] = {};
  for (int s = lane; s < m; s += 32) {
    if (mask && !mask[s]) continue;  // weight 0 whatever the net says
    const int j = nbrs ? clamp_index(nbrs[s], p.n) : s;
    const float scale = p.importance[size_t(img) * p.n + j];
    float f[5], zhat[kInnerBackward], inv_std, w[kInnerBackward];
    neighbour_features(pos, i, j, p.offset_clamp, f);
    weight_net_forward(p, f, zhat, &inv_std, w);
    float dy[kInnerBackward], dzhat[kInnerBackward];
    for (int o = 0; o < kInnerBackward; ++o) {
      float g = 0.0f;
      for (int c = 0; c < C; ++c) g += to_f32(du[o * C + c]) * to_f32(feat[size_t(j) * C + c]);
      const float y = zhat[o] * p.norm_weight[o] + p.norm_bias[o];
      dy[o] = scale * g * gelu_grad(y);
      dzhat[o] = dy[o] * p.norm_weight[o];
    }
    const float mean_dzhat = (((dzhat[0] + dzhat[1]) + dzhat[2]) + dzhat[3]) / 4.0f;
    float mean_dzhat_zhat = 0.0f;
    for (int o = 0; o < kInnerBackward; ++o) mean_dzhat_zhat += dzhat[o] * zhat[o];
    mean_dzhat_zhat /= 4.0f;
    for (int o = 0; o < kInnerBackward; ++o) {
      const float dz = inv_std * (dzhat[o] - mean_dzhat - zhat[o] * mean_dzhat_zhat);
      for (int k = 0; k < 5; ++k) part[5 * o + k] += dz * f[k];
      part[20 + o] += dz;
      part[24 + o] += dy[o] * zhat[o];
      part[28 + o] += dy[o];
    }
  }
  float* out = bp.row_partials + e * kNetParams;
  for (int k = 0; k < kNetParams; ++k) {
    const float total = warp_sum(part[k]);
    if (lane == 0) out[k] = total;
  }
}

template <class T>
__device__ void pointconv_merge_backward_tokens_impl(const MergeBackwardParams bp) {
  AF_DYNAMIC_SHARED(float, shared);
  const MergeParams& p = bp.forward;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int m = p.m, C = p.channels;
  const size_t row = size_t(blockIdx.x) * warps + threadIdx.x / 32;  // img·n + j
  if (row >= size_t(p.batch) * p.n) return;
  float* staged_w = shared + (threadIdx.x / 32) * (kInnerBackward + 1) * 32;  // 4 × 32
  int* staged_e = reinterpret_cast<int*>(staged_w + kInnerBackward * 32);     // 32
  const int img = int(row / p.n), j = int(row % p.n);
  const int list = p.nbhd_images == 1 ? 0 : img;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  const T* x = static_cast<const T*>(p.feat) + row * C;
  const T* du_img = static_cast<const T*>(bp.grad_out) + size_t(img) * p.kept * kInnerBackward * C;
  const float importance = p.importance[row];
  const InversePairs holders = inverse_pairs(bp.inv_start, bp.inv_pairs, list, p.n, m, j);
  const int first = holders.first, last = holders.last;
  // Lanes over channels: at most 8 per lane are kept (C ≤ 256 per pass).
  float dp = 0.0f;
  for (int c0 = 0; c0 < C; c0 += 32 * 8) {
    float dx[8] = {};
    for (int base = first; base < last; base += 32) {
      const int at = base + lane;
      if (at < last) {
        const int i = holders.query(at), slot = holders.slot(at);
        const int r = bp.centre_row[size_t(img) * p.n + i];
        const bool masked = p.mask && !p.mask[(size_t(list) * p.n + i) * m + slot];
        float f[5], zhat[kInnerBackward], inv_std, w[kInnerBackward];
        neighbour_features(pos, i, j, p.offset_clamp, f);
        weight_net_forward(p, f, zhat, &inv_std, w);
        const bool counts = r >= 0 && !masked;
        for (int o = 0; o < kInnerBackward; ++o) staged_w[o * 32 + lane] = counts ? w[o] : 0.0f;
        staged_e[lane] = counts ? r : 0;
      }
      __syncwarp();
      const int count = last - base < 32 ? last - base : 32;
      for (int u = 0; u < count; ++u) {
        const T* du = du_img + size_t(staged_e[u]) * kInnerBackward * C;
        for (int q = 0, c = c0 + lane; q < 8 && c < C; ++q, c += 32) {
          float g = 0.0f;
          for (int o = 0; o < kInnerBackward; ++o) g += staged_w[o * 32 + u] * to_f32(du[o * C + c]);
          dx[q] += g * importance;
          dp += g * to_f32(x[c]);
        }
      }
      __syncwarp();
    }
    T* grad = static_cast<T*>(bp.grad_feat) + row * C;
    for (int q = 0, c = c0 + lane; q < 8 && c < C; ++q, c += 32) grad[c] = from_f32<T>(dx[q]);
  }
  dp = warp_sum(dp);
  if (lane == 0) bp.grad_importance[row] = dp;
}

AF_KERNEL(pointconv_merge_backward_clear, MergeBackwardParams, pointconv_merge_backward_clear_impl(p))
AF_KERNEL(pointconv_merge_backward_centres, MergeBackwardParams,
          pointconv_merge_backward_centres_impl(p))
AF_KERNEL_ALL_TYPES(pointconv_merge_backward_rows, MergeBackwardParams,
                    pointconv_merge_backward_rows_impl)
AF_KERNEL_ALL_TYPES(pointconv_merge_backward_tokens, MergeBackwardParams,
                    pointconv_merge_backward_tokens_impl)
