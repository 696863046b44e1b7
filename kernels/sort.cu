// Stable ascending sort of each image's keys by rank counting: a key's rank
// is the number of smaller keys plus the number of equal keys before it, so
// ties keep index order (spec §9). Keys stream through shared memory in
// tiles; O(n²) compares per image, which for AFF's n ≤ a few thousand costs
// less than a multi-pass radix sort's launches.
#include "common.cuh"

constexpr int kSortThreads = 256;

__device__ void stable_sort_impl(const StableSortParams p) {
  __shared__ float tile[kSortThreads];
  const int img = blockIdx.y;
  const int i = blockIdx.x * kSortThreads + threadIdx.x;
  const float* keys = p.keys + size_t(img) * p.n;
  const float key = i < p.n ? keys[i] : 0.0f;
  int rank = 0;
  for (int start = 0; start < p.n; start += kSortThreads) {
    const int j = start + threadIdx.x;
    tile[threadIdx.x] = j < p.n ? keys[j] : 0.0f;
    __syncthreads();
    const int count = p.n - start < kSortThreads ? p.n - start : kSortThreads;
    for (int t = 0; t < count; ++t) {
      const float other = tile[t];
      rank += other < key || (other == key && start + t < i);
    }
    __syncthreads();
  }
  if (i < p.n) p.order[size_t(img) * p.n + rank] = i;
}

AF_KERNEL(stable_sort, StableSortParams, stable_sort_impl(p))
