// Patch embedding (spec §2) as im2col + the linear kernel: one thread per
// patch element, reading the (strided) input map.
#include "common.cuh"

template <class T>
__device__ void im2col_impl(const Im2colParams p) {
  const int width = p.channels * 9;
  const size_t total = size_t(p.batch) * p.oh * p.ow * width;
  for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += size_t(gridDim.x) * blockDim.x) {
    const int k = int(e % width);
    const size_t row = e / width;
    const int ox = int(row % p.ow), oy = int((row / p.ow) % p.oh);
    const size_t img = row / (size_t(p.oh) * p.ow);
    const int ci = k / 9, ky = (k % 9) / 3, kx = k % 3;
    const int y = 2 * oy + ky - 1, x = 2 * ox + kx - 1;
    const bool inside = y >= 0 && y < p.ih && x >= 0 && x < p.iw;
    const T* input = static_cast<const T*>(p.input);
    static_cast<T*>(p.out)[e] =
        inside ? input[img * p.image_stride + ci * p.channel_stride + (size_t(y) * p.iw + x) * p.pixel_stride]
               : from_f32<T>(0.0f);
  }
}

AF_KERNEL_ALL_TYPES(im2col, Im2colParams, im2col_impl)
