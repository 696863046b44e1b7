// Small tensor utilities: row gathers (reordering tokens) and the mean over
// tokens (the classification head's pooling).
#include "common.cuh"

template <class T>
__device__ void gather_rows_impl(const GatherRowsParams p) {
  const size_t total = size_t(p.batch) * p.out_rows * p.width;
  for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += size_t(gridDim.x) * blockDim.x) {
    const size_t row = e / p.width, img = row / p.out_rows;
    const size_t index_row = p.index_images == 1 ? row % p.out_rows : row;
    const size_t src = img * p.in_rows + clamp_index(p.index[index_row], p.in_rows);
    static_cast<T*>(p.out)[e] = static_cast<const T*>(p.input)[src * p.width + e % p.width];
  }
}

template <class T>
__device__ void mean_tokens_impl(const MeanTokensParams p) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.batch * p.channels) return;
  const int img = e / p.channels, c = e % p.channels;
  const T* x = static_cast<const T*>(p.x) + size_t(img) * p.tokens * p.channels + c;
  float sum = 0.0f;
  for (int i = 0; i < p.tokens; ++i) sum += to_f32(x[size_t(i) * p.channels]);
  static_cast<T*>(p.out)[e] = from_f32<T>(sum / p.tokens);
}

AF_KERNEL_ALL_TYPES(gather_rows, GatherRowsParams, gather_rows_impl)
AF_KERNEL_ALL_TYPES(mean_tokens, MeanTokensParams, mean_tokens_impl)
