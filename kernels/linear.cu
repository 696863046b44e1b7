// Dense layers: out = act(x · Wᵀ + b), optionally residual + gamma ∘ (...).
// `linear` is the SIMT GEMM; `linear_epilogue` finishes a cuBLASLt product.
// A 64×64 output tile per block of 256 threads, each thread 4×4 outputs,
// k in steps of 16 through shared memory; f32 accumulation.
#include "common.cuh"

constexpr int kTile = 64;
constexpr int kStep = 16;
constexpr int kThreads = 256;

// What both GEMMs do with an f32 product `acc` at (r, c): bias, GELU, then
// the residual with its layer scale; rounded to T once.
template <class T>
__device__ void store_output(float acc, int r, int c, const void* bias_, const void* residual_,
                             const float* gamma, void* out_, int out_dim, int use_gelu) {
  const T* bias = static_cast<const T*>(bias_);
  const T* residual = static_cast<const T*>(residual_);
  T* out = static_cast<T*>(out_);
  float v = acc + (bias ? to_f32(bias[c]) : 0.0f);
  if (use_gelu) v = gelu(v);
  const size_t at = size_t(r) * out_dim + c;
  if (residual) v = to_f32(residual[at]) + (gamma ? gamma[c] : 1.0f) * v;
  out[at] = from_f32<T>(v);
}

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
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= p.rows) continue;
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx + 16 * j;
      if (c >= p.out_dim) continue;
      store_output<T>(acc[i][j], r, c, p.bias, p.residual, p.gamma, p.out, p.out_dim, p.gelu);
    }
  }
}

AF_KERNEL_ALL_TYPES(linear, LinearParams, linear_impl)

// The same epilogue over a product cuBLASLt computed (f32, rows × out_dim):
// one thread per output, grid-stride over rows × out_dim.
template <class T>
__device__ void linear_epilogue_impl(const LinearEpilogueParams p) {
  const size_t total = size_t(p.rows) * p.out_dim;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t at = size_t(blockIdx.x) * blockDim.x + threadIdx.x; at < total; at += stride) {
    const int r = int(at / p.out_dim), c = int(at % p.out_dim);
    store_output<T>(p.product[at], r, c, p.bias, p.residual, p.gamma, p.out, p.out_dim, p.gelu);
  }
}

AF_KERNEL_ALL_TYPES(linear_epilogue, LinearEpilogueParams, linear_epilogue_impl)
