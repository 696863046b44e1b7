// Tokens back onto the grid: one thread per cell finds its k nearest tokens
// (exact integer distances, ties to the lower index); a cell holding a token
// takes its features, an empty one the 1/d^power-weighted mean.
//
// Two searches, with the same result: every token (brute force, cheap when
// tokens are few), or square rings of cells around the cell on an occupancy
// map (dense_occupancy), stopping once the k-th nearest is closer than the
// next ring: at segmentation scale a cell then reads tens of cells instead
// of tens of thousands of tokens.
#include "common.cuh"

// Largest k a thread keeps in registers; the wrapper checks it.
constexpr int kMaxDenseK = 16;

// Marks each token's cell with n − t, keeping the lowest token on a cell
// (the largest mark, whatever order the threads run in). Tokens off the
// grid are left out.
AF_KERNEL(dense_occupancy, DenseParams, {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.batch * p.n) return;
  const int img = e / p.n, t = e % p.n;
  const float x = p.pos[2 * size_t(e)], y = p.pos[2 * size_t(e) + 1];
  if (!(x >= 0.0f && y >= 0.0f && x < float(p.w) && y < float(p.h))) return;
  const size_t cell = size_t(img) * p.h * p.w + size_t(y) * p.w + size_t(x);
  atomicMax(p.occupancy + cell, p.n - t);
})

// The cells at Chebyshev distance r ≥ 1 from (x, y) that lie on the grid,
// each once, as (cell x, cell y) to `visit`.
template <class Visit>
__device__ __forceinline__ void for_each_ring_cell(int64_t x, int64_t y, int64_t r, int64_t w,
                                                   int64_t h, Visit visit) {
  const int64_t x0 = x - r > 0 ? x - r : 0, x1 = x + r < w - 1 ? x + r : w - 1;
  if (y - r >= 0)
    for (int64_t cx = x0; cx <= x1; ++cx) visit(cx, y - r);
  if (y + r < h)
    for (int64_t cx = x0; cx <= x1; ++cx) visit(cx, y + r);
  const int64_t y0 = y - r + 1 > 0 ? y - r + 1 : 0, y1 = y + r - 1 < h - 1 ? y + r - 1 : h - 1;
  if (x - r >= 0)
    for (int64_t cy = y0; cy <= y1; ++cy) visit(x - r, cy);
  if (x + r < w)
    for (int64_t cy = y0; cy <= y1; ++cy) visit(x + r, cy);
}

template <class T>
__device__ void to_dense_impl(const DenseParams p) {
  const int plane = p.h * p.w;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.batch * plane) return;
  const int img = e / plane, cell = e % plane;
  const int64_t x = cell % p.w, y = cell / p.w;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  int64_t best_d[kMaxDenseK];
  int best_t[kMaxDenseK];
  int filled = 0;
  if (!p.occupancy) {
    for (int t = 0; t < p.n; ++t) {
      const int64_t dx = int64_t(pos[2 * t]) - x, dy = int64_t(pos[2 * t + 1]) - y;
      insert_nearest(best_d, best_t, filled, p.k, dx * dx + dy * dy, t);
    }
  } else {
    const int32_t* occupancy = p.occupancy + size_t(img) * plane;
    const int32_t here = occupancy[cell];
    if (here > 0) {
      best_d[0] = 0;
      best_t[0] = p.n - here;
      filled = 1;
    }
    const int64_t last_ring = p.h > p.w ? p.h : p.w;
    for (int64_t r = 1; here == 0 && r <= last_ring; ++r) {
      // Ring r is at least r away: once the k-th nearest is strictly closer
      // (an equal distance could still enter with a lower index), stop.
      if (filled == p.k && best_d[p.k - 1] < r * r) break;
      for_each_ring_cell(x, y, r, p.w, p.h, [&](int64_t cx, int64_t cy) {
        const int32_t mark = occupancy[cy * p.w + cx];
        if (mark == 0) return;
        const int64_t dx = cx - x, dy = cy - y;
        insert_nearest(best_d, best_t, filled, p.k, dx * dx + dy * dy, p.n - mark);
      });
    }
  }
  float weight[kMaxDenseK];
  if (filled > 0 && best_d[0] == 0) {
    filled = 1;
    weight[0] = 1.0f;
  } else {
    double raw[kMaxDenseK], total = 0.0;
    for (int r = 0; r < filled; ++r) {
      raw[r] = pow(double(best_d[r]), -0.5 * double(p.power));
      total += raw[r];
    }
    for (int r = 0; r < filled; ++r) weight[r] = float(raw[r] / total);
  }
  const T* feat = static_cast<const T*>(p.feat) + size_t(img) * p.n * p.channels;
  T* out = static_cast<T*>(p.out) + size_t(img) * p.channels * plane + cell;
  for (int ch = 0; ch < p.channels; ++ch) {
    float acc = 0.0f;
    for (int r = 0; r < filled; ++r) acc += weight[r] * to_f32(feat[size_t(best_t[r]) * p.channels + ch]);
    out[size_t(ch) * plane] = from_f32<T>(acc);
  }
}

AF_KERNEL_ALL_TYPES(to_dense, DenseParams, to_dense_impl)
