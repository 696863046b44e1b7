// Tokens back onto the grid: one thread per cell finds its k nearest tokens
// (exact integer distances, ties to the lower index); a cell holding a token
// takes its features, an empty one the 1/d^power-weighted mean.
#include "common.cuh"

// Largest k a thread keeps in registers; the wrapper checks it.
constexpr int kMaxDenseK = 16;

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
  for (int t = 0; t < p.n; ++t) {
    const int64_t dx = int64_t(pos[2 * t]) - x, dy = int64_t(pos[2 * t + 1]) - y;
    insert_nearest(best_d, best_t, filled, p.k, dx * dx + dy * dy, t);
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
