// Balanced clustering along the anchor snake (spec §3), bit-exact: every
// operation is a correctly rounded __f*_rn, never contracted into an FMA.
// The sort between keys and means is sort.cu's stable sort.
#include "common.cuh"

__device__ __forceinline__ float dist2_rn(float x, float y, const float* at) {
  const float dx = __fsub_rn(x, at[0]), dy = __fsub_rn(y, at[1]);
  return __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
}

__device__ void cluster_ratio_impl(const ClusterRatioParams p) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.count) return;
  const float x = p.pos[2 * t], y = p.pos[2 * t + 1];
  // Clamped into the grid before the conversion, so no position can index
  // outside the anchor arrays.
  const int ax = int(fminf(fmaxf(floorf(__fdiv_rn(x, p.cell_w)), 0.0f), float(p.pw - 1)));
  const int ay = int(fminf(fmaxf(floorf(__fdiv_rn(y, p.cell_h)), 0.0f), float(p.ph - 1)));
  const int rank = ay * p.pw + (ay % 2 == 0 ? ax : p.pw - 1 - ax);
  const float dp = dist2_rn(x, y, p.prev + 2 * rank);
  const float dn = dist2_rn(x, y, p.next + 2 * rank);
  const float ratio = __fdiv_rn(dp, __fadd_rn(dn, 1e-5f));
  p.rank[t] = rank;
  p.ratio[t] = ratio;
  // Ratios are ≥ 0, whose bit patterns order as the floats do.
  atomicMax(p.max_ratio + t / p.group, uint32_t(__float_as_int(ratio)));
}

__device__ void cluster_keys_impl(const ClusterKeysParams p) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.count) return;
  const float scale = __fadd_rn(__int_as_float(int(p.max_ratio[t / p.group])), 1.0f);
  p.keys[t] = __fadd_rn(__fmul_rn(float(p.rank[t]), scale), p.ratio[t]);
}

__device__ void cluster_means_impl(const ClusterMeansParams p) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.batch * p.clusters) return;
  const int img = e / p.clusters, c = e % p.clusters;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  const int first = c * p.size;
  const int end = first + p.size < p.n ? first + p.size : p.n;
  float sx = 0.0f, sy = 0.0f;
  for (int t = first; t < end; ++t) {
    sx = __fadd_rn(sx, pos[2 * t]);
    sy = __fadd_rn(sy, pos[2 * t + 1]);
  }
  const float count = float(end - first);
  p.means[2 * e] = __fdiv_rn(sx, count);
  p.means[2 * e + 1] = __fdiv_rn(sy, count);
}

AF_KERNEL(cluster_ratio, ClusterRatioParams, cluster_ratio_impl(p))
AF_KERNEL(cluster_keys, ClusterKeysParams, cluster_keys_impl(p))
AF_KERNEL(cluster_means, ClusterMeansParams, cluster_means_impl(p))
