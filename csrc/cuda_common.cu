// CUDA runtime plumbing shared by the kernel files: device guard, device count.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "kernels.h"

namespace specext {

DeviceGuard::DeviceGuard(int device) {
  SPECEXT_CUDA_CHECK(cudaGetDevice(&prev));
  if (prev != device) SPECEXT_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && prev >= 0) cudaSetDevice(prev);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the sticky error and report none
    return 0;
  }
  return n;
}

}  // namespace specext
