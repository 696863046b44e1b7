// Stable ascending sort of each image's keys (spec §9: equal keys keep
// index order), as a bottom-up merge sort: pass `width` merges pairs of
// sorted runs of `width` elements, one thread per element, log2(n) passes.
// Runs are ordered by (key, index), so an element's place in the merged run
// is its place in its own run plus the number of elements of the other run
// that come before it in that order, found by binary search: no shared
// memory, no barriers, O(n log² n) work per image (the rank counting this
// replaces was O(n²): 10⁹ compares at 32k tokens, a Cityscapes stage 1).
#include "common.cuh"

// True when element a (key ka) comes before element b (key kb).
__device__ __forceinline__ bool sorts_before(float ka, int a, float kb, int b) {
  return ka < kb || (ka == kb && a < b);
}

__device__ void stable_sort_impl(const StableSortParams p) {
  const int img = blockIdx.y;
  const int pos = blockIdx.x * blockDim.x + threadIdx.x;
  if (pos >= p.n) return;
  const size_t base = size_t(img) * p.n;
  const float* keys = p.keys + base;
  // The first pass sorts runs of one element: the identity.
  const int elem = p.src ? p.src[base + pos] : pos;
  const float key = keys[elem];
  const int w = p.width;
  const int run = pos / w;
  const int pair_start = (run & ~1) * w;
  // The other run of the pair: after this one (run even) or before it.
  const int other_start = (run & 1) ? pair_start : pair_start + w;
  const long long end = (long long)other_start + w;
  const int other_end = end < p.n ? int(end) : p.n;
  const int* src = p.src ? p.src + base : nullptr;
  // Count the other run's elements that sort before this one.
  int lo = 0, hi = other_end > other_start ? other_end - other_start : 0;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const int o = src ? src[other_start + mid] : other_start + mid;
    if (sorts_before(keys[o], o, key, elem)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int own_offset = pos - run * w;
  p.dst[base + pair_start + own_offset + lo] = elem;
}

AF_KERNEL(stable_sort, StableSortParams, stable_sort_impl(p))
