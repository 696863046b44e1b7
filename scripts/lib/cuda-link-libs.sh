# Sourced by install-cuda-link-libs.sh and device-check.sh: the CUDA
# libraries candle's `cuda` feature links at build time (cudarc's
# dynamic-linking), by soname, besides the driver (libcuda.so.1). The first
# script provides them on a machine without a toolkit; the device check's
# run finds their folders for the loader on the GPU machine.
CUDA_LINK_LIBS=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)
