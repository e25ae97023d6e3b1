// value_vector_norms on CUDA, any strides; same contract as the CPU path (kernels.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "cuda_common.cuh"
#include "hostdevice.h"
#include "kernels.h"

namespace specext {

namespace {

// Block (32 columns x 8 row groups); any strides (coalesced when columns are adjacent).
template <DType D>
__global__ void norms_kernel(NormsArgs a) {
  __shared__ double part[8][33];
  const int64_t j = int64_t(blockIdx.x) * 32 + threadIdx.x;
  double s = 0.0;
  if (j < a.K)
    for (int64_t r = threadIdx.y; r < a.R; r += 8) {
      const double x = load_as_f64<D>(a.weight, r * a.stride0 + j * a.stride1);
      s += x * x;
    }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < a.K) {
    double t = 0.0;
    for (int y = 0; y < 8; ++y) t += part[y][threadIdx.x];
    a.out[j] = float(sqrt(t));
  }
}

}  // namespace

void value_vector_norms_cuda(const NormsArgs& a, int device, void* stream) {
  if (a.K == 0) return;
  DeviceGuard guard(device);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dim3 block(32, 8), grid(unsigned((a.K + 31) / 32));
  switch (a.dtype) {
    case DType::F32: norms_kernel<DType::F32><<<grid, block, 0, st>>>(a); break;
    case DType::F16: norms_kernel<DType::F16><<<grid, block, 0, st>>>(a); break;
    case DType::BF16: norms_kernel<DType::BF16><<<grid, block, 0, st>>>(a); break;
    case DType::F64: norms_kernel<DType::F64><<<grid, block, 0, st>>>(a); break;
    default: SPECEXT_CHECK(false, TypeError, "weight dtype " << dtype_name(a.dtype) << " is not supported");
  }
  SPECEXT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace specext
