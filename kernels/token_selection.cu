// Token selection (spec §7): importance, grid prior, reserve and the keys
// whose stable ascending sort (sort.cu) is the new token order.
#include "common.cuh"

template <class T>
__device__ void importance_impl(const ImportanceParams p) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * warps + threadIdx.x / 32;
  if (row >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + size_t(row) * p.dim;
  // The order `token_selection::importance` repeats on the CPU: lane sums,
  // the warp's butterfly, the bias, then the twin sigmoid; no FMA anywhere,
  // so the scores (and the selection they decide) are the CPU's bits.
  float acc = 0.0f;
  for (int e = lane; e < p.dim; e += 32) acc = __fadd_rn(acc, __fmul_rn(to_f32(x[e]), p.weight[e]));
  const float logit = __fadd_rn(warp_sum(acc), p.bias);
  if (lane == 0) static_cast<float*>(p.out)[row] = sigmoid_exact_twin(logit);
}

__device__ __forceinline__ bool divisible(float v, int64_t by) { return int64_t(v) % by == 0; }

__device__ void selection_keys_impl(const SelectionKeysParams p) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.n) return;
  const int img = row / p.n, t = row % p.n;
  const float* pos = p.pos + size_t(img) * p.n * 2;
  const float x = pos[2 * t], y = pos[2 * t + 1];
  const int64_t coarse = 2 * p.stride;
  if (divisible(x, coarse) && divisible(y, coarse)) {
    p.keys[row] = __int_as_float(0x7f800000);  // +inf: reserve tokens sort last
    atomicAdd(p.reserve_count + img, 1);
    return;
  }
  float prior;
  if (p.stride == 2) {
    prior = divisible(x, 2) && divisible(y, 2);
  } else {
    // δ² to the nearest other token (integer positions: exact in int64).
    int64_t best = -1;
    for (int j = 0; j < p.n; ++j) {
      if (j == t) continue;
      const int64_t dx = int64_t(pos[2 * j]) - int64_t(x), dy = int64_t(pos[2 * j + 1]) - int64_t(y);
      const int64_t d2 = dx * dx + dy * dy;
      if (best < 0 || d2 < best) best = d2;
    }
    if (best < 0) {
      prior = 0.0f;
    } else {
      int e = 0;
      for (int64_t power = 1; power < best; power *= 4) ++e;
      const int64_t ada = int64_t(2) << e;
      prior = divisible(x, ada) && divisible(y, ada);
    }
  }
  const float score = __fadd_rn(prior, __fmul_rn(p.alpha, p.importance[row]));
  p.keys[row] = -score;
}

__device__ void selection_order_impl(const SelectionOrderParams p) {
  const int kept = p.sampled + p.reserve;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.batch * kept) return;
  const int img = e / kept, r = e % kept;
  const int from = r < p.sampled ? r : p.n - p.reserve + (r - p.sampled);
  p.order[e] = p.sorted[size_t(img) * p.n + clamp_index(from, p.n)];
}

// One thread per image: flags a reserve count other than the expected
// (atomically: several images may differ, and plain stores of one flag
// from several threads are a race, however benign).
__device__ void selection_check_impl(const SelectionCheckParams p) {
  const int img = blockIdx.x * blockDim.x + threadIdx.x;
  if (img >= p.batch) return;
  if (p.reserve_count[img] != p.reserve) atomicMax(p.mismatch, 1);
}

// Backward of the importance, one thread per element of x (and of the
// rows' shares): dlogit = dp·p·(1 − p), dx = dlogit·w, share = dlogit·x.
template <class T>
__device__ void importance_backward_impl(const ImportanceBackwardParams p) {
  const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int width = p.dim + 1;
  if (e >= size_t(p.rows) * width) return;
  const size_t row = e / width;
  const int k = int(e % width);
  const float prob = p.p[row];
  const float dlogit = p.grad_p[row] * prob * (1.0f - prob);
  if (k == p.dim) {
    p.row_partials[e] = dlogit;
    return;
  }
  const T* x = static_cast<const T*>(p.x) + row * p.dim;
  static_cast<T*>(p.grad_x)[row * p.dim + k] = from_f32<T>(dlogit * p.weight[k]);
  p.row_partials[e] = dlogit * to_f32(x[k]);
}

AF_KERNEL_ALL_TYPES(importance, ImportanceParams, importance_impl)
AF_KERNEL_ALL_TYPES(importance_backward, ImportanceBackwardParams, importance_backward_impl)
AF_KERNEL(selection_keys, SelectionKeysParams, selection_keys_impl(p))
AF_KERNEL(selection_order, SelectionOrderParams, selection_order_impl(p))
AF_KERNEL(selection_check, SelectionCheckParams, selection_check_impl(p))
