// Dense layers: out = act(x · Wᵀ + b), optionally residual + gamma ∘ (...).
// A 64×64 output tile per block of 256 threads, each thread 4×4 outputs,
// k in steps of 16 through shared memory; f32 accumulation.
#include "common.cuh"

constexpr int kTile = 64;
constexpr int kStep = 16;
constexpr int kThreads = 256;

template <class T>
__device__ void linear_impl(const LinearParams p) {
  __shared__ float xs[kStep][kTile + 4];  // k-major tiles: conflict-free reads
  __shared__ float ws[kStep][kTile + 4];
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  // Rows on x (up to 2^31 − 1 tiles), outputs on y (up to 65 535 tiles).
  const int row0 = blockIdx.x * kTile, col0 = blockIdx.y * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < p.in_dim; k0 += kStep) {
    for (int e = threadIdx.x; e < kTile * kStep; e += kThreads) {
      const int r = e / kStep, kk = e % kStep, gk = k0 + kk;
      const int gr = row0 + r, gc = col0 + r;
      xs[kk][r] = gr < p.rows && gk < p.in_dim ? to_f32(x[size_t(gr) * p.in_dim + gk]) : 0.0f;
      ws[kk][r] = gc < p.out_dim && gk < p.in_dim ? to_f32(w[size_t(gc) * p.in_dim + gk]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kStep; ++kk) {
      float a[4], b[4];
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= p.rows) continue;
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx + 16 * j;
      if (c >= p.out_dim) continue;
      float v = acc[i][j] + (bias ? to_f32(bias[c]) : 0.0f);
      if (p.gelu) v = gelu(v);
      const size_t at = size_t(r) * p.out_dim + c;
      if (residual) v = to_f32(residual[at]) + (p.gamma ? p.gamma[c] : 1.0f) * v;
      out[at] = from_f32<T>(v);
    }
  }
}

AF_KERNEL_ALL_TYPES(linear, LinearParams, linear_impl)
