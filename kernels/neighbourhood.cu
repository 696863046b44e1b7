// Nearest clusters and the neighbour lists built from them (spec §4): one
// thread per token scans every cluster mean, keeping the nnc nearest in an
// insertion-sorted list. Squared distances are ranked in f32 as the
// published model computes them (spec §4): dx, dy, their squares and the sum
// each rounded on its own (the _rn intrinsics stop nvcc from fusing them into
// an FMA), so near-ties rank as there; equal distances go to the lower
// cluster index. src/ops/neighbourhood.rs is the CPU twin.
#include "common.cuh"

// Largest nnc a thread keeps in registers; the wrapper checks it.
constexpr int kMaxNearest = 32;

__device__ void nearest_neighbourhoods_impl(const NeighbourhoodParams p) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.n) return;
  const int img = row / p.n;
  const float x = p.pos[2 * row], y = p.pos[2 * row + 1];
  const float* means = p.means + size_t(img) * p.clusters * 2;
  float best_d[kMaxNearest];
  int best_c[kMaxNearest];
  int filled = 0;
  for (int c = 0; c < p.clusters; ++c) {
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
