// Nearest clusters and the neighbour lists built from them (spec §4).
// Squared distances are ranked in f32 as the published model computes them
// (spec §4): dx, dy, their squares and the sum each rounded on its own (the
// _rn intrinsics stop nvcc from fusing them into an FMA), so near-ties rank
// as there; equal distances go to the lower cluster index.
//
// Not every mean is scanned: each image's means are sorted by x
// (`cluster_x_keys`, then the stable sort), and one thread per token sweeps
// outwards from its own x, stopping a side where the rounded dx² alone
// exceeds its nnc-th distance (every mean further along is at least that
// far: rounding is monotone and the rounded sum is never below its dx²
// term). The result is the full scan's, ties included.
// src/ops/neighbourhood.rs is the CPU twin.
#include "common.cuh"

// Largest nnc a thread keeps in registers; the wrapper checks it.
constexpr int kMaxNearest = 32;

// The x of every cluster mean, the sort keys of the sweep's order.
__device__ void cluster_x_keys_impl(const ClusterXKeysParams p) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < p.batch * p.clusters) p.keys[e] = p.means[2 * size_t(e)];
}

AF_KERNEL(cluster_x_keys, ClusterXKeysParams, cluster_x_keys_impl(p))

__device__ void nearest_neighbourhoods_impl(const NeighbourhoodParams p) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.n) return;
  const int img = row / p.n;
  const float x = p.pos[2 * row], y = p.pos[2 * row + 1];
  const float* means = p.means + size_t(img) * p.clusters * 2;
  const int32_t* by_x = p.by_x + size_t(img) * p.clusters;
  const int k = p.clusters;
  auto mean_at = [&](int at) { return clamp_index(by_x[at], k); };
  // The rounded dx² of the mean at sorted place `at`.
  auto bound = [&](int at) {
    const float dx = __fsub_rn(x, means[2 * mean_at(at)]);
    return __fmul_rn(dx, dx);
  };
  // First sorted place whose x is not below the token's.
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (means[2 * mean_at(mid)] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  float best_d[kMaxNearest];
  int best_c[kMaxNearest];
  int filled = 0;
  int left = lo, right = lo;  // places left - 1, left - 2, … and right, right + 1, …
  for (;;) {
    const bool full = filled == p.nnc;
    const float worst = full ? best_d[p.nnc - 1] : 0.0f;
    const float left_lb = left > 0 ? bound(left - 1) : 0.0f;
    const float right_lb = right < k ? bound(right) : 0.0f;
    const bool left_open = left > 0 && (!full || left_lb <= worst);
    const bool right_open = right < k && (!full || right_lb <= worst);
    if (!left_open && !right_open) break;
    const int at = left_open && (!right_open || left_lb <= right_lb) ? --left : right++;
    const int c = mean_at(at);
    const float dx = __fsub_rn(x, means[2 * c]);
    const float dy = __fsub_rn(y, means[2 * c + 1]);
    insert_nearest(best_d, best_c, filled, p.nnc, __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy)), c);
  }
  const int m = p.nnc * p.size;
  int32_t* nbhd = p.nbhd + size_t(row) * m;
  uint8_t* mask = p.mask ? p.mask + size_t(row) * m : nullptr;
  for (int r = 0; r < p.nnc; ++r)
    for (int u = 0; u < p.size; ++u) {
      const int member = best_c[r] * p.size + u;
      const bool valid = member < p.n;
      nbhd[r * p.size + u] = valid ? member : 0;
      if (mask) mask[r * p.size + u] = valid;
    }
}

AF_KERNEL(nearest_neighbourhoods, NeighbourhoodParams, nearest_neighbourhoods_impl(p))
