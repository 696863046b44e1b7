// Small tensor utilities: row gathers (reordering tokens), the mean over
// tokens (the classification head's pooling) and column sums over chunks
// of rows (the backward's parameter gradients).
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

// One thread per (chunk of rows, column): the chunk's rows added in row
// order, so the sums' bits depend on the shape and the chunk only. Threads
// of a warp take neighbouring columns: each row's read is coalesced.
__device__ void column_sums_impl(const ColumnSumsParams p) {
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= p.cols) return;
  const int first = blockIdx.x * p.chunk;
  const int last = p.rows - first < p.chunk ? p.rows : first + p.chunk;
  float acc = 0.0f;
  for (int r = first; r < last; ++r) acc += p.input[size_t(r) * p.cols + k];
  p.sums[size_t(blockIdx.x) * p.cols + k] = acc;
}

AF_KERNEL_ALL_TYPES(gather_rows, GatherRowsParams, gather_rows_impl)
AF_KERNEL_ALL_TYPES(mean_tokens, MeanTokensParams, mean_tokens_impl)
AF_KERNEL(column_sums, ColumnSumsParams, column_sums_impl(p))
