// Nearest clusters and the neighbour lists built from them (spec §4): one
// thread per token scans every cluster mean, keeping the nnc nearest in an
// insertion-sorted list. Squared distances are exact in f64 (differences
// and squares of f32 values fit its mantissa), so ties are real ties and go
// to the lower cluster index.
#include "common.cuh"

// Largest nnc a thread keeps in registers; the wrapper checks it.
constexpr int kMaxNearest = 32;

__device__ void nearest_neighbourhoods_impl(const NeighbourhoodParams p) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.n) return;
  const int img = row / p.n;
  const double x = p.pos[2 * row], y = p.pos[2 * row + 1];
  const float* means = p.means + size_t(img) * p.clusters * 2;
  double best_d[kMaxNearest];
  int best_c[kMaxNearest];
  int filled = 0;
  for (int c = 0; c < p.clusters; ++c) {
    const double dx = __dsub_rn(x, double(means[2 * c]));
    const double dy = __dsub_rn(y, double(means[2 * c + 1]));
    insert_nearest(best_d, best_c, filled, p.nnc, __dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy)), c);
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
